"""The NiN a config describes: config.model's checks and the model built from
it, for training, inference and the Caffe import alike."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from nin_jax import conv_select
from nin_jax import models
from nin_jax.errors import check


DTYPES = ('float32', 'bfloat16', 'float16')


def validate_config(m: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first invalid field of config.model
  (conv_impl is conv_select's)."""
  check(m.preset in models.PRESETS, 'model.preset', m.preset,
        f'must be one of {sorted(models.PRESETS)}')
  check(m.head in models.HEADS, 'model.head', m.head, f'must be one of {models.HEADS}')
  check(m.weight_init in models.INITS, 'model.weight_init', m.weight_init,
        f'must be one of {models.INITS}')
  check(m.second_pool in ('', 'max', 'avg'), 'model.second_pool',
        m.second_pool, "must be '', 'max' or 'avg'")
  for field in ('dropout_rate', 'head_dropout_rate'):
    check(0.0 <= m[field] < 1.0, f'model.{field}', m[field],
          'must be in [0, 1)')
  check(m.dtype in DTYPES, 'model.dtype', m.dtype, f'must be one of {DTYPES}')


# Fields that define the architecture: a checkpoint only fits a config that
# agrees on all of them. The others of config.model (conv_impl, dtype) change
# how, not what, is computed: free to differ on resume.
ARCHITECTURE_FIELDS = {'model': ('preset', 'head', 'dropout_rate',
                                 'head_dropout_rate', 'weight_init',
                                 'batch_norm', 'second_pool', 'final_relu')}


def build_model(m: ml_collections.ConfigDict) -> models.NiN:
  """The NiN of config.model (`m`): its preset with the subtree's fields."""
  return models.create_model(
      m.preset,
      second_pool=m.second_pool or None,
      head=m.head,
      dropout_rate=m.dropout_rate,
      head_dropout_rate=m.head_dropout_rate,
      weight_init=m.weight_init,
      batch_norm=m.batch_norm,
      final_relu=m.final_relu,
      conv=conv_select.conv_module(m.conv_impl),
      dtype=None if m.dtype == 'float32' else jnp.dtype(m.dtype))
