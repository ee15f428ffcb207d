"""Shared by train_mnist.py and train_cifar10.py: one paper config on the
genuine .npz data in ../shared/data, trained by `train.train_and_evaluate`."""

from __future__ import annotations

import argparse
import ast
import os
import pathlib
import sys
import time

from absl import logging

from nin_jax import config_lib
from nin_jax import input_pipeline
from nin_jax import runtime
from nin_jax import train

REPO = pathlib.Path(__file__).resolve().parents[1]


def data_root() -> pathlib.Path:
  """$NIN_JAX_DATA_DIR, else ../shared/data beside the repo (as the tests)."""
  return pathlib.Path(os.environ.get('NIN_JAX_DATA_DIR',
                                     REPO.parent / 'shared' / 'data'))


def run(name: str, config_file: str, npz_relpath: str, doc: str) -> None:
  """Parses --workdir/--npz/--epochs/--steps/--set, trains, prints one line."""
  parser = argparse.ArgumentParser(
      description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', default=f'runs/{name}_real',
                      help='checkpoints and metrics; resumed if it has any')
  parser.add_argument('--npz', default=str(data_root() / npz_relpath),
                      help='Keras-layout .npz (default: $NIN_JAX_DATA_DIR/'
                      f'{npz_relpath} or ../shared/data/{npz_relpath})')
  parser.add_argument('--epochs', type=float, default=None,
                      help=f'override the num_epochs of {config_file}')
  parser.add_argument('--steps', type=int, default=None,
                      help='override with a step count (wins over --epochs)')
  parser.add_argument('--set', action='append', default=[],
                      metavar='FIELD=VALUE',
                      help='override a config field, e.g. model.batch_norm=True')
  args = parser.parse_args()

  logging.set_verbosity(logging.INFO)
  logging.get_absl_logger().addFilter(runtime.QuietLibraries())
  c = config_lib.sibling_config(str(REPO / 'configs' / config_file),
                                config_file)
  c.data.dataset = f'npz:{args.npz}'
  if args.epochs is not None:
    c.train.num_epochs = args.epochs
  if args.steps is not None:
    c.train.num_train_steps = args.steps
  for override in args.set:
    field, _, value = override.partition('=')
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass  # A bare string such as modern.
    c.update_from_flattened_dict({field: value})
  runtime.configure_cpu((c.train.batch_size, c.train.eval_batch_size),
                        c.runtime.cpu_devices)
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
