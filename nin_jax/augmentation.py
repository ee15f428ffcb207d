"""The paper's augmentation of in-memory datasets, on device inside the
compiled train step: random translation and horizontal flip, keyed by
(seed, step) and the example's row. A streamed dataset crops and flips on the
host instead (streaming.py)."""

from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections

from nin_jax import datasets


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


def flip_allowed(data: ml_collections.ConfigDict,
                 spec: datasets.DatasetSpec) -> bool:
  """config.data.flip, unless the registry says a flip changes the class (digits)."""
  return bool(data.flip) and spec.flip


def device_augment_fn(data: ml_collections.ConfigDict,
                      spec: datasets.DatasetSpec
                      ) -> Optional[Callable[[jax.Array, jax.Array],
                                             jax.Array]]:
  """`augment` as the train step applies it, or None: config.data.augment is off,
  or the dataset is streamed (its host crops and flips while decoding)."""
  if not data.augment or spec.streamed:
    return None
  return functools.partial(augment, translate=data.translate_pixels,
                           flip=flip_allowed(data, spec))
