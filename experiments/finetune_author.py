r"""Trains on from the author's own CIFAR-10 NiN (the Caffe model zoo file) with
the author's recipe, and checks that it stays at the author's optimum.

  python -m experiments.finetune_author --workdir=runs/finetune_author \
      [--caffemodel=../shared/data/caffe/cifar10_nin.caffemodel] \
      [--npz=../shared/data/cifar10/cifar10.npz] [--runs=faithful,summed,base_rate]

The weights are imported once (WORKDIR/author); each run starts from them
(config.train.init_from) in WORKDIR/RUN for --epochs epochs (one by default)
with configs/cifar10.py:faithful and the zoo's layout (average pooling after
block 2), on the zoo solver's terms: batch 128, momentum 0.9, weight decay
1e-4 on weights, biases x2, the class-map layer x0.1, dropout 0.5:
  faithful   the solver's final learning rate, 0.001, the loss the batch mean
             as Caffe's
  summed     the same, with the loss summed over the batch instead (a wrong
             objective): with weight decay added to the gradient, as Caffe and
             nin-jax do, that is exactly learning rate 0.001 x 128 and weight
             decay 1e-4 / 128, which is how it is run
  base_rate  the solver's base learning rate, 0.1
Each run's test error is compared with the author's (10.43%, 1,043 of the
10,000 test images) and the band of +-0.5 points. One JSON line a run.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

from absl import logging

from experiments import provenance
from nin_jax import caffe_zoo
from nin_jax import checkpoints
from nin_jax import config_lib
from nin_jax import inference
from nin_jax import runtime
from nin_jax import train

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = pathlib.Path(os.environ.get('NIN_JAX_DATA_DIR',
                                   REPO.parent / 'shared' / 'data'))
AUTHOR_ERROR = 0.1043
BAND = 0.005
BATCH = 128
RUNS = {
    'faithful': {'optim.learning_rate': 0.001},
    'summed': {'optim.learning_rate': 0.001 * BATCH,
               'optim.weight_decay': 1e-4 / BATCH},
    'base_rate': {'optim.learning_rate': 0.1},
}


def run_config(npz: str, author: str, epochs: float, overrides: dict):
  """configs/cifar10.py:faithful in the zoo's layout, from `author`'s
  weights, at a constant learning rate for `epochs` epochs."""
  c = config_lib.load_config_file(str(REPO / 'configs' / 'cifar10.py'),
                                  'faithful')
  c.data.dataset = f'npz:{npz}'
  c.model.second_pool = 'avg'
  c.train.init_from = author
  c.train.batch_size = BATCH
  c.train.num_epochs = epochs
  c.optim.schedule = 'constant'
  c.optim.warmup_epochs = 0.0
  for field, value in overrides.items():
    group, name = field.split('.')
    c[group][name] = value
  return c


def main() -> None:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', default='runs/finetune_author')
  parser.add_argument('--caffemodel',
                      default=str(DATA / 'caffe' / 'cifar10_nin.caffemodel'))
  parser.add_argument('--npz', default=str(DATA / 'cifar10' / 'cifar10.npz'))
  parser.add_argument('--epochs', type=float, default=1.0)
  parser.add_argument('--runs', default=','.join(RUNS))
  args = parser.parse_args()
  names = args.runs.split(',')
  unknown = [n for n in names if n not in RUNS]
  if unknown:
    parser.error(f'--runs: unknown {unknown}; choose from {list(RUNS)}')
  for path, flag in ((args.caffemodel, '--caffemodel'), (args.npz, '--npz')):
    if not pathlib.Path(path).exists():
      parser.error(f'{flag}={path}: no such file')
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(runtime.QuietLibraries())
  root = pathlib.Path(args.workdir)
  author = str(root / 'author')
  if not checkpoints.checkpoint_steps(author):
    caffe_zoo.import_caffemodel(args.caffemodel, 'cifar10', author,
                                dataset=f'npz:{args.npz}')
  start = inference.evaluate(author)
  print(json.dumps({'run': 'author', 'error': round(start['error'], 4),
                    'loss': round(start['loss'], 4), **provenance.header()}),
        flush=True)
  for name in names:
    c = run_config(args.npz, author, args.epochs, RUNS[name])
    result = train.train_and_evaluate(c, str(root / name))
    error = result['error']
    print(json.dumps({
        'run': name, 'overrides': RUNS[name], 'epochs': args.epochs,
        'steps': result['step'], 'error': round(error, 4),
        'loss': round(result['loss'], 4),
        'within_band': abs(error - AUTHOR_ERROR) <= BAND}), flush=True)


if __name__ == '__main__':
  sys.exit(main())
