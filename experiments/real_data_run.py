"""Shared by train_mnist.py and train_cifar10.py: one paper config on the
genuine .npz data in ../shared/data, trained by `train.train_and_evaluate`."""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

from absl import logging

from experiments import common
from nin_jax import config_lib
from nin_jax import input_pipeline
from nin_jax import runtime
from nin_jax import train

REPO = common.REPO


def data_root() -> pathlib.Path:
  """$NIN_JAX_DATA_DIR, else ../shared/data beside the repo (as the tests)."""
  return pathlib.Path(os.environ.get('NIN_JAX_DATA_DIR',
                                     REPO.parent / 'shared' / 'data'))


def run(name: str, config_file: str, npz_relpath: str, doc: str) -> None:
  """Parses --workdir/--npz/--epochs/--steps and --config.GROUP.FIELD=VALUE
  overrides, trains, prints one line."""
  parser = common.ArgumentParser(
      name, description=doc,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', default=f'runs/{name}_real',
                      help='checkpoints and metrics; resumed if it has any')
  parser.add_argument('--npz', default=str(data_root() / npz_relpath),
                      help='Keras-layout .npz (default: $NIN_JAX_DATA_DIR/'
                      f'{npz_relpath} or ../shared/data/{npz_relpath})')
  parser.add_argument('--epochs', type=float, default=None,
                      help=f'override the num_epochs of {config_file}')
  parser.add_argument('--steps', type=int, default=None,
                      help='override with a step count (wins over --epochs)')
  parser.epilog = ('Any config field: --config.GROUP.FIELD=VALUE, e.g. '
                   '--config.model.batch_norm=True.')
  args, overrides = common.parse_args(parser, None)

  logging.set_verbosity(logging.INFO)
  logging.get_absl_logger().addFilter(runtime.QuietLibraries())
  fields = [('data.dataset', f'npz:{args.npz}')]
  if args.epochs is not None:
    fields.append(('train.num_epochs', args.epochs))
  if args.steps is not None:
    fields.append(('train.num_train_steps', args.steps))
  try:
    c = common.load_config(f'configs/{config_file}', fields + overrides)
  except common.UserError as e:
    common.fail(name, str(e))
  runtime.configure_cpu_for(c)
  workdir = os.path.abspath(args.workdir)  # Orbax needs absolute paths.
  start = time.time()
  try:
    result = train.train_and_evaluate(c, workdir)
  except (config_lib.ConfigError, input_pipeline.DataError) as e:
    sys.exit(f'{name}: error: {e}')
  wall = time.time() - start
  print(f'{name}: test error {100 * result["error"]:.2f}% ('
        f'{result["examples"]} test images) after {result["step"]} steps, '
        f'wall time {wall:.0f} s, workdir {workdir}', flush=True)
