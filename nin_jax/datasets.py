"""The dataset registry: what nin-jax knows about each dataset, in one place.

A `config.data.dataset` string names a source and a dataset:
- 'sklearn:digits': scikit-learn's 1,797 8x8 digits (embedded, no download).
- 'npz:PATH': a Keras-layout .npz (x_train, y_train, x_test, y_test). A file
  named after a registered dataset ('mnist.npz', 'cifar10.npz') gets that
  dataset's properties (class names, no flips for digits, SVHN's holdout);
  any other file is a generic dataset.
- 'tfds:NAME[:VERSION][/CONFIG]': a prepared TFDS dataset.

`lookup` turns the string into a `DatasetSpec`; every question about a
dataset (is it streamed, may it be flipped, which split is evaluated, what are
its classes) is answered by the spec, never by matching its name elsewhere.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

from nin_jax.errors import ConfigError

SOURCES = ('npz', 'tfds', 'sklearn')
# The largest raw pixel value: uint8 images, scikit-learn's digits.
PIXEL_MAX_VALUE = 255.0
DIGITS_MAX_VALUE = 16.0
# The fixed statistics streamed datasets are standardized with, pixels in [0, 1].
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog',
                   'frog', 'horse', 'ship', 'truck')


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """One dataset as nin-jax reads it.

  `key`: the registry name ('cifar10'), or '' for an unregistered npz file.
  `eval_split`: the split evaluated ('test', ImageNet's 'validation').
  `extra_splits`: further training splits that can be read (SVHN's 'extra').
  `class_names`: empty when the classes are only numbered (or TFDS names them).
  `flip`: whether a horizontal flip keeps an image's class (not for digits).
  `streamed`: decoded batch by batch (too big for host memory).
  `holdout`: the paper's validation set: 'last' (the last 10,000 training
  images, or a sixth of a smaller set) or 'per_class' (SVHN's 400 per class
  from train, 200 from extra).
  `max_value`: the largest raw pixel value.
  `mean`, `std`: fixed per-channel statistics (pixels scaled to [0, 1]) that a
  streamed dataset is standardized with; in-memory datasets fit their own.
  """
  source: str
  name: str
  key: str = ''
  eval_split: str = 'test'
  extra_splits: tuple[str, ...] = ()
  num_classes: Optional[int] = None
  class_names: tuple[str, ...] = ()
  flip: bool = True
  streamed: bool = False
  holdout: str = 'last'
  max_value: float = PIXEL_MAX_VALUE
  mean: tuple[float, ...] = ()
  std: tuple[float, ...] = ()

  @property
  def config_string(self) -> str:
    return f'{self.source}:{self.name}'


# Registered datasets, by the name TFDS gives them.
_REGISTRY = {
    'digits': dict(num_classes=10, flip=False, max_value=DIGITS_MAX_VALUE),
    'mnist': dict(num_classes=10, flip=False),
    'cifar10': dict(num_classes=10, class_names=CIFAR10_CLASSES),
    'cifar100': dict(num_classes=100),
    'svhn_cropped': dict(num_classes=10, flip=False, extra_splits=('extra',),
                         holdout='per_class'),
    'imagenet2012': dict(num_classes=1000, eval_split='validation',
                         streamed=True, mean=IMAGENET_MEAN, std=IMAGENET_STD),
}
# Other names an npz file of a registered dataset may carry.
_ALIASES = {'svhn': 'svhn_cropped', 'imagenet': 'imagenet2012'}
SKLEARN_DATASETS = ('digits',)
TFDS_DATASETS = tuple(k for k in _REGISTRY if k not in SKLEARN_DATASETS)
STREAMED_TFDS = tuple(k for k, v in _REGISTRY.items() if v.get('streamed'))


def tfds_base_name(name: str) -> str:
  """'svhn_cropped:3.1.0' or 'name/config' -> the registered dataset name."""
  return name.split('/')[0].split(':')[0]


def _usage(dataset: str) -> str:
  return (f"config.data.dataset={dataset!r}: expected 'npz:PATH', 'tfds:NAME' "
          f"(NAME in {TFDS_DATASETS}) or 'sklearn:digits'.")


def lookup(dataset: str) -> DatasetSpec:
  """The spec of a `config.data.dataset` string; ConfigError naming it if unknown."""
  if not isinstance(dataset, str):
    raise ConfigError(_usage(str(dataset)))
  source, sep, name = dataset.partition(':')
  if not sep or source not in SOURCES or not name:
    raise ConfigError(_usage(dataset))
  if source == 'sklearn':
    if name not in SKLEARN_DATASETS:
      raise ConfigError(f'config.data.dataset={dataset!r}: the embedded datasets '
                        f'are {["sklearn:" + n for n in SKLEARN_DATASETS]}.')
    key = name
  elif source == 'tfds':
    key = tfds_base_name(name)
    if key not in TFDS_DATASETS:
      raise ConfigError(f'config.data.dataset={dataset!r}: supported TFDS datasets '
                        f'are {TFDS_DATASETS}.')
  else:
    stem = os.path.splitext(os.path.basename(name))[0].lower()
    key = _ALIASES.get(stem, stem)
    if key not in TFDS_DATASETS or _REGISTRY[key].get('streamed'):
      return DatasetSpec(source, name)
    # An npz file holds train and test only.
    return DatasetSpec(source, name, key,
                       **{**_REGISTRY[key], 'extra_splits': ()})
  return DatasetSpec(source, name, key, **_REGISTRY[key])
