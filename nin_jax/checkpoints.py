"""Orbax checkpoints of the train state in WORKDIR/checkpoints/<step>/.

Each checkpoint is one `StandardSave` pytree item ({'step', 'params',
'batch_stats', 'opt_state', 'rng'}), so plain orbax reads it without nin_jax
on any number of devices (`read_numpy` is exactly that code). Training restores
go onto the shardings of the current mesh, so a checkpoint written on N devices
loads on M.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath


def create_manager(workdir: str, keep: int,
                   async_save: bool = True) -> ocp.CheckpointManager:
  """A manager for WORKDIR/checkpoints that keeps the newest `keep` steps."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, cleanup_tmp_directories=True,
      enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_handlers=ocp.StandardCheckpointHandler())


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         force: bool = False) -> bool:
  """Starts saving `state` at `step` (asynchronously); True if it saves."""
  return manager.save(step, args=ocp.args.StandardSave(state), force=force)


def abstract_like(state: Any) -> Any:
  """ShapeDtypeStructs with the shardings of `state` (the restore target)."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      state)


def checkpoint_dir(workdir: str) -> epath.Path:
  """WORKDIR/checkpoints (absolute for a local path: orbax needs it)."""
  directory = epath.Path(workdir) / 'checkpoints'
  return directory if '://' in workdir else directory.absolute()


def checkpoint_steps(workdir: str) -> list[int]:
  """The steps of the complete checkpoints in `workdir`, ascending."""
  directory = checkpoint_dir(workdir)
  if not directory.exists():
    return []
  return sorted(ocp.path.step.checkpoint_steps(directory))


def read_numpy(item_dir: str) -> dict[str, Any]:
  """The pytree saved in WORKDIR/checkpoints/<step>/default, as NumPy arrays.

  Plain orbax, independent of the devices that wrote the checkpoint (a
  restore without a target would try to rebuild the writer's mesh).
  """
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(item_dir).item_metadata.tree
  numpy_args = jax.tree.map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return checkpointer.restore(item_dir, restore_args=numpy_args)


class CheckpointError(ValueError):
  """The workdir's checkpoints cannot be used by this run."""


class CheckpointMismatchError(CheckpointError):
  """A checkpoint holds a model of another shape than the current config's."""


class NoReadableCheckpointError(CheckpointError):
  """Every checkpoint in the workdir is damaged; none was deleted."""


def _key_name(key) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{'mlpconv1/conv/kernel': shape, ...} of the arrays of `tree`."""
  return {'/'.join(_key_name(k) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def param_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{'mlpconv1/conv/kernel': shape, ...} of the 'params' subtree of `tree`."""
  return _shapes(tree['params'] if isinstance(tree, dict) else tree.params)


def _differing(saved: dict, current: dict) -> list[str]:
  """The names whose shapes differ (present on one side only first)."""
  return sorted(set(saved) ^ set(current)) or sorted(
      k for k in saved if saved[k] != current[k])


def _check_shapes(step: int, saved: dict, current: dict,
                  directory) -> None:
  if saved == current:
    return
  differ = _differing(saved, current)
  name = differ[0]
  raise CheckpointMismatchError(
      f'The checkpoint at step {step} in {directory} holds a different model '
      f'than the current config: {name} is {saved.get(name, "absent")} there '
      f'and {current.get(name, "absent")} here ({len(differ)} parameter(s) '
      f'differ). Use a new --workdir or the config that wrote it.')


def _check_training_state(step: int, saved_tree: Any, target: Any,
                          directory) -> None:
  """Raises CheckpointError if the checkpoint lacks parts of a train state
  (the weights-only checkpoint of an import): it is whole, not damaged."""
  if not isinstance(saved_tree, dict):
    return
  parts = ({f.name: getattr(target, f.name) for f in dataclasses.fields(target)}
           if dataclasses.is_dataclass(target) else dict(target))
  # A part without arrays (the BatchNorm statistics of a model without
  # BatchNorm) may be absent from any checkpoint.
  missing = [k for k, v in parts.items()
             if jax.tree.leaves(v) and k not in saved_tree]
  if missing:
    workdir = epath.Path(directory).parent
    raise CheckpointError(
        f'The checkpoint at step {step} in {directory} holds '
        f'{sorted(saved_tree)} but no {missing}: the weights of a model (as '
        f'nin_jax.caffe_import writes), not a training state to resume. '
        f'Start a run from them in a new --workdir with '
        f'--config.train.init_from={workdir}.')


def restore_latest(manager: ocp.CheckpointManager, target: Any
                   ) -> tuple[Optional[int], Any]:
  """Restores the newest readable checkpoint into the structure of `target`.

  Returns (step, state), or (None, target) when there is no checkpoint. A
  checkpoint that fails to load is skipped with a warning naming its step;
  nothing is deleted. A readable checkpoint of another model raises
  CheckpointMismatchError naming the first differing parameter.
  """
  abstract = abstract_like(target)
  current = param_shapes(target)
  errors = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      metadata = manager.item_metadata(step)
      saved = param_shapes(getattr(metadata, 'tree', metadata))
    except Exception as e:  # pylint: disable=broad-except
      _warn_damaged(step, e)
      errors.append(step)
      continue
    _check_training_state(step, getattr(metadata, 'tree', metadata), target,
                          manager.directory)
    _check_shapes(step, saved, current, manager.directory)
    try:
      restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # pylint: disable=broad-except
      _warn_damaged(step, e)
      errors.append(step)
      continue
    if errors:
      _set_aside(manager, errors)
      logging.warning('Restored step %d; moved damaged checkpoint(s) %s to '
                      '%s.', step, errors, _damaged_dir(manager))
    return step, restored
  if errors:
    raise NoReadableCheckpointError(
        f'No readable checkpoint in {manager.directory}: steps {errors} are '
        'all damaged (kept as they are). Move that directory aside to start '
        'over, or resume from a copy of the workdir.')
  return None, target


def _damaged_dir(manager: ocp.CheckpointManager) -> epath.Path:
  return epath.Path(manager.directory).parent / 'damaged_checkpoints'


def _set_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
  """Moves damaged steps out of the manager's directory (never deletes them),
  so that training can write those steps again."""
  if jax.process_index() == 0:
    target = _damaged_dir(manager)
    target.mkdir(parents=True, exist_ok=True)
    for step in steps:
      source = epath.Path(manager.directory) / str(step)
      destination = target / str(step)
      suffix = 1
      while destination.exists():
        destination = target / f'{step}.{suffix}'
        suffix += 1
      source.rename(destination)
  manager.reload()


def _warn_damaged(step: int, error: Exception) -> None:
  first_line = str(error).splitlines()[0][:300] if str(error) else ''
  logging.warning('Checkpoint at step %d is damaged or incomplete (%s: %s); '
                  'trying the previous one.', step, type(error).__name__,
                  first_line)


def parse_init_from(spec: str) -> tuple[str, Optional[int]]:
  """'WORKDIR' or 'WORKDIR:STEP' (config.train.init_from) -> (workdir, step
  or None for the newest)."""
  head, sep, tail = spec.rpartition(':')
  if sep and tail.isdigit() and head and not head.endswith(':/'):
    return head, int(tail)
  return spec, None


def init_from_step(spec: str) -> int:
  """The step config.train.init_from names (its newest if none is given);
  CheckpointError naming the field if the workdir or the step is missing."""
  workdir, step = parse_init_from(spec)
  steps = checkpoint_steps(workdir)
  if not steps:
    raise CheckpointError(
        f'config.train.init_from={spec}: {checkpoint_dir(workdir)} holds no '
        f'complete checkpoint; name a workdir that python -m nin_jax.main or '
        f'nin_jax.caffe_import wrote.')
  if step is None:
    return max(steps)
  if step not in steps:
    raise CheckpointError(
        f'config.train.init_from={spec}: no checkpoint at step {step}; that '
        f'workdir has steps {steps}.')
  return step


def init_from_shapes(spec: str) -> dict[str, dict[str, tuple[int, ...]]]:
  """{'params': shapes, 'batch_stats': shapes} of the checkpoint
  config.train.init_from names, from its metadata alone (nothing read)."""
  workdir, _ = parse_init_from(spec)
  step = init_from_step(spec)
  tree = ocp.PyTreeCheckpointer().metadata(
      str(checkpoint_dir(workdir) / str(step) / 'default')).item_metadata.tree
  return {part: _shapes(tree.get(part) or {})
          for part in ('params', 'batch_stats')}


def check_init_from(spec: str, params: Any, batch_stats: Any) -> None:
  """Raises CheckpointMismatchError naming the first parameter (or BatchNorm
  statistic) whose shape differs between config.train.init_from's checkpoint
  and this run's model (`params`, `batch_stats`: arrays or shape structs)."""
  saved = init_from_shapes(spec)
  for part, tree in (('params', params), ('batch_stats', batch_stats)):
    here = _shapes(tree)
    if saved[part] == here:
      continue
    differ = _differing(saved[part], here)
    name = differ[0]
    raise CheckpointMismatchError(
        f'config.train.init_from={spec}: {part} {name} is '
        f'{saved[part].get(name, "absent")} there and '
        f'{here.get(name, "absent")} in this run\'s model ({len(differ)} '
        f'differ); start from a workdir of the same config.model.')


def read_init_from(spec: str) -> tuple[int, dict[str, Any]]:
  """(step, {'params', 'batch_stats'}) of config.train.init_from's checkpoint,
  as NumPy arrays (plain orbax: any device count wrote it)."""
  workdir, _ = parse_init_from(spec)
  step = init_from_step(spec)
  return step, read_weights(workdir, step)


def read_weights(workdir: str, step: int) -> dict[str, Any]:
  """{'params', 'batch_stats'} of WORKDIR's checkpoint at `step`, as NumPy
  arrays (plain orbax: any device count wrote it)."""
  tree = read_numpy(str(checkpoint_dir(workdir) / str(step) / 'default'))
  return {'params': tree['params'],
          'batch_stats': tree.get('batch_stats') or {}}
