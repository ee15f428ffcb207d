"""Streamed splits (ImageNet): JPEGs decoded, cropped and resized per batch.

A `StreamSplit` reads a prepared TFDS copy through `tfds.data_source` with the
images left encoded and decodes only the rows this process needs, with
Pillow in a pool of threads (Pillow releases the GIL). A JPEG is decoded at
the smallest DCT scale (1/2, 1/4, 1/8; `PIL.Image.draft`) that keeps the crop
at least `image_size` pixels, then the crop is resized bilinearly in one step.

- train (config.augment): an Inception-style random-resized crop (area
  fraction in [0.08, 1], aspect ratio log-uniform in [3/4, 4/3], the central
  crop after 10 misses) and a horizontal flip with probability 1/2.
- eval, and train without augment: the shorter side resized to
  image_size / 0.875, then the central image_size square.

Batches leave the host as uint8 [batch, size, size, 3] and are normalized on
device (input_pipeline.device_normalize_fn). Each example's random draws come
from (seed, step, its row in the global batch), so they do not depend on the
process count and a resumed run crops exactly as an uninterrupted one.
`Prefetcher` makes the next batches in a background thread while the device
trains on the current one.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import math
import os
import queue
import threading
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import ml_collections
import numpy as np
from PIL import Image

from nin_jax import config_lib
from nin_jax import input_pipeline

DataError = input_pipeline.DataError

AREA_RANGE = (0.08, 1.0)
ASPECT_RANGE = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10
EVAL_CROP_FRACTION = 0.875  # 224 of 256: the shorter side goes to size/0.875.
PREFETCH_BATCHES = 2
CROP_STREAM = 0x63726f70    # Tags the crop seeds apart from order seeds.

Box = tuple[float, float, float, float]  # top, left, height, width (pixels).


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


# ------------------------------------------------------------- prefetcher --

_END = object()


class Prefetcher:
  """Iterates `make_batch(key, map_fn)` over `keys` in a background thread, up
  to `depth` batches ahead; `map_fn` maps over a pool of `workers` threads.

  An exception in `make_batch` is raised by `next`. `close()` (called on
  exhaustion, on error and by `train_batches`/`eval_batches`) stops the
  threads: the producer is a daemon and pending decodes are cancelled, so
  nothing outlives the iterator or delays the interpreter's exit.
  """

  def __init__(self, make_batch: Callable[[Any, Callable], Any],
               keys: Iterable[Any], workers: int,
               depth: int = PREFETCH_BATCHES):
    self._pool = concurrent.futures.ThreadPoolExecutor(
        workers, thread_name_prefix='nin_jax_decode')
    self._queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._thread = threading.Thread(
        target=self._produce, args=(make_batch, iter(keys)),
        name='nin_jax_prefetch', daemon=True)
    self._thread.start()

  def _produce(self, make_batch: Callable, keys: Iterator[Any]) -> None:
    try:
      for key in keys:
        if not self._put(make_batch(key, self._pool.map)):
          return
      self._put(_END)
    except BaseException as e:  # pylint: disable=broad-except
      self._put(e)  # Raised in the consuming thread.

  def _put(self, item: Any) -> bool:
    """Queues `item` unless closed first; False if closed."""
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        pass
    return False

  def __iter__(self) -> Prefetcher:
    return self

  def __next__(self) -> Any:
    if self._stop.is_set():
      raise StopIteration
    item = self._queue.get()
    if item is _END or isinstance(item, BaseException):
      self.close()
      if item is _END:
        raise StopIteration
      raise item
    return item

  def close(self) -> None:
    """Stops producing; returns once the background threads have ended."""
    self._stop.set()
    self._pool.shutdown(wait=False, cancel_futures=True)
    self._thread.join()
    self._pool.shutdown(wait=True)


# ------------------------------------------------------------------ split --

@dataclasses.dataclass(frozen=True, eq=False)
class StreamSplit:
  """A split read and decoded on demand: images uint8 [size, size, 3]
  (random-resized crops and flips if `augment`, else central crops as
  `central_crop(h, w, crop_fraction, square_crop)`), labels int32. The same
  interface as `input_pipeline.Split`."""
  source: Sequence[dict]  # {'image': encoded bytes, 'label': int, ...}
  name: str               # 'tfds:imagenet2012 train', for messages.
  image_size: int
  augment: bool
  flip: bool
  workers: int
  length: int
  crop_fraction: float = EVAL_CROP_FRACTION
  square_crop: bool = True

  def __len__(self) -> int:
    return self.length

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (self.image_size, self.image_size, 3)

  def read(self, indices: np.ndarray, keys: Optional[input_pipeline.RowKeys],
           map_fn: Callable = map) -> tuple[np.ndarray, np.ndarray]:
    """Decoded images [n, size, size, 3] uint8 and labels [n] int32 of the
    examples `indices` [n]; `keys` (seed, step, rows [n]) seed the random
    crops of a training batch."""
    records = self.source.__getitems__([int(i) for i in indices])
    images = np.empty((len(records), *self.image_shape), np.uint8)

    def decode(i: int) -> None:
      rng = None
      if self.augment and keys is not None:
        rng = example_rng(keys.seed, keys.step, int(keys.rows[i]))
      try:
        images[i] = decode_crop(records[i]['image'], self.image_size, rng,
                                self.flip, self.crop_fraction,
                                self.square_crop)
      except Exception as e:  # pylint: disable=broad-except
        raise DataError(f'{self.name} example {int(indices[i])}: cannot '
                        f'decode its image ({type(e).__name__}: {e}).') from e

    for _ in map_fn(decode, range(len(records))):
      pass
    labels = np.asarray([r['label'] for r in records], np.int32)
    return images, labels

  def batches(self, make_batch: Callable[[Any, Callable], Any],
              keys: Iterable[Any]) -> Prefetcher:
    """`make_batch(key, map_fn)` for each key, made ahead in the background."""
    return Prefetcher(make_batch, keys, self.workers)


def load_dataset(c: ml_collections.ConfigDict,
                 num_classes: int) -> input_pipeline.Dataset:
  """The streamed train and evaluation splits of `c.dataset` (nothing decoded
  yet)."""
  from nin_jax import tfds_source  # pylint: disable=g-import-not-at-top
  _, name = config_lib.parse_dataset(c.dataset)
  sources = tfds_source.encoded_sources(name, c.data_dir or None, num_classes,
                                        with_extra=c.use_extra_split)
  (train_name, train), (eval_name, evaluation) = sources.items()
  size = config_lib.streamed_image_size(c)
  workers = c.data_workers or os.cpu_count() or 1
  length = len(train)
  if c.max_train_examples:
    length = min(length, c.max_train_examples)

  def split(source, split_name, augment, n):
    return StreamSplit(source, f'{c.dataset} {split_name}', size, augment,
                       input_pipeline.flip_allowed(c), workers, n)

  return input_pipeline.Dataset(
      c.dataset, split(train, train_name, bool(c.augment), length),
      split(evaluation, eval_name, False, len(evaluation)), num_classes,
      eval_name, input_pipeline.streamed_fitted(c))
