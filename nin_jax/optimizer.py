"""Caffe-style SGD for NiN, built from optax pieces.

Weight decay on weights only, per-layer learning-rate multipliers (biases x2,
the class-map layer x0.1, as the author's Caffe solver), momentum, and one of
the schedules: constant, Caffe step, the paper's plateau rule, cosine and
one-cycle.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from nin_jax.errors import check

SCHEDULES = ('constant', 'step', 'plateau', 'cosine', 'one_cycle')
OPTIMIZERS = ('sgd', 'nesterov')
Schedule = Callable[[jax.Array], jax.Array]


def _path_names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)


def last_layer_name(params: Any) -> tuple[str, ...]:
  """Path prefix of the layer that produces the logits (or class maps); () if
  `params` is not a NiN's."""
  if 'fc' in params:
    return ('fc',)
  blocks = sorted((k for k in params if k.startswith('mlpconv')),
                  key=lambda k: int(k[len('mlpconv'):]))
  if not blocks:
    return ()
  last_block = blocks[-1]
  layers = sorted((k for k in params[last_block] if k.startswith('cccp')),
                  key=lambda k: int(k[len('cccp'):]))
  return (last_block, layers[-1] if layers else 'conv')


def param_labels(params: Any) -> Any:
  """Labels each leaf 'weight', 'bias', 'last_weight', 'last_bias' or 'norm'."""
  last = last_layer_name(params)

  def label(path, _):
    names = _path_names(path)
    is_last = bool(last) and names[:len(last)] == last
    if names[-1] == 'kernel':
      return 'last_weight' if is_last else 'weight'
    if names[-1] == 'bias' and any(n.startswith('bn') for n in names):
      return 'norm'
    if names[-1] == 'bias':
      return 'last_bias' if is_last else 'bias'
    return 'norm'

  return jax.tree_util.tree_map_with_path(label, params)


def validate_config(optim: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first invalid field of config.optim."""
  check(optim.optimizer in OPTIMIZERS, 'optim.optimizer', optim.optimizer,
        f'must be one of {OPTIMIZERS}')
  check(optim.learning_rate > 0, 'optim.learning_rate', optim.learning_rate,
        'must be a positive number')
  check(0 <= optim.momentum < 1, 'optim.momentum', optim.momentum,
        'must be in [0, 1)')
  for field in ('weight_decay', 'bias_lr_mult', 'last_layer_lr_mult',
                'warmup_epochs', 'plateau_max_reductions'):
    check(optim[field] >= 0, f'optim.{field}', optim[field], 'must be >= 0')
  check(optim.schedule in SCHEDULES, 'optim.schedule', optim.schedule,
        f'must be one of {SCHEDULES}')
  check(0 < optim.lr_decay <= 1, 'optim.lr_decay', optim.lr_decay,
        'must be in (0, 1]')
  check(all(b > 0 for b in optim.lr_boundaries_epochs),
        'optim.lr_boundaries_epochs', optim.lr_boundaries_epochs,
        'must be positive epochs')
  check(optim.plateau_patience_epochs > 0, 'optim.plateau_patience_epochs',
        optim.plateau_patience_epochs, 'must be positive')


def learning_rate_schedule(optim: ml_collections.ConfigDict,
                           steps_per_epoch: int,
                           num_steps: int) -> Schedule:
  """The base learning rate as a function of the step (before plateau cuts)."""
  warmup = int(round(optim.warmup_epochs * steps_per_epoch))
  lr = optim.learning_rate
  if optim.schedule in ('constant', 'plateau'):
    main = optax.constant_schedule(lr)
  elif optim.schedule == 'step':
    # Boundaries after the last step never act (and may not fit in int32).
    boundaries = {b: optim.lr_decay for b in (
        int(round(e * steps_per_epoch)) - warmup
        for e in optim.lr_boundaries_epochs) if b <= num_steps}
    main = optax.piecewise_constant_schedule(lr, boundaries)
  elif optim.schedule == 'cosine':
    main = optax.cosine_decay_schedule(lr, max(1, num_steps - warmup))
  elif optim.schedule == 'one_cycle':
    return optax.cosine_onecycle_schedule(num_steps, lr)
  else:
    raise ValueError(
        f'config.optim.schedule={optim.schedule!r} is not a schedule.')
  if warmup == 0:
    return main
  return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def create_optimizer(optim: ml_collections.ConfigDict, params: Any,
                     steps_per_epoch: int,
                     num_steps: int) -> tuple[optax.GradientTransformation,
                                              Schedule]:
  """Returns (optimizer, base schedule) for the params tree `params`.

  With `schedule='plateau'` the optimizer's `update` takes `value=`, the
  training error of the batch; the learning rate is divided by 10 when its
  epoch average stops improving, at most `plateau_max_reductions` times.
  """
  labels = param_labels(params)
  multipliers = {'weight': 1.0, 'bias': optim.bias_lr_mult,
                 'last_weight': optim.last_layer_lr_mult,
                 'last_bias': optim.last_layer_lr_mult * optim.bias_lr_mult,
                 'norm': 1.0}
  decay_mask = jax.tree.map(lambda l: l in ('weight', 'last_weight'), labels)
  schedule = learning_rate_schedule(optim, steps_per_epoch, num_steps)
  parts = [
      optax.add_decayed_weights(optim.weight_decay, mask=decay_mask),
      optax.multi_transform(
          {k: optax.scale(m) for k, m in multipliers.items()}, labels),
      optax.sgd(schedule, momentum=optim.momentum or None,
                nesterov=optim.optimizer == 'nesterov'),
  ]
  if optim.schedule == 'plateau':
    parts.append(optax.contrib.reduce_on_plateau(
        factor=optim.lr_decay, patience=optim.plateau_patience_epochs,
        accumulation_size=steps_per_epoch,
        min_scale=optim.lr_decay ** optim.plateau_max_reductions * (1 - 1e-6)))
  return optax.chain(*parts), schedule


def _is_plateau(x: Any) -> bool:
  return isinstance(x, optax.contrib.ReduceLROnPlateauState)


def without_plateau_state(opt_state: Any) -> Any:
  """`opt_state` less reduce_on_plateau's bookkeeping, whose best value starts
  at +inf: what must stay finite (momentum, counts)."""
  return jax.tree.map(lambda x: None if _is_plateau(x) else x, opt_state,
                      is_leaf=_is_plateau)


def current_learning_rate(schedule: Schedule, opt_state: Any,
                          step: jax.Array) -> jax.Array:
  """The learning rate in effect at `step`, plateau reductions included."""
  lr = jnp.asarray(schedule(step), jnp.float32)
  for leaf in jax.tree.leaves(opt_state, is_leaf=_is_plateau):
    if _is_plateau(leaf):
      lr = lr * jnp.asarray(leaf.scale, jnp.float32)
  return lr
