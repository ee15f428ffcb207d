"""The PyTorch peer's recipe, without PyTorch: what experiments/race.py checks
before a race and what experiments/torch_train.py trains with.

Kept apart from torch_train (which imports torch at the top) so the race
validates a config for the peer, and these pieces are tested, where PyTorch
is not installed:
  check_supported  refuses, in one line, a config the peer cannot mirror
  learning_rates   the base learning rate of every step, from nin-jax's own
                   schedule function
  augment          translation with zero padding, then a horizontal flip with
                   probability 1/2 (as `augmentation.augment`)
  train_batch      nin-jax's global batch of a step, augmented as the config
                   says
"""

from __future__ import annotations

import ml_collections
import numpy as np

from nin_jax import augmentation
from nin_jax import batching
from nin_jax import datasets
from nin_jax import models
from nin_jax import optimizer as optimizer_lib


class UnsupportedConfig(ValueError):
  """A config field the PyTorch peer cannot mirror."""


def check_supported(c: ml_collections.ConfigDict) -> None:
  """Raises UnsupportedConfig naming the first field the PyTorch peer cannot
  mirror."""
  unsupported = [
      (c.optim.schedule == 'plateau', 'optim.schedule', c.optim.schedule,
       'pick constant, step, cosine or one_cycle'),
      (c.model.head != 'gap', 'model.head', c.model.head, "use 'gap'"),
      (c.model.second_pool != '', 'model.second_pool', c.model.second_pool,
       "use '' (the preset's)"),
      (c.model.dtype != 'float32', 'model.dtype', c.model.dtype,
       "use 'float32'"),
      (datasets.lookup(c.data.dataset).streamed, 'data.dataset',
       c.data.dataset, 'use an in-memory dataset (npz: or a small tfds:)'),
      (c.model.weight_init == 'faithful' and any(
          b.init_stddevs for b in models.PRESETS[c.model.preset].blocks),
       'model.weight_init',
       c.model.weight_init, 'per-layer stds are not mirrored; use modern'),
  ]
  for bad, field, value, fix in unsupported:
    if bad:
      raise UnsupportedConfig(f'config.{field}={value!r}: the PyTorch peer '
                              f'does not mirror it; {fix}.')


def learning_rates(optim: ml_collections.ConfigDict, steps_per_epoch: int,
                   num_steps: int) -> np.ndarray:
  """The base learning rate of steps 0 .. num_steps - 1, from nin-jax's own
  schedule function."""
  schedule = optimizer_lib.learning_rate_schedule(optim, steps_per_epoch,
                                                  num_steps)
  return np.asarray([float(schedule(i)) for i in range(num_steps)])


def augment(images: np.ndarray, rng: np.random.Generator, translate: int,
            flip: bool) -> np.ndarray:
  """images [batch, height, width, channels] shifted by up to `translate`
  pixels (zero padding) and, if `flip`, mirrored with probability 1/2."""
  batch, height, width, _ = images.shape
  t = translate
  padded = np.pad(images, ((0, 0), (t, t), (t, t), (0, 0)))
  dy, dx = rng.integers(0, 2 * t + 1, (2, batch))
  mirror = rng.random(batch) < 0.5 if flip else np.zeros(batch, bool)
  cols = np.where(mirror[:, None], np.arange(width)[::-1], np.arange(width))
  rows = dy[:, None] + np.arange(height)
  cols = dx[:, None] + cols
  return padded[np.arange(batch)[:, None, None], rows[:, :, None],
                cols[:, None, :]]


def train_batch(c: ml_collections.ConfigDict, split: batching.Split,
                step: int) -> tuple[np.ndarray, np.ndarray]:
  """Global batch `step` (nin-jax's indices), augmented as the config says."""
  idx = batching.train_batch_indices(c.train.seed, step,
                                           c.train.batch_size, len(split))
  images, labels = split.images[idx], split.labels[idx]
  if c.data.augment:
    rng = np.random.default_rng([c.train.seed, step])
    images = augment(images, rng, c.data.translate_pixels,
                     augmentation.flip_allowed(
                         c.data, datasets.lookup(c.data.dataset)))
  return images, labels
