"""The paper's held-out validation sets, and the train/evaluation split of a
run (`config.data.validation_split`, `use_extra_split`, `max_train_examples`).

The held-out set is fixed: it never depends on config.train.seed, so every
run of a dataset validates on the same images."""

from __future__ import annotations

import ml_collections
import numpy as np

from nin_jax import datasets
from nin_jax.errors import DataError
from nin_jax.sources import RawData


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


def validation_holdout(raw: RawData, spec: datasets.DatasetSpec
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                  np.ndarray]:
  """The paper's held-out validation set: (x_train, y_train, x_val, y_val).

  SVHN: 400 random examples per class from train plus 200 per class from
  extra (when loaded); everything else of train and extra is trained on.
  Others (CIFAR): the last 10,000 training images, or the last sixth of a
  training set smaller than 40,000.
  """
  if raw.x_extra is not None or spec.holdout == 'per_class':
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
    raise DataError(f'{spec.config_string}: {n} training images are too few to hold out '
                    f'a validation set; set config.data.validation_split=False.')
  return (raw.x_train[:-n_val], raw.y_train[:-n_val], raw.x_train[-n_val:],
          raw.y_train[-n_val:])


def _concat(parts: list[tuple[np.ndarray, np.ndarray]]
            ) -> tuple[np.ndarray, np.ndarray]:
  if len(parts) == 1:
    return parts[0]
  return (np.concatenate([x for x, _ in parts]),
          np.concatenate([y for _, y in parts]))


def split_raw(data: ml_collections.ConfigDict, spec: datasets.DatasetSpec,
              raw: RawData
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
  """(x_train, y_train, x_eval, y_eval, eval name) of the run: the held-out
  validation set or the test set, extra and max_train_examples applied."""
  eval_name = 'test'
  if data.validation_split:
    x_train, y_train, x_eval, y_eval = validation_holdout(raw, spec)
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
