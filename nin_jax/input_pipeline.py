"""Datasets for NiN: sources, splits, deterministic batches, device augmentation.

Sources (config.dataset):
- 'sklearn:digits': scikit-learn's 1,797 8x8 digits (embedded, no download),
  with a fixed, seeded, stratified 80/20 train/test split.
- 'npz:PATH': a Keras-layout .npz (x_train, y_train, x_test, y_test; uint8
  images, integer labels), read with allow_pickle=False.
- 'tfds:NAME': a prepared TFDS dataset read through `tfds.data_source`
  (ArrayRecord, no TensorFlow needed).

Every split fits in host memory. The training order is a pure function of
(seed, step): batch `step` holds rows of the permutation of epoch
`step // steps_per_epoch`, so a resumed run sees exactly the batches an
uninterrupted one would. Each process materializes only its own rows of every
global batch. Augmentation (translation, flip) runs on device inside the
compiled train step, keyed by (seed, step).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Iterator, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from nin_jax import config_lib
from nin_jax import preprocessing


@dataclasses.dataclass(frozen=True)
class Split:
  """Images [n, height, width, channels] float32 and labels [n] int32."""
  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return int(self.labels.shape[0])


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A train split, an evaluation split (test or held-out validation)."""
  name: str
  train: Split
  eval: Split
  num_classes: int
  eval_name: str = 'test'

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.train.images.shape[1:])


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


def load_npz(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                 np.ndarray]:
  """Reads and checks a Keras-layout .npz; images gain a channel axis if 3-D."""
  if not os.path.isfile(path):
    raise DataError(f'config.dataset=npz:{path}: no such file; point it at a '
                    f'.npz with keys {NPZ_KEYS}.')
  try:
    with np.load(path, allow_pickle=False) as f:
      missing = [k for k in NPZ_KEYS if k not in f.files]
      if missing:
        raise DataError(f'{path}: missing keys {missing}; found {f.files}, '
                        f'need {NPZ_KEYS}.')
      arrays = [f[k] for k in NPZ_KEYS]
  except ValueError as e:
    if isinstance(e, DataError):
      raise
    raise DataError(f'{path}: cannot be read without pickle ({e}); save the '
                    f'arrays as plain numeric arrays.') from e
  except (OSError, EOFError) as e:
    raise DataError(f'{path}: not a readable .npz file ({e}).') from e
  x_train, y_train, x_test, y_test = arrays
  for key, x in (('x_train', x_train), ('x_test', x_test)):
    if x.dtype != np.uint8:
      raise DataError(f'{path}: {key} has dtype {x.dtype}; expected uint8 '
                      f'pixels 0..255.')
    if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] not in (1, 3)):
      raise DataError(f'{path}: {key} has shape {x.shape}; expected '
                      f'[n, height, width] or [n, height, width, 1 or 3].')
  if x_train.shape[1:] != x_test.shape[1:]:
    raise DataError(f'{path}: x_train images are {x_train.shape[1:]} but '
                    f'x_test images are {x_test.shape[1:]}.')
  for key, y, x in (('y_train', y_train, x_train), ('y_test', y_test, x_test)):
    if not np.issubdtype(y.dtype, np.integer):
      raise DataError(f'{path}: {key} has dtype {y.dtype}; expected integer '
                      f'class labels.')
    y = y.reshape(-1) if y.ndim == 2 and y.shape[1] == 1 else y
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
      raise DataError(f'{path}: {key} has shape {y.shape}; expected '
                      f'[{x.shape[0]}] labels, one per image.')
  y_train, y_test = y_train.reshape(-1), y_test.reshape(-1)
  if x_train.ndim == 3:
    x_train, x_test = x_train[..., None], x_test[..., None]
  return x_train, y_train.astype(np.int32), x_test, y_test.astype(np.int32)


def check_labels(y_train: np.ndarray, y_test: np.ndarray, num_classes: int,
                 source: str) -> None:
  """Raises DataError if a label is outside [0, num_classes)."""
  for key, y in (('train', y_train), ('test', y_test)):
    if y.size and (y.min() < 0 or y.max() >= num_classes):
      raise DataError(f'{source}: {key} labels span [{y.min()}, {y.max()}] '
                      f'but the preset has {num_classes} classes; labels '
                      f'must be in [0, {num_classes - 1}].')


def load_raw(c: ml_collections.ConfigDict
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
  """Raw (x_train, y_train, x_test, y_test, max pixel value) of `c.dataset`."""
  kind, name = config_lib.parse_dataset(c.dataset)
  if kind == 'sklearn':
    return (*load_digits(), 16.0)
  if kind == 'npz':
    return (*load_npz(os.path.expanduser(name)), 255.0)
  from nin_jax import tfds_source  # pylint: disable=g-import-not-at-top
  return (*tfds_source.load_arrays(name, c.data_dir or None), 255.0)


def validation_holdout(x: np.ndarray, y: np.ndarray, dataset: str
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                  np.ndarray]:
  """The paper's held-out validation: the last 10,000 training images (CIFAR)
  or the last sixth for smaller sets. Returns (x_train, y_train, x_val, y_val)."""
  n_val = 10_000 if x.shape[0] >= 40_000 else x.shape[0] // 6
  del dataset
  return x[:-n_val], y[:-n_val], x[-n_val:], y[-n_val:]


def load_dataset(c: ml_collections.ConfigDict, num_classes: int) -> Dataset:
  """Loads, splits and preprocesses `c.dataset` on the host."""
  x_train, y_train, x_test, y_test, max_value = load_raw(c)
  check_labels(y_train, y_test, num_classes, c.dataset)
  eval_name = 'test'
  if c.validation_split:
    x_train, y_train, x_test, y_test = validation_holdout(
        x_train, y_train, c.dataset)
    eval_name = 'validation'
  train, test = preprocessing.preprocess(x_train, x_test, c.preprocessing,
                                         max_value, c.cache_dir or None)
  logging.info('Dataset %s: %d train, %d %s images of shape %s', c.dataset,
               len(y_train), len(y_test), eval_name, train.shape[1:])
  return Dataset(c.dataset, Split(train, y_train), Split(test, y_test),
                 num_classes, eval_name)


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
    rng = np.random.default_rng([seed, step, 1])
    return rng.choice(num_examples, batch_size, replace=True)
  epoch, i = divmod(step, steps_per_epoch(num_examples, batch_size))
  return epoch_permutation(seed, epoch, num_examples)[i * batch_size:
                                                       (i + 1) * batch_size]


def process_rows(global_batch: int) -> slice:
  """This process's rows of a global batch (contiguous, in process order)."""
  local = global_batch // jax.process_count()
  start = jax.process_index() * local
  return slice(start, start + local)


def train_batches(split: Split, seed: int, batch_size: int, start_step: int,
                  sharding: jax.sharding.Sharding
                  ) -> Iterator[tuple[jax.Array, jax.Array]]:
  """Global batches (images, labels) from `start_step` on, sharded by `sharding`.

  Only this process's rows are gathered from host memory.
  """
  rows = process_rows(batch_size)
  step = start_step
  while True:
    idx = train_batch_indices(seed, step, batch_size, len(split))[rows]
    yield (
        jax.make_array_from_process_local_data(sharding, split.images[idx]),
        jax.make_array_from_process_local_data(sharding, split.labels[idx]))
    step += 1


def eval_batches(split: Split, batch_size: int,
                 sharding: jax.sharding.Sharding
                 ) -> Iterator[tuple[jax.Array, jax.Array, jax.Array]]:
  """(images, labels, mask) covering every example once; the last batch is
  padded and its padding masked out."""
  n = len(split)
  rows = process_rows(batch_size)
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size)[rows]
    mask = idx < n
    idx = np.where(mask, idx, 0)
    yield (jax.make_array_from_process_local_data(sharding, split.images[idx]),
           jax.make_array_from_process_local_data(sharding, split.labels[idx]),
           jax.make_array_from_process_local_data(sharding, mask))


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


def flip_allowed(c: ml_collections.ConfigDict) -> bool:
  return bool(c.flip) and not is_digit_dataset(c.dataset)


def describe(dataset: Dataset) -> Optional[str]:
  return (f'{dataset.name}: {len(dataset.train)} train / '
          f'{len(dataset.eval)} {dataset.eval_name}, images '
          f'{dataset.image_shape}, {dataset.num_classes} classes')
