r"""Input pipeline speed against the train step, for CIFAR-10-shaped data.

  python -m experiments.input_benchmark               # random arrays
  python -m experiments.input_benchmark --source=npz  # the shared CIFAR-10
  python -m experiments.input_benchmark --json        # one JSON object
  python -m experiments.input_benchmark --source=imagenet  # streamed JPEGs

Rows:
  train_batches  `batching.train_batches`: host gather of each global
                 batch from the in-memory float32 split + device put.
  tfds_read      `tfds_source.load_arrays` on an array_record copy of
                 --tfds_images of the same images written here (read + PNG
                 decode with Pillow, no TensorFlow): a one-off cost at start.
  train_step     the compiled CIFAR-10 NiN train step (configs/cifar10.py).

--source=imagenet writes --imagenet_images synthetic 375x500 JPEGs (smooth
colour fields plus noise, about 75 KB each at quality 90, near ImageNet's
average) as a prepared imagenet2012 copy in a temporary directory and times
the streamed splits of configs/imagenet.py (224x224 crops, one process):
  stream_train   `train_batches`: read + decode + random-resized crop + flip.
  stream_eval    `eval_batches`: read + decode + central crop.
Rows are images/s of this process with --data_workers decoding threads.

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

import jax
import numpy as np
from absl import logging

from experiments import provenance
from nin_jax import batching
from nin_jax import config_lib
from nin_jax import datasets
from nin_jax import input_pipeline
from nin_jax import readers
from nin_jax import preprocessing
from nin_jax import tfds_source
from nin_jax import train

REPO = pathlib.Path(__file__).resolve().parents[1]


def default_npz() -> str:
  root = os.environ.get('NIN_JAX_DATA_DIR', REPO.parent / 'shared' / 'data')
  return str(pathlib.Path(root) / 'cifar10' / 'cifar10.npz')


def load_images(source: str, npz: str, n: int
                ) -> tuple[np.ndarray, np.ndarray]:
  """uint8 images [n, 32, 32, 3] and int32 labels [n]."""
  if source == 'npz':
    x, y, _, _ = readers.load_npz(npz)
    return x[:n], y[:n]
  rng = np.random.default_rng(0)
  return (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
          rng.integers(0, 10, n).astype(np.int32))


def time_train_batches(split: batching.Split, batch_size: int,
                       num_batches: int, sharding) -> float:
  """Seconds per global batch of `train_batches` (gather + device put)."""
  batches = batching.train_batches(split, 0, batch_size, 0, sharding)
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
    arrays = tfds_source.load_arrays(datasets.lookup('tfds:cifar10'),
                                     data_dir)
    seconds = time.perf_counter() - start
  assert np.array_equal(arrays['train'].images, images)
  return seconds / (len(labels) + 10)


def time_train_step(batch_size: int, num_steps: int, trainer: train.Trainer,
                    split: batching.Split) -> float:
  """Seconds per compiled train step on device-resident batches."""
  state = trainer.state
  batches = batching.train_batches(split, 0, batch_size, 0,
                                         trainer.data_sharding)
  batch_list = [next(batches) for _ in range(num_steps + 2)]
  batches.close()
  for batch in batch_list[:2]:
    state, metrics = trainer.train_fn(state, batch)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for batch in batch_list[2:]:
    state, metrics = trainer.train_fn(state, batch)
  jax.block_until_ready(metrics)
  return (time.perf_counter() - start) / num_steps


def synthetic_jpeg_pixels(rng: np.random.Generator, n: int, height: int = 375,
                          width: int = 500) -> list[np.ndarray]:
  """n uint8 images [height, width, 3]: smooth colour fields plus noise."""
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
  images = []
  for _ in range(n):
    f = rng.uniform(5, 40, (3, 2))
    phase = rng.uniform(0, 6.3, 3)
    smooth = np.stack([128 + 100 * np.sin(xx / f[c, 0] + yy / f[c, 1] +
                                          phase[c]) for c in range(3)], -1)
    noise = rng.normal(0, 12, (height, width, 3))
    images.append(np.clip(smooth + noise, 0, 255).astype(np.uint8))
  return images


def time_stream(batches, num_batches: int, batch_size: int,
                warmup: int = 1) -> float:
  """Images/s of the first `num_batches` global batches after `warmup`."""
  for _ in range(warmup):
    jax.block_until_ready(next(batches))
  start = time.perf_counter()
  for _ in range(num_batches):
    jax.block_until_ready(next(batches))
  seconds = time.perf_counter() - start
  batches.close()
  return num_batches * batch_size / seconds


def imagenet_main(args: argparse.Namespace) -> dict:
  """Streamed-ImageNet rates (images/s per process) on synthetic JPEGs."""
  rng = np.random.default_rng(0)
  n = args.imagenet_images
  images = synthetic_jpeg_pixels(rng, n)
  labels = rng.integers(0, 1000, n)
  c = config_lib.sibling_config(str(REPO / 'configs' / 'x'), 'imagenet.py')
  c.data.data_workers, c.train.batch_size = args.data_workers, args.batch_size
  with tempfile.TemporaryDirectory() as data_dir:
    with contextlib.redirect_stdout(sys.stderr):  # TFDS prints its progress.
      tfds_source.write_prepared('imagenet2012', data_dir,
                                 {'train': (images, labels),
                                  'validation': (images, labels)})
    c.data.data_dir = data_dir
    dataset = input_pipeline.load_dataset(
        c.data, datasets.lookup(c.data.dataset), 1000)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    batch = args.batch_size
    train_rate = time_stream(  # Two epochs: nothing is cached between them.
        batching.train_batches(dataset.train, 0, batch, 0, sharding),
        2 * (n // batch) - 1, batch)
    eval_rate = time_stream(  # The padded last batch decodes whole too.
        batching.eval_batches(dataset.eval, batch, sharding),
        -(-n // batch) - 1, batch)
  return {'source': 'imagenet', 'num_images': n, 'image': [375, 500],
          'crop': c.data.image_size, 'batch_size': args.batch_size,
          'data_workers': dataset.train.workers,
          'rows': {'stream_train': {'images_per_sec': train_rate},
                   'stream_eval': {'images_per_sec': eval_rate}}}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--source', choices=('random', 'npz', 'imagenet'),
                      default='random')
  parser.add_argument('--npz', default=default_npz(),
                      help='CIFAR-10 .npz for --source=npz (default: '
                      '$NIN_JAX_DATA_DIR or ../shared/data).')
  parser.add_argument('--num_images', type=int, default=50_000)
  parser.add_argument('--batch_size', type=int, default=128)
  parser.add_argument('--num_batches', type=int, default=200)
  parser.add_argument('--num_steps', type=int, default=5)
  parser.add_argument('--tfds_images', type=int, default=10_000)
  parser.add_argument('--imagenet_images', type=int, default=640,
                      help='--source=imagenet: JPEGs written and streamed.')
  parser.add_argument('--data_workers', type=int, default=0,
                      help='--source=imagenet: decoding threads (0 = '
                      'os.cpu_count()).')
  parser.add_argument('--json', action='store_true')
  args = parser.parse_args()
  logging.set_verbosity(logging.WARNING)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  imagenet = args.source == 'imagenet'
  result = imagenet_main(args) if imagenet else cifar_main(args)
  if args.json:
    print(json.dumps({**result, **provenance.header()}))
  elif imagenet:
    print_imagenet(result)
  else:
    print_cifar(result)


def cifar_main(args: argparse.Namespace) -> dict:
  """Rates of the in-memory CIFAR-10 input side and of the train step."""
  images, labels = load_images(args.source, args.npz, args.num_images)
  scaled, _ = preprocessing.preprocess(images, images[:1], 'scale', 255.0)
  split = batching.Split(scaled, labels)
  c = config_lib.sibling_config(str(REPO / 'configs' / 'x'), 'cifar10.py')
  c.train.batch_size = args.batch_size
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
  return {
      'source': args.source, 'num_images': len(labels),
      'batch_size': args.batch_size, 'devices': jax.device_count(),
      'backend': jax.default_backend(), 'rows': rows,
      'input_over_step': step_s / batch_s,
  }


def print_imagenet(result: dict) -> None:
  print(f'streamed imagenet2012: {result["num_images"]} synthetic 375x500 '
        f'JPEGs, {result["crop"]}x{result["crop"]} crops, batch '
        f'{result["batch_size"]}, {result["data_workers"]} decoding threads, '
        f'one process')
  for name, row in result['rows'].items():
    print(f'{name:<15}{row["images_per_sec"]:>12.0f} images/s')


def print_cifar(result: dict) -> None:
  print(f'{result["source"]} CIFAR-10-shaped data, {result["num_images"]} '
        f'images, batch {result["batch_size"]}, {result["devices"]} '
        f'{result["backend"]} device(s)')
  print(f'{"stage":<15}{"batches/s":>12}{"images/s":>12}')
  for name, row in result['rows'].items():
    per_batch = row.get('batches_per_sec')
    per_batch = f'{per_batch:.1f}' if per_batch else '-'
    print(f'{name:<15}{per_batch:>12}{row["images_per_sec"]:>12.0f}')
  print(f'input side is {result["input_over_step"]:.0f}x faster than the '
        f'train step (need >= 10x)')

if __name__ == '__main__':
  main()
