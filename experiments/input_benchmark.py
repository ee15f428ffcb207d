r"""Input pipeline speed against the train step, for CIFAR-10-shaped data.

  python experiments/input_benchmark.py               # random arrays
  python experiments/input_benchmark.py --source=npz  # the shared CIFAR-10
  python experiments/input_benchmark.py --json        # one JSON object

Rows:
  train_batches  `input_pipeline.train_batches`: host gather of each global
                 batch from the in-memory float32 split + device put.
  tfds_read      `tfds_source.load_arrays` on an array_record copy of
                 --tfds_images of the same images written here (read + PNG
                 decode with Pillow, no TensorFlow): a one-off cost at start.
  train_step     the compiled CIFAR-10 NiN train step (configs/cifar10.py).

The input side must be at least 10x faster than the train step. Run it on an
otherwise idle machine: the numbers are wall-clock rates.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import numpy as np
from absl import logging

from nin_jax import config_lib
from nin_jax import input_pipeline
from nin_jax import preprocessing
from nin_jax import tfds_source
from nin_jax import train


def default_npz() -> str:
  root = os.environ.get('NIN_JAX_DATA_DIR', REPO.parent / 'shared' / 'data')
  return str(pathlib.Path(root) / 'cifar10' / 'cifar10.npz')


def load_images(source: str, npz: str, n: int
                ) -> tuple[np.ndarray, np.ndarray]:
  """uint8 images [n, 32, 32, 3] and int32 labels [n]."""
  if source == 'npz':
    x, y, _, _ = input_pipeline.load_npz(npz)
    return x[:n], y[:n]
  rng = np.random.default_rng(0)
  return (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
          rng.integers(0, 10, n).astype(np.int32))


def time_train_batches(split: input_pipeline.Split, batch_size: int,
                       num_batches: int, sharding) -> float:
  """Seconds per global batch of `train_batches` (gather + device put)."""
  batches = input_pipeline.train_batches(split, 0, batch_size, 0, sharding)
  for _ in range(5):
    jax.block_until_ready(next(batches))
  start = time.perf_counter()
  for _ in range(num_batches):
    jax.block_until_ready(next(batches))
  return (time.perf_counter() - start) / num_batches


def time_tfds_read(images: np.ndarray, labels: np.ndarray) -> float:
  """Seconds per image of reading an array_record copy into arrays."""
  with tempfile.TemporaryDirectory() as data_dir:
    with contextlib.redirect_stdout(sys.stderr):  # TFDS prints its progress.
      tfds_source.write_prepared('cifar10', data_dir,
                                 {'train': (images, labels),
                                  'test': (images[:10], labels[:10])})
    start = time.perf_counter()
    arrays = tfds_source.load_arrays('cifar10', data_dir)
    seconds = time.perf_counter() - start
  assert np.array_equal(arrays['train'].images, images)
  return seconds / (len(labels) + 10)


def time_train_step(batch_size: int, num_steps: int, trainer: train.Trainer,
                    split: input_pipeline.Split) -> float:
  """Seconds per compiled train step on device-resident batches."""
  state = trainer.state
  batches = input_pipeline.train_batches(split, 0, batch_size, 0,
                                         trainer.data_sharding)
  batch_list = [next(batches) for _ in range(num_steps + 2)]
  for images, labels in batch_list[:2]:
    state, metrics = trainer.train_fn(state, images, labels)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for images, labels in batch_list[2:]:
    state, metrics = trainer.train_fn(state, images, labels)
  jax.block_until_ready(metrics)
  return (time.perf_counter() - start) / num_steps


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--source', choices=('random', 'npz'), default='random')
  parser.add_argument('--npz', default=default_npz(),
                      help='CIFAR-10 .npz for --source=npz (default: '
                      '$NIN_JAX_DATA_DIR or ../shared/data).')
  parser.add_argument('--num_images', type=int, default=50_000)
  parser.add_argument('--batch_size', type=int, default=128)
  parser.add_argument('--num_batches', type=int, default=200)
  parser.add_argument('--num_steps', type=int, default=5)
  parser.add_argument('--tfds_images', type=int, default=10_000)
  parser.add_argument('--json', action='store_true')
  args = parser.parse_args()
  logging.set_verbosity(logging.WARNING)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()

  images, labels = load_images(args.source, args.npz, args.num_images)
  scaled, _ = preprocessing.preprocess(images, images[:1], 'scale', 255.0)
  split = input_pipeline.Split(scaled, labels)
  c = config_lib.sibling_config(str(REPO / 'configs' / 'x'), 'cifar10.py')
  c.batch_size = args.batch_size
  trainer = train.create_trainer(c, (32, 32, 3), len(labels))

  batch_s = time_train_batches(split, args.batch_size, args.num_batches,
                               trainer.data_sharding)
  read_s = time_tfds_read(images[:args.tfds_images], labels[:args.tfds_images])
  step_s = time_train_step(args.batch_size, args.num_steps, trainer, split)
  rows = {
      'train_batches': {'batches_per_sec': 1 / batch_s,
                        'images_per_sec': args.batch_size / batch_s},
      'tfds_read': {'images_per_sec': 1 / read_s},
      'train_step': {'batches_per_sec': 1 / step_s,
                     'images_per_sec': args.batch_size / step_s},
  }
  result = {
      'source': args.source, 'num_images': len(labels),
      'batch_size': args.batch_size, 'devices': jax.device_count(),
      'backend': jax.default_backend(), 'rows': rows,
      'input_over_step': step_s / batch_s,
  }
  if args.json:
    print(json.dumps(result))
    return
  print(f'{args.source} CIFAR-10-shaped data, {len(labels)} images, batch '
        f'{args.batch_size}, {jax.device_count()} {jax.default_backend()} '
        f'device(s)')
  print(f'{"stage":<15}{"batches/s":>12}{"images/s":>12}')
  for name, row in rows.items():
    per_batch = row.get('batches_per_sec')
    per_batch = f'{per_batch:.1f}' if per_batch else '-'
    print(f'{name:<15}{per_batch:>12}{row["images_per_sec"]:>12.0f}')
  print(f'input side is {result["input_over_step"]:.0f}x faster than the '
        f'train step (need >= 10x)')


if __name__ == '__main__':
  main()
