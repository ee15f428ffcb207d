"""Every check of a config (and of the workdir it resumes) that can run before
anything is loaded, compiled or written: each subtree by the module that owns
it, then the checks across subtrees. Each error names the field and the fix."""

from __future__ import annotations

import json
from typing import Optional

import ml_collections
from etils import epath

from nin_jax import config_lib
from nin_jax import conv_select
from nin_jax import datasets
from nin_jax import input_pipeline
from nin_jax import model_factory
from nin_jax import optimizer as optimizer_lib
from nin_jax import runtime
from nin_jax.errors import check, check_count


def validate_train_config(t: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first invalid field of config.train."""
  for field in ('batch_size', 'eval_batch_size', 'log_every_steps',
                'keep_checkpoints'):
    check_count(f'train.{field}', t[field])
  check_count('train.eval_every_steps', t.eval_every_steps, 'once per epoch')
  check_count('train.checkpoint_every_steps', t.checkpoint_every_steps,
              'once per epoch')
  check_count('train.profile_steps', t.profile_steps, 'no trace')
  if t.num_train_steps == -1:
    check(t.num_epochs > 0, 'train.num_epochs', t.num_epochs,
          'must be positive (or set train.num_train_steps)')
  else:
    check(isinstance(t.num_train_steps, int) and t.num_train_steps > 0,
          'train.num_train_steps', t.num_train_steps,
          'must be a positive integer, or -1 to use train.num_epochs')
  check(0 <= t.seed < 2**31, 'train.seed', t.seed, 'must be in [0, 2**31)')
  check(0 <= t.label_smoothing < 1, 'train.label_smoothing', t.label_smoothing,
        'must be in [0, 1)')


def validate_config(c: ml_collections.ConfigDict,
                    num_devices: Optional[int] = None,
                    backend: Optional[str] = None) -> datasets.DatasetSpec:
  """Raises ConfigError naming the first invalid field of `c`: the layout and
  types, each subtree by the module that reads it, then the checks across
  subtrees. `num_devices`: the global device count the batches are split
  over; `backend`: jax.default_backend() (None: checks needing them skip).

  Returns the dataset's registry entry, resolved here once for the run.
  """
  config_lib.check_fields(c)
  spec = datasets.lookup(c.data.dataset)
  input_pipeline.validate_config(c.data, spec)
  model_factory.validate_config(c.model)
  optimizer_lib.validate_config(c.optim)
  validate_train_config(c.train)
  runtime.validate_config(c.runtime)
  config_lib.check_eval_flip(c, spec)
  config_lib.check_num_classes(c, spec)
  check_platform(c, num_devices, backend)
  return spec


def check_platform(c: ml_collections.ConfigDict, num_devices: Optional[int],
                   backend: Optional[str]) -> None:
  """The checks that need the devices: the batch sizes split over
  `num_devices`, the convolution implementation on `backend` (each skipped
  when None)."""
  conv_select.check_config(c.model.conv_impl, backend)
  if num_devices is not None:
    config_lib.check_devices(c, num_devices)


def check_resume_compatible(c: ml_collections.ConfigDict, workdir: str
                            ) -> None:
  """Raises ConfigError if WORKDIR holds checkpoints of another architecture."""
  saved_path = epath.Path(workdir) / 'config.json'
  ckpt_dir = epath.Path(workdir) / 'checkpoints'
  if not saved_path.exists() or not ckpt_dir.exists() or not any(
      p.name.isdigit() for p in ckpt_dir.iterdir()):
    return
  saved = json.loads(saved_path.read_text())
  current = json.loads(c.to_json())
  for group, fields in model_factory.ARCHITECTURE_FIELDS.items():
    defaults = config_lib.default_config()[group]
    for field in fields:
      before = saved.get(group, {}).get(field, defaults[field])
      now = current[group][field]
      if before != now:
        raise config_lib.ConfigError(
            f'--workdir={workdir} holds checkpoints of config.{group}.{field}'
            f'={before!r} but this run has config.{group}.{field}={now!r}; '
            f'use a new workdir or the same {group}.{field}.')
