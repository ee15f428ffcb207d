"""Orbax checkpoints of the train state in WORKDIR/checkpoints/<step>/.

Each checkpoint is one `StandardSave` pytree item ({'step', 'params',
'batch_stats', 'opt_state', 'rng'}), so plain orbax reads it without nin_jax:
`ocp.StandardCheckpointer().restore(WORKDIR/'checkpoints/<step>/default')`.
Restores go onto the shardings of the current mesh, so a checkpoint written on
N devices loads on M.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath


def create_manager(workdir: str, keep: int,
                   async_save: bool = True) -> ocp.CheckpointManager:
  """A manager for WORKDIR/checkpoints that keeps the newest `keep` steps."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True,
      enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(epath.Path(workdir) / 'checkpoints',
                               options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         force: bool = False) -> bool:
  """Starts saving `state` at `step` (asynchronously); True if it saves."""
  return manager.save(step, args=ocp.args.StandardSave(state), force=force)


def abstract_like(state: Any) -> Any:
  """ShapeDtypeStructs with the shardings of `state` (the restore target)."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      state)


def restore_latest(manager: ocp.CheckpointManager, target: Any
                   ) -> tuple[Optional[int], Any]:
  """Restores the newest readable checkpoint into the structure of `target`.

  Returns (step, state), or (None, target) when there is no checkpoint. A
  checkpoint that fails to load is skipped with a warning naming its step;
  nothing is deleted.
  """
  abstract = abstract_like(target)
  steps = sorted(manager.all_steps(), reverse=True)
  errors = []
  for step in steps:
    try:
      restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # pylint: disable=broad-except
      if _is_structure_mismatch(e):
        raise
      logging.warning('Checkpoint at step %d is unreadable (%s: %s); trying '
                      'the previous one.', step, type(e).__name__,
                      str(e).splitlines()[0][:300] if str(e) else '')
      errors.append(step)
      continue
    if errors:
      logging.warning('Restored step %d; skipped damaged checkpoint(s) at '
                      'step(s) %s.', step, errors)
    return step, restored
  if errors:
    raise RuntimeError(f'No readable checkpoint in {manager.directory}: '
                       f'steps {errors} are all damaged.')
  return None, target


def _is_structure_mismatch(error: Exception) -> bool:
  text = str(error).lower()
  return any(s in text for s in ('shape', 'structure', 'mismatch',
                                 'do not match', 'dict key'))
