"""The input pipeline: a dataset's splits in memory (or streamed), normalized,
and the run's batches over them.

What a dataset is (its source, splits, classes, whether it may be flipped or
is streamed) comes from the registry (datasets.py), resolved once per run into
a `DatasetSpec` that every step below is handed. sources.py reads the arrays,
holdouts.py splits off the paper's validation sets, preprocessing.py
normalizes, batching.py makes the global batches and augmentation.py the
on-device translation and flips.

Every split but ImageNet's fits in host memory (`batching.Split`); ImageNet is
decoded batch by batch (`streaming.StreamSplit`, the same interface) and
normalized on device.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import jax
import ml_collections
import numpy as np
from absl import logging

from nin_jax import augmentation
from nin_jax import batching
from nin_jax import datasets
from nin_jax import holdouts
from nin_jax import preprocessing
from nin_jax import sources
from nin_jax import streaming
from nin_jax.errors import DataError
from nin_jax.errors import check, check_count

# Per-pixel normalizations a streamed dataset can use (applied on device).
STREAMED_PREPROCESSING = ('standardize', 'scale', 'none')
MAX_DATA_WORKERS = 1024
SPLITS = ('test', 'validation', 'train')


def validate_config(data: ml_collections.ConfigDict,
                    spec: datasets.DatasetSpec) -> None:
  """Raises ConfigError naming the first invalid field of config.data
  (`spec`: the registry's entry for data.dataset)."""
  check(data.preprocessing in preprocessing.METHODS, 'data.preprocessing',
        data.preprocessing, f'must be one of {preprocessing.METHODS}')
  check('://' not in data.cache_dir, 'data.cache_dir', data.cache_dir,
        'must be a local directory: each host keeps its own copy of the ZCA '
        "statistics ('' = $XDG_CACHE_HOME/nin_jax or ~/.cache/nin_jax)")
  check_count('data.max_train_examples', data.max_train_examples, 'all')
  check(data.translate_pixels >= 0, 'data.translate_pixels',
        data.translate_pixels, 'must be >= 0')
  check_count('data.image_size', data.image_size, "the preset's")
  check_count('data.data_workers', data.data_workers, 'one per core')
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
class Dataset:
  """A train split, an evaluation split (test or held-out validation), and
  the normalization fitted on the train split (`fitted`), which in-memory
  splits have already been through and streamed ones get on device.
  `spec`: the registry's entry (config.data.dataset resolved)."""
  spec: datasets.DatasetSpec
  train: batching.AnySplit
  eval: batching.AnySplit
  num_classes: int
  eval_name: str = 'test'
  fitted: Optional[preprocessing.Fitted] = None

  @property
  def name(self) -> str:
    """The config.data.dataset string."""
    return self.spec.config_string

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return self.train.image_shape


def load_dataset(data: ml_collections.ConfigDict, spec: datasets.DatasetSpec,
                 num_classes: int, streamed_size: int = 0) -> Dataset:
  """Loads, splits and preprocesses `data.dataset` on the host. A streamed
  dataset is only opened: its batches are decoded as they are needed, cropped
  to squares of `streamed_size` (config_lib.streamed_image_size), by default
  config.data.image_size."""
  if spec.streamed:
    size = streamed_size or data.image_size
    if size <= 0:
      raise ValueError(f'{data.dataset} is streamed: give the side of its crops')
    return load_streamed(data, spec, num_classes, size)
  raw = sources.load_raw(data, spec)
  sources.check_labels(raw, num_classes, data.dataset)
  x_train, y_train, x_test, y_test, eval_name = holdouts.split_raw(data, spec,
                                                                   raw)
  max_value = raw.max_value
  del raw
  fitted = preprocessing.fit(x_train, data.preprocessing, max_value,
                             data.cache_dir or None)
  train = preprocessing.apply(fitted, x_train)
  test = preprocessing.apply(fitted, x_test)
  logging.info('Dataset %s: %d train, %d %s images of shape %s', data.dataset,
               len(y_train), len(y_test), eval_name, train.shape[1:])
  return Dataset(spec, batching.Split(train, y_train),
                 batching.Split(test, y_test), num_classes, eval_name, fitted)


def load_streamed(data: ml_collections.ConfigDict, spec: datasets.DatasetSpec,
                  num_classes: int, image_size: int) -> Dataset:
  """The streamed train and evaluation splits of `data.dataset`, nothing decoded
  yet, cropped to `image_size` squares."""
  train, evaluation, eval_name = streaming.open_splits(
      spec, data.data_dir or None, num_classes, image_size, bool(data.augment),
      augmentation.flip_allowed(data, spec),
      data.data_workers or os.cpu_count() or 1, data.max_train_examples)
  return Dataset(spec, train, evaluation, num_classes, eval_name,
                 streamed_fitted(data, spec))


def load_split(data: ml_collections.ConfigDict, spec: datasets.DatasetSpec,
               split: str, fitted: preprocessing.Fitted,
               num_classes: int) -> batching.Split:
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
    x, y, _ = sources.load_raw_test(data, spec)
  else:
    raw = sources.load_raw(data, spec)
    x_train, y_train, x_eval, y_eval, _ = holdouts.split_raw(data, spec, raw)
    x, y = (x_train, y_train) if split == 'train' else (x_eval, y_eval)
  sources.check_label_range(data.dataset, split, y, num_classes)
  return batching.Split(preprocessing.apply(fitted, x), y)


@dataclasses.dataclass(frozen=True)
class Pipeline:
  """The batches of one run: `train_iter(start_step)` and `eval_iter()`,
  each an iterator to close when done (or use as a context manager)."""
  dataset: Dataset
  seed: int
  batch_size: int
  eval_batch_size: int
  sharding: jax.sharding.Sharding

  def train_iter(self, start_step: int = 0) -> batching.Batches:
    return batching.train_batches(self.dataset.train, self.seed, self.batch_size,
                         start_step, self.sharding)

  def eval_iter(self) -> batching.Batches:
    """The evaluation split, each example once."""
    return batching.eval_batches(self.dataset.eval, self.eval_batch_size,
                        self.sharding)


def streamed_fitted(data: ml_collections.ConfigDict,
                    spec: datasets.DatasetSpec) -> preprocessing.Fitted:
  """What a streamed dataset's config.data.preprocessing stands for: 'standardize'
  with the registry's fixed mean and std, or pixels scaled to [0, 1]."""
  if data.preprocessing == 'standardize':
    return preprocessing.Fitted(
        'standardize', spec.max_value,
        {'mean': np.asarray(spec.mean), 'std': np.asarray(spec.std)})
  return preprocessing.Fitted('scale', spec.max_value)


