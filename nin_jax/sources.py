"""A dataset's unprocessed arrays, read from whichever source holds them
(scikit-learn's digits, a local .npz file, a TFDS data_dir): one dispatch
over the registry's `source`, for the whole dataset or its test split alone."""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import ml_collections
import numpy as np

from nin_jax import datasets
from nin_jax import readers
from nin_jax import tfds_source
from nin_jax.errors import DataError


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
      check_label_range(source, key, y, num_classes)


def check_label_range(source: str, key: str, y: np.ndarray,
                       num_classes: int) -> None:
  if y.size and (y.min() < 0 or y.max() >= num_classes):
    raise DataError(f'{source}: {key} labels span [{y.min()}, {y.max()}] '
                    f'but the preset has {num_classes} classes; labels '
                    f'must be in [0, {num_classes - 1}].')


def _read(spec: datasets.DatasetSpec, data_dir: Optional[str],
          splits: Sequence[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """(images, labels) of each of `splits` ('train', 'test', 'extra'), reading
  no other split where the source allows it."""
  if spec.source == 'sklearn':
    x_train, y_train, x_test, y_test = readers.load_digits()
    both = {'train': (x_train, y_train), 'test': (x_test, y_test)}
    return {split: both[split] for split in splits}
  if spec.source == 'npz':
    path = os.path.expanduser(spec.name)
    if list(splits) == ['test']:
      return {'test': readers.load_npz_split(path, 'test')}
    x_train, y_train, x_test, y_test = readers.load_npz(path)
    both = {'train': (x_train, y_train), 'test': (x_test, y_test)}
    return {split: both[split] for split in splits}
  arrays = tfds_source.load_arrays(spec, data_dir, splits)
  return {split: (a.images, a.labels) for split, a in arrays.items()}


def load_raw(data: ml_collections.ConfigDict,
             spec: datasets.DatasetSpec) -> RawData:
  """The unprocessed splits of `data.dataset` (`spec`: its registry entry)."""
  if data.use_extra_split and not spec.extra_splits:
    raise DataError(f'config.data.use_extra_split=True but {data.dataset} '
                    f"has no extra split; only 'tfds:svhn_cropped' has one. "
                    f'Set it to False.')
  splits = ['train', 'test'] + list(
      spec.extra_splits if data.use_extra_split else ())
  arrays = _read(spec, data.data_dir or None, splits)
  extra = arrays.get('extra', (None, None))
  return RawData(*arrays['train'], *arrays['test'], spec.max_value, *extra)


def load_raw_test(data: ml_collections.ConfigDict, spec: datasets.DatasetSpec
                  ) -> tuple[np.ndarray, np.ndarray, float]:
  """The unprocessed test split of `data.dataset` alone, no training data read:
  images [n, h, w, c], labels [n] int32 and the largest pixel value."""
  x_test, y_test = _read(spec, data.data_dir or None, ['test'])['test']
  return x_test, y_test, spec.max_value


def class_names(data: ml_collections.ConfigDict, spec: datasets.DatasetSpec,
                num_classes: int) -> tuple[str, ...]:
  """The names of the classes: TFDS's label names, the registry's (CIFAR-10's
  for a TFDS or npz copy of it), else the class numbers."""
  if spec.source == 'tfds':
    names = tfds_source.label_names(spec.name, data.data_dir or None)
    if len(names) == num_classes:
      return names
  if len(spec.class_names) == num_classes:
    return spec.class_names
  return tuple(str(i) for i in range(num_classes))
