"""The input pipeline: a dataset's splits in memory (or streamed), and the
global batches of a run, as dicts of arrays sharded over the devices.

What a dataset is (its source, splits, classes, whether it may be flipped or
is streamed) comes from the registry (datasets.py); readers.py, tfds_source.py
and streaming.py read the files. This module only splits, normalizes and
batches what they return.

`config.data.validation_split` holds out the paper's validation set
(`validation_holdout`); `config.data.use_extra_split` adds SVHN's 'extra' split.

Every split but ImageNet's fits in host memory (`Split`); ImageNet is decoded
batch by batch (`streaming.StreamSplit`, the same interface). The training
order is a pure function of (seed, step): batch `step` holds rows of the
permutation of epoch `step // steps_per_epoch`, so a resumed run sees exactly
the batches an uninterrupted one would. Each process materializes only its own
rows of every global batch. Augmentation (translation, flip) runs on device
inside the compiled train step, keyed by (seed, step); a streamed split crops
and flips on the host instead, keyed by (seed, step, row).

A training batch is {'image': [batch, h, w, c], 'label': [batch]}; an
evaluation batch adds 'mask' [batch], False on the padding of the last one.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import queue
import threading
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from nin_jax import datasets
from nin_jax import preprocessing
from nin_jax import readers
from nin_jax import streaming
from nin_jax import tfds_source
from nin_jax.errors import DataError  # pylint: disable=unused-import
from nin_jax.errors import check, check_count

PREFETCH_BATCHES = 2
Batch = dict[str, np.ndarray]
PREPROCESSING = ('scale', 'standardize', 'gcn_zca', 'lcn', 'none')
# Per-pixel normalizations a streamed dataset can use (applied on device).
STREAMED_PREPROCESSING = ('standardize', 'scale', 'none')
MAX_DATA_WORKERS = 1024


def validate_config(data: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first invalid field of config.data."""
  spec = datasets.lookup(data.dataset)
  check(data.preprocessing in PREPROCESSING, 'data.preprocessing',
        data.preprocessing, f'must be one of {PREPROCESSING}')
  check_count(data.max_train_examples, 'data.max_train_examples', 'all')
  check(data.translate_pixels >= 0, 'data.translate_pixels',
        data.translate_pixels, 'must be >= 0')
  check_count(data.image_size, 'data.image_size', "the preset's")
  check_count(data.data_workers, 'data.data_workers', 'one per core')
  check(data.data_workers <= MAX_DATA_WORKERS, 'data.data_workers',
        data.data_workers,
        f'must be at most {MAX_DATA_WORKERS} threads (0 = one per core)')
  if not spec.streamed:
    check(data.image_size == 0, 'data.image_size', data.image_size,
          f'only streamed datasets '
          f'({["tfds:" + n for n in datasets.STREAMED_TFDS]}) '
          f'are cropped to a size; {data.dataset} keeps its own, so set it '
          'to 0')
    return
  check(data.preprocessing in STREAMED_PREPROCESSING, 'data.preprocessing',
        data.preprocessing,
        f'{data.dataset} is streamed and normalized pixel by pixel on device, '
        f'so it needs one of {STREAMED_PREPROCESSING} (standardize: the '
        f'fixed ImageNet mean and std); {data.preprocessing} needs statistics '
        f'of the whole decoded training set')
  check(not data.validation_split, 'data.validation_split',
        data.validation_split,
        f"{data.dataset} already evaluates on its held-out 'validation' split "
        f'(its test labels are not public); set it to False')


@dataclasses.dataclass(frozen=True)
class Split:
  """Images [n, height, width, channels] float32 and labels [n] int32, in
  host memory: read in the consuming thread, nothing to open or close."""
  images: np.ndarray
  labels: np.ndarray
  background = False

  def __len__(self) -> int:
    return int(self.labels.shape[0])

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.images.shape[1:])

  def open(self) -> Split:
    return self

  def read(self, indices: np.ndarray,
           keys: Optional[streaming.RowKeys] = None) -> Batch:
    """{'image', 'label'} of examples `indices` [n]; `keys` is unused
    (in-memory splits are augmented on device)."""
    del keys
    return {'image': self.images[indices], 'label': self.labels[indices]}

  def close(self) -> None:
    pass


AnySplit = Union[Split, streaming.StreamSplit]


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A train split, an evaluation split (test or held-out validation), and
  the normalization fitted on the train split (`fitted`), which in-memory
  splits have already been through and streamed ones get on device."""
  name: str
  train: AnySplit
  eval: AnySplit
  num_classes: int
  eval_name: str = 'test'
  fitted: Optional[preprocessing.Fitted] = None

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return self.train.image_shape

  @property
  def spec(self) -> datasets.DatasetSpec:
    return datasets.lookup(self.name)


# ----------------------------------------------------------------- splits --

@dataclasses.dataclass(frozen=True)
class RawData:
  """Unprocessed splits: images [n, height, width, channels], labels [n] int32.

  `x_extra`/`y_extra`: SVHN's 'extra' split when config.data.use_extra_split.
  `max_value`: the largest pixel value (255 for uint8, 16 for sklearn digits).
  """
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  max_value: float
  x_extra: Optional[np.ndarray] = None
  y_extra: Optional[np.ndarray] = None


def check_labels(raw: RawData, num_classes: int, source: str) -> None:
  """Raises DataError if a label is outside [0, num_classes)."""
  for key, y in (('train', raw.y_train), ('test', raw.y_test),
                 ('extra', raw.y_extra)):
    if y is not None:
      _check_label_range(source, key, y, num_classes)


def _check_label_range(source: str, key: str, y: np.ndarray,
                       num_classes: int) -> None:
  if y.size and (y.min() < 0 or y.max() >= num_classes):
    raise DataError(f'{source}: {key} labels span [{y.min()}, {y.max()}] '
                    f'but the preset has {num_classes} classes; labels '
                    f'must be in [0, {num_classes - 1}].')


def load_raw(data: ml_collections.ConfigDict) -> RawData:
  """The unprocessed splits of `data.dataset`."""
  spec = datasets.lookup(data.dataset)
  if data.use_extra_split and not spec.extra_splits:
    raise DataError(f'config.data.use_extra_split=True but {data.dataset} '
                    f"has no extra split; only 'tfds:svhn_cropped' has one. "
                    f'Set it to False.')
  if spec.source == 'sklearn':
    return RawData(*readers.load_digits(), max_value=spec.max_value)
  if spec.source == 'npz':
    return RawData(*readers.load_npz(os.path.expanduser(spec.name)),
                   max_value=spec.max_value)
  splits = tfds_source.load_arrays(spec.name, data.data_dir or None,
                                   with_extra=data.use_extra_split)
  extra = splits.get('extra')
  return RawData(splits['train'].images, splits['train'].labels,
                 splits['test'].images, splits['test'].labels,
                 spec.max_value,
                 extra.images if extra else None,
                 extra.labels if extra else None)


CIFAR_VALIDATION_SIZE = 10_000
SVHN_VALIDATION_PER_CLASS = {'train': 400, 'extra': 200}
VALIDATION_SEED = 0  # Fixed: the held-out set never depends on config.train.seed.


def _per_class_holdout(y: np.ndarray, per_class: int,
                       rng: np.random.Generator) -> np.ndarray:
  """A bool mask [n] choosing `per_class` random examples of every class."""
  mask = np.zeros(y.shape[0], bool)
  for cls in np.unique(y):
    mask[rng.permutation(np.flatnonzero(y == cls))[:per_class]] = True
  return mask


def validation_holdout(raw: RawData, dataset: str
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                  np.ndarray]:
  """The paper's held-out validation set: (x_train, y_train, x_val, y_val).

  SVHN: 400 random examples per class from train plus 200 per class from
  extra (when loaded); everything else of train and extra is trained on.
  Others (CIFAR): the last 10,000 training images, or the last sixth of a
  training set smaller than 40,000.
  """
  if raw.x_extra is not None or datasets.lookup(dataset).holdout == 'per_class':
    rng = np.random.default_rng(VALIDATION_SEED)
    parts = [('train', raw.x_train, raw.y_train)]
    if raw.x_extra is not None:
      parts.append(('extra', raw.x_extra, raw.y_extra))
    train, val = [], []
    for name, x, y in parts:
      held = _per_class_holdout(y, SVHN_VALIDATION_PER_CLASS[name], rng)
      train.append((x[~held], y[~held]))
      val.append((x[held], y[held]))
    return (*_concat(train), *_concat(val))
  n = raw.x_train.shape[0]
  n_val = CIFAR_VALIDATION_SIZE if n >= 40_000 else max(1, n // 6)
  if n_val >= n:
    raise DataError(f'{dataset}: {n} training images are too few to hold out '
                    f'a validation set; set config.data.validation_split=False.')
  return (raw.x_train[:-n_val], raw.y_train[:-n_val], raw.x_train[-n_val:],
          raw.y_train[-n_val:])


def _concat(parts: list[tuple[np.ndarray, np.ndarray]]
            ) -> tuple[np.ndarray, np.ndarray]:
  if len(parts) == 1:
    return parts[0]
  return (np.concatenate([x for x, _ in parts]),
          np.concatenate([y for _, y in parts]))


def split_raw(data: ml_collections.ConfigDict, raw: RawData
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
  """(x_train, y_train, x_eval, y_eval, eval name) of the run: the held-out
  validation set or the test set, extra and max_train_examples applied."""
  eval_name = 'test'
  if data.validation_split:
    x_train, y_train, x_eval, y_eval = validation_holdout(raw, data.dataset)
    eval_name = 'validation'
  else:
    parts = [(raw.x_train, raw.y_train)]
    if raw.x_extra is not None:
      parts.append((raw.x_extra, raw.y_extra))
    (x_train, y_train), x_eval, y_eval = _concat(parts), raw.x_test, raw.y_test
  if data.max_train_examples:
    x_train = x_train[:data.max_train_examples]
    y_train = y_train[:data.max_train_examples]
  return x_train, y_train, x_eval, y_eval, eval_name


def load_dataset(data: ml_collections.ConfigDict, num_classes: int,
                 streamed_size: int = 0) -> Dataset:
  """Loads, splits and preprocesses `data.dataset` on the host. A streamed
  dataset is only opened: its batches are decoded as they are needed, cropped
  to squares of `streamed_size` (config_lib.streamed_image_size), by default
  config.data.image_size."""
  if datasets.lookup(data.dataset).streamed:
    size = streamed_size or data.image_size
    if size <= 0:
      raise ValueError(f'{data.dataset} is streamed: give the side of its crops')
    return load_streamed(data, num_classes, size)
  raw = load_raw(data)
  check_labels(raw, num_classes, data.dataset)
  x_train, y_train, x_test, y_test, eval_name = split_raw(data, raw)
  max_value = raw.max_value
  del raw
  fitted = preprocessing.fit(x_train, data.preprocessing, max_value,
                             data.cache_dir or None)
  train = preprocessing.apply(fitted, x_train)
  test = preprocessing.apply(fitted, x_test)
  logging.info('Dataset %s: %d train, %d %s images of shape %s', data.dataset,
               len(y_train), len(y_test), eval_name, train.shape[1:])
  return Dataset(data.dataset, Split(train, y_train), Split(test, y_test),
                 num_classes, eval_name, fitted)


def load_streamed(data: ml_collections.ConfigDict, num_classes: int,
                  image_size: int) -> Dataset:
  """The streamed train and evaluation splits of `data.dataset`, nothing decoded
  yet, cropped to `image_size` squares."""
  spec = datasets.lookup(data.dataset)
  train, evaluation, eval_name = streaming.open_splits(
      spec, data.data_dir or None, num_classes, image_size, bool(data.augment),
      flip_allowed(data), data.data_workers or os.cpu_count() or 1,
      data.max_train_examples)
  return Dataset(data.dataset, train, evaluation, num_classes, eval_name,
                 streamed_fitted(data))


SPLITS = ('test', 'validation', 'train')


def load_raw_test(data: ml_collections.ConfigDict
                  ) -> tuple[np.ndarray, np.ndarray, float]:
  """The unprocessed test split of `data.dataset` alone, no training data read:
  images [n, h, w, c], labels [n] int32 and the largest pixel value."""
  spec = datasets.lookup(data.dataset)
  if spec.source == 'sklearn':
    _, _, x_test, y_test = readers.load_digits()
    return x_test, y_test, spec.max_value
  if spec.source == 'npz':
    return (*readers.load_npz_split(os.path.expanduser(spec.name), 'test'),
            spec.max_value)
  test = tfds_source.load_arrays(spec.name, data.data_dir or None,
                                 splits=('test',))['test']
  return test.images, test.labels, spec.max_value


def load_split(data: ml_collections.ConfigDict, split: str,
               fitted: preprocessing.Fitted, num_classes: int) -> Split:
  """One split of an in-memory `data.dataset`, normalized with `fitted` (never
  refitted): 'test' (only the test arrays are read), 'validation' (the
  held-out set of a config.data.validation_split run) or 'train' (the examples
  the run trained on)."""
  if split not in SPLITS:
    raise DataError(f'split {split!r}: expected one of {SPLITS}.')
  if split == 'validation' and not data.validation_split:
    raise DataError(f'{data.dataset}: this run trained on the whole training '
                    f"set (config.data.validation_split=False), so it held out no "
                    f"'validation' split; use 'test'.")
  if split == 'test':
    x, y, _ = load_raw_test(data)
  else:
    raw = load_raw(data)
    x_train, y_train, x_eval, y_eval, _ = split_raw(data, raw)
    x, y = (x_train, y_train) if split == 'train' else (x_eval, y_eval)
  _check_label_range(data.dataset, split, y, num_classes)
  return Split(preprocessing.apply(fitted, x), y)


def class_names(data: ml_collections.ConfigDict,
                num_classes: int) -> tuple[str, ...]:
  """The names of the classes: TFDS's label names, the registry's (CIFAR-10's
  for a TFDS or npz copy of it), else the class numbers."""
  spec = datasets.lookup(data.dataset)
  if spec.source == 'tfds':
    names = tfds_source.label_names(spec.name, data.data_dir or None)
    if len(names) == num_classes:
      return names
  if len(spec.class_names) == num_classes:
    return spec.class_names
  return tuple(str(i) for i in range(num_classes))


# ---------------------------------------------------------------- batches --

def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Full batches per epoch (the remainder of each permutation is dropped)."""
  return max(1, num_examples // batch_size)


@functools.lru_cache(maxsize=2)
def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The example order of `epoch`: a function of (seed, epoch) alone."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def train_batch_indices(seed: int, step: int, batch_size: int,
                        num_examples: int) -> np.ndarray:
  """Indices [batch_size] of global training batch `step`."""
  if num_examples < batch_size:
    raise ValueError(f'a batch of {batch_size} from {num_examples} examples '
                     '(config_lib.check_batch_size refuses such configs)')
  epoch, i = divmod(step, steps_per_epoch(num_examples, batch_size))
  return epoch_permutation(seed, epoch, num_examples)[i * batch_size:
                                                       (i + 1) * batch_size]


def process_rows(global_batch: int) -> slice:
  """This process's rows of a global batch (contiguous, in process order)."""
  local = global_batch // jax.process_count()
  start = jax.process_index() * local
  return slice(start, start + local)


_END = object()


class Prefetcher:
  """Iterates `make_batch(key)` over `keys` in a background thread, up to
  `depth` batches ahead. An exception in `make_batch` is raised by `next`.
  `close()` calls `cancel` (to drop work in progress), then returns once the
  thread has ended: the thread is a daemon and never outlives the iterator."""

  def __init__(self, make_batch: Callable[[Any], Any], keys: Iterable[Any],
               cancel: Callable[[], None] = lambda: None,
               depth: int = PREFETCH_BATCHES):
    self._queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._cancel = cancel
    self._thread = threading.Thread(
        target=self._produce, args=(make_batch, iter(keys)),
        name='nin_jax_prefetch', daemon=True)
    self._thread.start()

  def _produce(self, make_batch: Callable, keys: Iterator[Any]) -> None:
    try:
      for key in keys:
        if not self._put(make_batch(key)):
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
    self._stop.set()
    self._cancel()
    self._thread.join()


class Batches:
  """Global batches: this process's rows, read from `split` by `host_batch(
  reader, key)` for each key, as dicts of global arrays sharded by `sharding`.
  A streamed split is read ahead in a background thread. `close()` ends every
  thread (also before the first batch, unlike a generator's)."""

  def __init__(self, split: AnySplit, sharding: jax.sharding.Sharding,
               host_batch: Callable[[Any, Any], Batch], keys: Iterable[Any]):
    self._sharding = sharding
    self._reader = split.open()
    make = functools.partial(host_batch, self._reader)
    if split.background:
      self._host = Prefetcher(make, keys,
                              cancel=getattr(self._reader, 'cancel',
                                             lambda: None))
    else:
      self._host = map(make, keys)

  def __iter__(self) -> Batches:
    return self

  def __next__(self) -> dict[str, jax.Array]:
    try:
      batch = next(self._host)
    except BaseException:  # The end, or a read that failed: stop threads.
      self.close()
      raise
    return {k: jax.make_array_from_process_local_data(self._sharding, v)
            for k, v in batch.items()}

  def close(self) -> None:
    if isinstance(self._host, Prefetcher):
      self._host.close()
    self._reader.close()

  def __enter__(self) -> Batches:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def train_batches(split: AnySplit, seed: int, batch_size: int,
                  start_step: int, sharding: jax.sharding.Sharding) -> Batches:
  """{'image', 'label'} global batches from `start_step` on, sharded by
  `sharding`. Only this process's rows are read (gathered from host memory,
  or decoded and cropped with draws keyed by (seed, step, row))."""
  rows = np.arange(batch_size)[process_rows(batch_size)]

  def host_batch(reader, step: int) -> Batch:
    idx = train_batch_indices(seed, step, batch_size, len(split))[rows]
    return reader.read(idx, streaming.RowKeys(seed, step, rows))

  return Batches(split, sharding, host_batch, itertools.count(start_step))


def eval_batches(split: AnySplit, batch_size: int,
                 sharding: jax.sharding.Sharding) -> Batches:
  """{'image', 'label', 'mask'} batches covering every example once; the last
  batch is padded and its padding masked out (mask False). A `batch_size`
  beyond the split (rounded up to the device count) shrinks to it: the
  padding would only be masked out."""
  n = len(split)
  devices = len(sharding.device_set)
  batch_size = min(batch_size, -(-n // devices) * devices)
  rows = process_rows(batch_size)

  def host_batch(reader, start: int) -> Batch:
    idx = np.arange(start, start + batch_size)[rows]
    mask = idx < n
    return {**reader.read(np.where(mask, idx, 0), None), 'mask': mask}

  return Batches(split, sharding, host_batch, range(0, n, batch_size))


@dataclasses.dataclass(frozen=True)
class Pipeline:
  """The batches of one run: `train_iter(start_step)` and `eval_iter()`,
  each an iterator to close when done (or use as a context manager)."""
  dataset: Dataset
  seed: int
  batch_size: int
  eval_batch_size: int
  sharding: jax.sharding.Sharding

  def train_iter(self, start_step: int = 0) -> Batches:
    return train_batches(self.dataset.train, self.seed, self.batch_size,
                         start_step, self.sharding)

  def eval_iter(self) -> Batches:
    """The evaluation split, each example once."""
    return eval_batches(self.dataset.eval, self.eval_batch_size,
                        self.sharding)


# ----------------------------------------------------------- augmentation --

def augment(images: jax.Array, key: jax.Array, translate: int,
            flip: bool) -> jax.Array:
  """Random translation by up to `translate` pixels (zero padding, then a crop
  back to size) and, if `flip`, a horizontal flip with probability 1/2.

  `images` [batch, height, width, channels]; each example draws from its own
  key folded from `key` and its row, so results do not depend on sharding.
  """
  batch, height, width, _ = images.shape
  keys = jax.random.split(key, batch)

  def one(image, k):
    k_shift, k_flip = jax.random.split(k)
    if translate > 0:
      padded = jnp.pad(image, ((translate, translate), (translate, translate),
                               (0, 0)))
      dy, dx = jax.random.randint(k_shift, (2,), 0, 2 * translate + 1)
      image = jax.lax.dynamic_slice(padded, (dy, dx, 0),
                                    (height, width, image.shape[-1]))
    if flip:
      image = jnp.where(jax.random.bernoulli(k_flip), image[:, ::-1], image)
    return image

  return jax.vmap(one)(images, keys)


def flip_allowed(data: ml_collections.ConfigDict) -> bool:
  """config.data.flip, unless the registry says a flip changes the class (digits)."""
  return bool(data.flip) and datasets.lookup(data.dataset).flip


def device_augment_fn(data: ml_collections.ConfigDict
                      ) -> Optional[Callable[[jax.Array, jax.Array],
                                             jax.Array]]:
  """`augment` as the train step applies it, or None: config.data.augment is off,
  or the dataset is streamed (its host crops and flips while decoding)."""
  if not data.augment or datasets.lookup(data.dataset).streamed:
    return None
  return functools.partial(augment, translate=data.translate_pixels,
                           flip=flip_allowed(data))


def device_normalize_fn(data: ml_collections.ConfigDict
                        ) -> Optional[Callable[[jax.Array], jax.Array]]:
  """For a streamed dataset (uint8 batches) the normalization of
  config.data.preprocessing, run on device first in both steps; None otherwise
  (in-memory splits are normalized on the host once)."""
  if not datasets.lookup(data.dataset).streamed:
    return None
  return preprocessing.normalizer(streamed_fitted(data))


def streamed_fitted(data: ml_collections.ConfigDict) -> preprocessing.Fitted:
  """What a streamed dataset's config.data.preprocessing stands for: 'standardize'
  with the registry's fixed mean and std, or pixels scaled to [0, 1]."""
  spec = datasets.lookup(data.dataset)
  if data.preprocessing == 'standardize':
    return preprocessing.Fitted(
        'standardize', spec.max_value,
        {'mean': np.asarray(spec.mean), 'std': np.asarray(spec.std)})
  return preprocessing.Fitted('scale', spec.max_value)


def describe(dataset: Dataset) -> Optional[str]:
  return (f'{dataset.name}: {len(dataset.train)} train / '
          f'{len(dataset.eval)} {dataset.eval_name}, images '
          f'{dataset.image_shape}, {dataset.num_classes} classes')
