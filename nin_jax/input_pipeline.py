"""Datasets for NiN: sources, splits, deterministic batches, device augmentation.

Sources (config.dataset):
- 'sklearn:digits': scikit-learn's 1,797 8x8 digits (embedded, no download),
  with a fixed, seeded, stratified 80/20 train/test split.
- 'npz:PATH': a Keras-layout .npz (x_train, y_train, x_test, y_test; uint8
  images, integer labels), read with allow_pickle=False.
- 'tfds:NAME': a prepared TFDS dataset read through `tfds.data_source`
  (ArrayRecord, no TensorFlow needed); see tfds_source.py.

`config.validation_split` holds out the paper's validation set
(`validation_holdout`); `config.use_extra_split` adds SVHN's 'extra' split.

Every split but ImageNet's fits in host memory (`Split`); ImageNet is decoded
batch by batch (`streaming.StreamSplit`, the same interface). The training
order is a pure function of (seed, step): batch `step` holds rows of the
permutation of epoch `step // steps_per_epoch`, so a resumed run sees exactly
the batches an uninterrupted one would. Each process materializes only its own
rows of every global batch. Augmentation (translation, flip) runs on device
inside the compiled train step, keyed by (seed, step); a streamed split crops
and flips on the host instead, keyed by (seed, step, row).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import zipfile
from typing import (TYPE_CHECKING, Any, Callable, Iterable, Iterator,
                    NamedTuple, Optional, Union)

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from nin_jax import config_lib
from nin_jax import preprocessing

if TYPE_CHECKING:
  from nin_jax import streaming  # pylint: disable=g-bad-import-order

# The fixed ImageNet statistics of streamed datasets, pixels scaled to [0, 1].
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The largest raw pixel value: uint8 images, scikit-learn's digits.
PIXEL_MAX_VALUE = 255.0
DIGITS_MAX_VALUE = 16.0
CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog',
                   'frog', 'horse', 'ship', 'truck')


class RowKeys(NamedTuple):
  """What seeds the host augmentation of a training batch: the run's seed,
  the step and the rows [n] (positions in the global batch) being read."""
  seed: int
  step: int
  rows: np.ndarray


@dataclasses.dataclass(frozen=True)
class Split:
  """Images [n, height, width, channels] float32 and labels [n] int32."""
  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return int(self.labels.shape[0])

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.images.shape[1:])

  def read(self, indices: np.ndarray, keys: Optional[RowKeys],
           map_fn: Callable = map) -> tuple[np.ndarray, np.ndarray]:
    """Images [n, h, w, c] and labels [n] of examples `indices` [n]; in
    memory, so `keys` (augmentation runs on device) and `map_fn` are unused."""
    del keys, map_fn
    return self.images[indices], self.labels[indices]

  def batches(self, make_batch: Callable[[Any, Callable], Any],
              keys: Iterable[Any]) -> Iterator[Any]:
    """`make_batch(key, map)` for each key, made when asked for."""
    return (make_batch(key, map) for key in keys)


AnySplit = Union[Split, 'streaming.StreamSplit']


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


class DataError(ValueError):
  """A dataset file or directory cannot be used; the message says why and how."""


# ---------------------------------------------------------------- sources --

def load_digits(seed: int = 0, test_fraction: float = 0.2
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """scikit-learn's 8x8 digits: (x_train, y_train, x_test, y_test), pixels 0..16."""
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  digits = sk_datasets.load_digits()
  images = digits.images.astype(np.float32)[..., None]
  labels = digits.target.astype(np.int32)
  rng = np.random.default_rng(seed)
  train_idx, test_idx = [], []
  for cls in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == cls))
    n_test = int(round(len(idx) * test_fraction))
    test_idx.append(idx[:n_test])
    train_idx.append(idx[n_test:])
  train_idx = np.sort(np.concatenate(train_idx))
  test_idx = np.sort(np.concatenate(test_idx))
  return (images[train_idx], labels[train_idx], images[test_idx],
          labels[test_idx])


NPZ_KEYS = ('x_train', 'y_train', 'x_test', 'y_test')


def _read_npz(path: str, keys: tuple[str, ...] = NPZ_KEYS
              ) -> list[np.ndarray]:
  """The arrays `keys` of `path`, read without pickle, or DataError."""
  if not os.path.isfile(path):
    raise DataError(f'config.dataset=npz:{path}: no such file; point it at a '
                    f'.npz with keys {NPZ_KEYS}.')
  with open(path, 'rb') as f:
    magic = f.read(6)
  if magic.startswith(b'\x93NUMPY'):
    raise DataError(f'{path}: is a single .npy array, not a .npz archive; '
                    f'save one with np.savez(path, x_train=..., y_train=..., '
                    f'x_test=..., y_test=...).')
  if not magic.startswith(b'PK'):
    raise DataError(f'{path}: not a .npz (zip) archive; save one with '
                    f'np.savez(path, x_train=..., y_train=..., x_test=..., '
                    f'y_test=...).')
  try:
    with np.load(path, allow_pickle=False) as f:
      missing = [k for k in keys if k not in f.files]
      if missing:
        raise DataError(f'{path}: missing keys {missing}; found {f.files}, '
                        f'need {keys}.')
      return [f[k] for k in keys]
  except ValueError as e:
    if isinstance(e, DataError):
      raise
    raise DataError(f'{path}: cannot be read without pickle ({e}); save the '
                    f'arrays as plain numeric arrays.') from e
  except (OSError, EOFError, zipfile.BadZipFile) as e:
    raise DataError(f'{path}: not a readable .npz file ({e}).') from e


def _check_images(path: str, key: str, x: np.ndarray) -> np.ndarray:
  """`x` as [n, height, width, channels] uint8, or a DataError naming `key`."""
  if x.dtype != np.uint8:
    raise DataError(f'{path}: {key} has dtype {x.dtype}; expected uint8 '
                    f'pixels 0..255.')
  if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] not in (1, 3)):
    hint = (' (channels first? transpose to [n, height, width, channels])'
            if x.ndim == 4 and x.shape[1] in (1, 3) else '')
    raise DataError(f'{path}: {key} has shape {x.shape}; expected '
                    f'[n, height, width] or [n, height, width, 1 or 3]{hint}.')
  if x.shape[0] == 0:
    raise DataError(f'{path}: {key} holds 0 images; it needs at least one.')
  if x.shape[1] != x.shape[2]:
    raise DataError(f'{path}: {key} has shape {x.shape}: images are '
                    f'{x.shape[1]}x{x.shape[2]}, but NiN expects square '
                    f'[n, size, size(, channels)] images.')
  return x if x.ndim == 4 else x[..., None]


def _check_labels_shape(path: str, key: str, y: np.ndarray,
                        num_images: int) -> np.ndarray:
  """`y` as [n] int32, or a DataError naming `key`."""
  if not np.issubdtype(y.dtype, np.integer):
    raise DataError(f'{path}: {key} has dtype {y.dtype}; expected integer '
                    f'class labels.')
  flat = y.reshape(-1) if y.ndim == 2 and y.shape[1] == 1 else y
  if flat.ndim != 1 or flat.shape[0] != num_images:
    raise DataError(f'{path}: {key} has shape {y.shape}; expected '
                    f'[{num_images}] labels, one per image.')
  if flat.size and (flat.min() < 0 or flat.max() > np.iinfo(np.int32).max):
    raise DataError(f'{path}: {key} labels span [{flat.min()}, {flat.max()}]; '
                    f'expected class indices 0..num_classes-1.')
  return flat.astype(np.int32)


def _check_split(path: str, split: str, x: np.ndarray, y: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
  x = _check_images(path, f'x_{split}', x)
  return x, _check_labels_shape(path, f'y_{split}', y, x.shape[0])


def load_npz_split(path: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads and checks one split ('train' or 'test') of a Keras-layout .npz,
  and only its arrays: images [n, h, w, c] uint8 (3-D images gain a channel
  axis), labels [n] int32."""
  return _check_split(path, split,
                      *_read_npz(path, (f'x_{split}', f'y_{split}')))


def load_npz(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                 np.ndarray]:
  """Reads and checks a Keras-layout .npz: (x_train, y_train, x_test, y_test)
  as `load_npz_split` reads them, images of the same shape."""
  x_train, y_train, x_test, y_test = _read_npz(path)
  x_train, y_train = _check_split(path, 'train', x_train, y_train)
  x_test, y_test = _check_split(path, 'test', x_test, y_test)
  if x_train.shape[1:] != x_test.shape[1:]:
    raise DataError(f'{path}: x_train images are {x_train.shape[1:]} but '
                    f'x_test images are {x_test.shape[1:]}; both must have '
                    f'the same [height, width, channels].')
  return x_train, y_train, x_test, y_test


@dataclasses.dataclass(frozen=True)
class RawData:
  """Unprocessed splits: images [n, height, width, channels], labels [n] int32.

  `x_extra`/`y_extra`: SVHN's 'extra' split when config.use_extra_split.
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


def load_raw(c: ml_collections.ConfigDict) -> RawData:
  """The unprocessed splits of `c.dataset`."""
  kind, name = config_lib.parse_dataset(c.dataset)
  if c.use_extra_split and kind != 'tfds':
    raise DataError(f'config.use_extra_split=True but {c.dataset} has no '
                    f"extra split; only 'tfds:svhn_cropped' has one. Set it "
                    f'to False.')
  if kind == 'sklearn':
    return RawData(*load_digits(), max_value=DIGITS_MAX_VALUE)
  if kind == 'npz':
    return RawData(*load_npz(os.path.expanduser(name)),
                   max_value=PIXEL_MAX_VALUE)
  from nin_jax import tfds_source  # pylint: disable=g-import-not-at-top
  splits = tfds_source.load_arrays(name, c.data_dir or None,
                                   with_extra=c.use_extra_split)
  extra = splits.get('extra')
  return RawData(splits['train'].images, splits['train'].labels,
                 splits['test'].images, splits['test'].labels,
                 PIXEL_MAX_VALUE,
                 extra.images if extra else None,
                 extra.labels if extra else None)


CIFAR_VALIDATION_SIZE = 10_000
SVHN_VALIDATION_PER_CLASS = {'train': 400, 'extra': 200}
VALIDATION_SEED = 0  # Fixed: the held-out set never depends on config.seed.


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
  if raw.x_extra is not None or is_svhn(dataset):
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
                    f'a validation set; set config.validation_split=False.')
  return (raw.x_train[:-n_val], raw.y_train[:-n_val], raw.x_train[-n_val:],
          raw.y_train[-n_val:])


def _concat(parts: list[tuple[np.ndarray, np.ndarray]]
            ) -> tuple[np.ndarray, np.ndarray]:
  if len(parts) == 1:
    return parts[0]
  return (np.concatenate([x for x, _ in parts]),
          np.concatenate([y for _, y in parts]))


def split_raw(c: ml_collections.ConfigDict, raw: RawData
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
  """(x_train, y_train, x_eval, y_eval, eval name) of the run: the held-out
  validation set or the test set, extra and max_train_examples applied."""
  eval_name = 'test'
  if c.validation_split:
    x_train, y_train, x_eval, y_eval = validation_holdout(raw, c.dataset)
    eval_name = 'validation'
  else:
    parts = [(raw.x_train, raw.y_train)]
    if raw.x_extra is not None:
      parts.append((raw.x_extra, raw.y_extra))
    (x_train, y_train), x_eval, y_eval = _concat(parts), raw.x_test, raw.y_test
  if c.max_train_examples:
    x_train = x_train[:c.max_train_examples]
    y_train = y_train[:c.max_train_examples]
  return x_train, y_train, x_eval, y_eval, eval_name


def load_dataset(c: ml_collections.ConfigDict, num_classes: int) -> Dataset:
  """Loads, splits and preprocesses `c.dataset` on the host (a streamed
  dataset is only opened: its batches are decoded as they are needed)."""
  if config_lib.is_streamed(c.dataset):
    from nin_jax import streaming  # pylint: disable=g-import-not-at-top
    return streaming.load_dataset(c, num_classes)
  raw = load_raw(c)
  check_labels(raw, num_classes, c.dataset)
  x_train, y_train, x_test, y_test, eval_name = split_raw(c, raw)
  max_value = raw.max_value
  del raw
  fitted = preprocessing.fit(x_train, c.preprocessing, max_value,
                             c.cache_dir or None)
  train = preprocessing.apply(fitted, x_train)
  test = preprocessing.apply(fitted, x_test)
  logging.info('Dataset %s: %d train, %d %s images of shape %s', c.dataset,
               len(y_train), len(y_test), eval_name, train.shape[1:])
  return Dataset(c.dataset, Split(train, y_train), Split(test, y_test),
                 num_classes, eval_name, fitted)


SPLITS = ('test', 'validation', 'train')


def load_raw_test(c: ml_collections.ConfigDict
                  ) -> tuple[np.ndarray, np.ndarray, float]:
  """The unprocessed test split of `c.dataset` alone, no training data read:
  images [n, h, w, c], labels [n] int32 and the largest pixel value."""
  kind, name = config_lib.parse_dataset(c.dataset)
  if kind == 'sklearn':
    _, _, x_test, y_test = load_digits()
    return x_test, y_test, DIGITS_MAX_VALUE
  if kind == 'npz':
    return (*load_npz_split(os.path.expanduser(name), 'test'),
            PIXEL_MAX_VALUE)
  from nin_jax import tfds_source  # pylint: disable=g-import-not-at-top
  test = tfds_source.load_arrays(name, c.data_dir or None,
                                 splits=('test',))['test']
  return test.images, test.labels, PIXEL_MAX_VALUE


def load_split(c: ml_collections.ConfigDict, split: str,
               fitted: preprocessing.Fitted, num_classes: int) -> Split:
  """One split of an in-memory `c.dataset`, normalized with `fitted` (never
  refitted): 'test' (only the test arrays are read), 'validation' (the
  held-out set of a config.validation_split run) or 'train' (the examples
  the run trained on)."""
  if split not in SPLITS:
    raise DataError(f'split {split!r}: expected one of {SPLITS}.')
  if split == 'validation' and not c.validation_split:
    raise DataError(f'{c.dataset}: this run trained on the whole training '
                    f"set (config.validation_split=False), so it held out no "
                    f"'validation' split; use 'test'.")
  if split == 'test':
    x, y, _ = load_raw_test(c)
  else:
    raw = load_raw(c)
    x_train, y_train, x_eval, y_eval, _ = split_raw(c, raw)
    x, y = (x_train, y_train) if split == 'train' else (x_eval, y_eval)
  _check_label_range(c.dataset, split, y, num_classes)
  return Split(preprocessing.apply(fitted, x), y)


def class_names(c: ml_collections.ConfigDict,
                num_classes: int) -> tuple[str, ...]:
  """The names of the classes: TFDS's label names, CIFAR-10's for a dataset
  named cifar10 (TFDS or an npz file of that name), else the class numbers."""
  kind, name = config_lib.parse_dataset(c.dataset)
  if kind == 'tfds':
    from nin_jax import tfds_source  # pylint: disable=g-import-not-at-top
    names = tfds_source.label_names(name, c.data_dir or None)
    if len(names) == num_classes:
      return names
    base = config_lib.tfds_base_name(name)
  else:
    base = os.path.splitext(os.path.basename(name))[0]
  if base == 'cifar10' and num_classes == len(CIFAR10_CLASSES):
    return CIFAR10_CLASSES
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


class GlobalBatches:
  """Iterates the tuples of this process's rows made by `host_batches` as
  global arrays sharded by `sharding`. `close()` stops a streamed split's
  decoding threads (also before the first batch, unlike a generator's)."""

  def __init__(self, sharding: jax.sharding.Sharding,
               host_batches: Iterator[tuple[np.ndarray, ...]]):
    self._sharding = sharding
    self._host_batches = host_batches

  def __iter__(self) -> GlobalBatches:
    return self

  def __next__(self) -> tuple[jax.Array, ...]:
    return tuple(jax.make_array_from_process_local_data(self._sharding, x)
                 for x in next(self._host_batches))

  def close(self) -> None:
    self._host_batches.close()


def train_batches(split: AnySplit, seed: int, batch_size: int,
                  start_step: int, sharding: jax.sharding.Sharding
                  ) -> GlobalBatches:
  """Global batches (images, labels) from `start_step` on, sharded by `sharding`.

  Only this process's rows are read (gathered from host memory, or decoded
  and cropped with draws keyed by (seed, step, row) for a streamed split).
  """
  rows = np.arange(batch_size)[process_rows(batch_size)]

  def host_batch(step: int, map_fn: Callable
                 ) -> tuple[np.ndarray, np.ndarray]:
    idx = train_batch_indices(seed, step, batch_size, len(split))[rows]
    return split.read(idx, RowKeys(seed, step, rows), map_fn)

  return GlobalBatches(
      sharding, split.batches(host_batch, itertools.count(start_step)))


def eval_batches(split: AnySplit, batch_size: int,
                 sharding: jax.sharding.Sharding) -> GlobalBatches:
  """(images, labels, mask) covering every example once; the last batch is
  padded and its padding masked out."""
  n = len(split)
  rows = process_rows(batch_size)

  def host_batch(start: int, map_fn: Callable
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    idx = np.arange(start, start + batch_size)[rows]
    mask = idx < n
    return (*split.read(np.where(mask, idx, 0), None, map_fn), mask)

  return GlobalBatches(sharding,
                       split.batches(host_batch, range(0, n, batch_size)))


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


def is_digit_dataset(dataset: str) -> bool:
  """Digits (MNIST, SVHN, sklearn digits) must not be flipped horizontally."""
  name = dataset.lower()
  return any(d in name for d in ('mnist', 'svhn', 'digits'))


def is_svhn(dataset: str) -> bool:
  return 'svhn' in dataset.lower()


def flip_allowed(c: ml_collections.ConfigDict) -> bool:
  return bool(c.flip) and not is_digit_dataset(c.dataset)


def device_augment_fn(c: ml_collections.ConfigDict
                      ) -> Optional[Callable[[jax.Array, jax.Array],
                                             jax.Array]]:
  """`augment` as the train step applies it, or None: config.augment is off,
  or the dataset is streamed (its host crops and flips while decoding)."""
  if not c.augment or config_lib.is_streamed(c.dataset):
    return None
  return functools.partial(augment, translate=c.translate_pixels,
                           flip=flip_allowed(c))


def device_normalize_fn(c: ml_collections.ConfigDict
                        ) -> Optional[Callable[[jax.Array], jax.Array]]:
  """For a streamed dataset (uint8 batches) the normalization of
  config.preprocessing, run on device first in both steps; None otherwise
  (in-memory splits are normalized on the host once)."""
  if not config_lib.is_streamed(c.dataset):
    return None
  return preprocessing.normalizer(streamed_fitted(c))


def streamed_fitted(c: ml_collections.ConfigDict) -> preprocessing.Fitted:
  """What a streamed dataset's config.preprocessing stands for: 'standardize'
  with the fixed ImageNet mean and std, or pixels scaled to [0, 1]."""
  if c.preprocessing == 'standardize':
    return preprocessing.Fitted(
        'standardize', PIXEL_MAX_VALUE,
        {'mean': np.asarray(IMAGENET_MEAN), 'std': np.asarray(IMAGENET_STD)})
  return preprocessing.Fitted('scale', PIXEL_MAX_VALUE)


def describe(dataset: Dataset) -> Optional[str]:
  return (f'{dataset.name}: {len(dataset.train)} train / '
          f'{len(dataset.eval)} {dataset.eval_name}, images '
          f'{dataset.image_shape}, {dataset.num_classes} classes')
