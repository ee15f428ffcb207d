"""Streamed splits (ImageNet): JPEGs decoded, cropped and resized per batch.

A `StreamSplit` reads a prepared TFDS copy through `tfds.data_source` with the
images left encoded and decodes only the rows this process needs, with
Pillow in a pool of threads (Pillow releases the GIL). A JPEG is decoded at
the smallest DCT scale (1/2, 1/4, 1/8; `PIL.Image.draft`) that keeps the crop
at least `image_size` pixels, then the crop is resized bilinearly in one step.

- train (config.data.augment): an Inception-style random-resized crop (area
  fraction in [0.08, 1], aspect ratio log-uniform in [3/4, 4/3], the central
  crop after 10 misses) and a horizontal flip with probability 1/2.
- eval, and train without augment: the shorter side resized to
  image_size / 0.875, then the central image_size square.

Batches leave the host as uint8 [batch, size, size, 3] and are normalized on
device, in the compiled steps (input_pipeline.streamed_fitted). Each example's
random draws come from (seed, step, its row in the global batch), so they do
not depend on the process count and a resumed run crops exactly as an
uninterrupted one. batching.py reads batches ahead in a background thread.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import math
from typing import NamedTuple, Optional, Sequence

import numpy as np
from PIL import Image

from nin_jax import datasets
from nin_jax import tfds_source
from nin_jax.errors import DataError

AREA_RANGE = (0.08, 1.0)
ASPECT_RANGE = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10
EVAL_CROP_FRACTION = 0.875  # 224 of 256: the shorter side goes to size/0.875.
CROP_STREAM = 0x63726f70    # Tags the crop seeds apart from order seeds.

Box = tuple[float, float, float, float]  # top, left, height, width (pixels).


class RowKeys(NamedTuple):
  """What seeds the random crops of a training batch: the run's seed, the
  step and the rows [n] (positions in the global batch) being read."""
  seed: int
  step: int
  rows: np.ndarray


# ------------------------------------------------------------------ crops --

def sample_crop(height: int, width: int, rng: np.random.Generator,
                area_range: tuple[float, float] = AREA_RANGE,
                aspect_range: tuple[float, float] = ASPECT_RANGE,
                attempts: int = CROP_ATTEMPTS) -> Box:
  """A random crop of a [height, width] image covering an area fraction in
  `area_range` with aspect ratio (width/height) log-uniform in `aspect_range`;
  after `attempts` draws that do not fit, `fallback_crop`."""
  log_low, log_high = math.log(aspect_range[0]), math.log(aspect_range[1])
  for _ in range(attempts):
    area = height * width * rng.uniform(*area_range)
    aspect = math.exp(rng.uniform(log_low, log_high))
    w = int(round(math.sqrt(area * aspect)))
    h = int(round(math.sqrt(area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  return fallback_crop(height, width, aspect_range)


def fallback_crop(height: int, width: int,
                  aspect_range: tuple[float, float] = ASPECT_RANGE) -> Box:
  """The largest central crop whose aspect ratio is within `aspect_range`."""
  ratio = width / height
  h, w = height, width
  if ratio < aspect_range[0]:
    h = min(height, int(round(width / aspect_range[0])))
  elif ratio > aspect_range[1]:
    w = min(width, int(round(height * aspect_range[1])))
  return (height - h) // 2, (width - w) // 2, h, w


def central_crop(height: int, width: int,
                 fraction: float = EVAL_CROP_FRACTION,
                 square: bool = True) -> Box:
  """The central square of side `fraction` x the shorter side: resizing it to
  `size` equals resizing the shorter side to size/fraction, then taking the
  central size x size. Not `square`: the central `fraction` of the height and
  of the width, which resized to size x size equals Caffe's convention
  (the image squashed to size/fraction square, then its central size x size)."""
  h = w = fraction * min(height, width)
  if not square:
    h, w = fraction * height, fraction * width
  return (height - h) / 2, (width - w) / 2, h, w


def decode_crop(encoded: bytes, size: int, rng: Optional[np.random.Generator],
                flip: bool, fraction: float = EVAL_CROP_FRACTION,
                square: bool = True) -> np.ndarray:
  """uint8 [size, size, 3] from a JPEG/PNG: a random crop and flip (with
  `rng`) or the central crop (rng None; `central_crop` with `fraction` and
  `square`), resized bilinearly."""
  with Image.open(io.BytesIO(encoded)) as image:
    width, height = image.size
    top, left, h, w = (central_crop(height, width, fraction, square)
                       if rng is None else sample_crop(height, width, rng))
    # Decode at the smallest JPEG scale that keeps the crop >= size pixels.
    image.draft('RGB', (math.ceil(width * size / w),
                        math.ceil(height * size / h)))
    sx, sy = image.size[0] / width, image.size[1] / height
    if image.mode != 'RGB':
      image = image.convert('RGB')
    resized = image.resize(
        (size, size), Image.Resampling.BILINEAR,
        box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy))
  pixels = np.asarray(resized)
  if rng is not None and flip and rng.random() < 0.5:
    pixels = pixels[:, ::-1]
  return pixels


def example_rng(seed: int, step: int, row: int) -> np.random.Generator:
  """The random stream of global batch row `row` at train step `step`."""
  return np.random.default_rng([seed, step, row, CROP_STREAM])


# ------------------------------------------------------------------ split --

@dataclasses.dataclass(frozen=True, eq=False)
class StreamSplit:
  """A split read and decoded on demand: images uint8 [size, size, 3]
  (random-resized crops and flips if `augment`, else central crops as
  `central_crop(h, w, crop_fraction, square_crop)`), labels int32.

  `open()` gives a reader that decodes with `workers` threads; the pipeline
  reads it from a background thread (`background`)."""
  source: Sequence[dict]  # {'image': encoded bytes, 'label': int, ...}
  name: str               # 'tfds:imagenet2012 train', for messages.
  image_size: int
  augment: bool
  flip: bool
  workers: int
  length: int
  crop_fraction: float = EVAL_CROP_FRACTION
  square_crop: bool = True
  background = True

  def __len__(self) -> int:
    return self.length

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (self.image_size, self.image_size, 3)

  def open(self) -> StreamReader:
    return StreamReader(self)


class StreamReader:
  """Decodes the rows of a `StreamSplit` in a pool of threads (Pillow releases
  the GIL); `close()` cancels pending decodes and ends the threads."""

  def __init__(self, split: StreamSplit):
    self.split = split
    self._pool = concurrent.futures.ThreadPoolExecutor(
        split.workers, thread_name_prefix='nin_jax_decode')

  def read(self, indices: np.ndarray, keys: Optional[RowKeys]
           ) -> dict[str, np.ndarray]:
    """{'image': [n, size, size, 3] uint8, 'label': [n] int32} of the examples
    `indices` [n]; `keys` (seed, step, rows [n]) seed a training batch's crops."""
    split = self.split
    records = split.source.__getitems__([int(i) for i in indices])
    images = np.empty((len(records), *split.image_shape), np.uint8)

    def decode(i: int) -> None:
      rng = None
      if split.augment and keys is not None:
        rng = example_rng(keys.seed, keys.step, int(keys.rows[i]))
      try:
        images[i] = decode_crop(records[i]['image'], split.image_size, rng,
                                split.flip, split.crop_fraction,
                                split.square_crop)
      except Exception as e:  # pylint: disable=broad-except
        raise DataError(f'{split.name} example {int(indices[i])}: cannot '
                        f'decode its image ({type(e).__name__}: {e}).') from e

    for _ in self._pool.map(decode, range(len(records))):
      pass
    labels = np.asarray([r['label'] for r in records], np.int32)
    return {'image': images, 'label': labels}

  def cancel(self) -> None:
    """Drops pending decodes (a read in progress then fails), without waiting."""
    self._pool.shutdown(wait=False, cancel_futures=True)

  def close(self) -> None:
    self._pool.shutdown(wait=True, cancel_futures=True)


def open_splits(spec: datasets.DatasetSpec, data_dir: Optional[str],
                num_classes: int, image_size: int, augment: bool, flip: bool,
                workers: int, max_train_examples: int = 0
                ) -> tuple[StreamSplit, StreamSplit, str]:
  """The streamed train and evaluation splits of `spec` (nothing decoded yet)
  and the evaluation split's name. `flip`: flip training crops (if augment)."""
  sources = tfds_source.encoded_sources(spec, data_dir, num_classes)
  (train_name, train), (eval_name, evaluation) = sources.items()
  length = len(train)
  if max_train_examples:
    length = min(length, max_train_examples)

  def split(source, split_name, augment, n):
    return StreamSplit(source, f'{spec.config_string} {split_name}',
                       image_size, augment, flip, workers, n)

  return (split(train, train_name, augment, length),
          split(evaluation, eval_name, False, len(evaluation)), eval_name)
