"""Orbax checkpoints of the train state in WORKDIR/checkpoints/<step>/.

Each checkpoint is one `StandardSave` pytree item ({'step', 'params',
'batch_stats', 'opt_state', 'rng'}), so plain orbax reads it without nin_jax
on any number of devices (`read_numpy` is exactly that code). Training restores
go onto the shardings of the current mesh, so a checkpoint written on N devices
loads on M.
"""

from __future__ import annotations

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
  directory = epath.Path(workdir) / 'checkpoints'
  if '://' not in workdir:
    directory = directory.absolute()  # Orbax refuses relative paths.
  return ocp.CheckpointManager(directory, options=options,
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


def param_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{'mlpconv1/conv/kernel': shape, ...} of the 'params' subtree of `tree`."""
  params = tree['params'] if isinstance(tree, dict) else tree.params
  return {'/'.join(_key_name(k) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


def _check_shapes(step: int, saved: dict, current: dict,
                  directory) -> None:
  if saved == current:
    return
  differ = sorted(set(saved) ^ set(current)) or sorted(
      k for k in saved if saved[k] != current[k])
  name = differ[0]
  raise CheckpointMismatchError(
      f'The checkpoint at step {step} in {directory} holds a different model '
      f'than the current config: {name} is {saved.get(name, "absent")} there '
      f'and {current.get(name, "absent")} here ({len(differ)} parameter(s) '
      f'differ). Use a new --workdir or the config that wrote it.')


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
