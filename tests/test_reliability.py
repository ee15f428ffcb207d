"""Faults with real processes: SIGKILL anywhere, SIGTERM, damaged checkpoints.

The reference is one uninterrupted run; every interrupted run must end with
bit-identical parameters and optimizer state.
"""

import pathlib
import random
import shutil
import signal
import time
from typing import Optional

import pytest

from helpers import (STEPS, assert_identical, final_state, finish, launch,
                     resumed_from)
from nin_jax import checkpoints
from nin_jax import metric_writers
from nin_jax import train


def newest_complete_checkpoint(workdir) -> Optional[int]:
  """The newest step whose checkpoint plain orbax reads back whole (found
  without nin_jax's restore logic), or None."""
  directory = pathlib.Path(workdir) / 'checkpoints'
  if not directory.exists():
    return None
  for step in sorted((int(p.name) for p in directory.iterdir()
                      if p.name.isdigit()), reverse=True):
    try:
      state = checkpoints.read_numpy(str(directory / str(step) / 'default'))
    except Exception:  # pylint: disable=broad-except
      continue
    if int(state['step']) == step:
      return step
  return None


def launch_and_check_resume(workdir, fault=None):
  """Runs to the end or the fault; asserts that it resumed from the newest
  complete checkpoint on disk when it started. Returns (code, err)."""
  expected = newest_complete_checkpoint(workdir)
  code, err = finish(launch(workdir, fault))
  assert resumed_from(err) == expected, (fault, expected, err[-3000:])
  return code, err


def test_killed_three_times_and_preempted_once_resumes_bit_identical(
    reference, tmp_path):
  """SIGKILL between steps (step 3) and during a save's write (step 12), a
  SIGTERM, the preemption notice (step 14: it saves and exits 0), and a
  SIGKILL inside the final evaluation (the second of that run, which
  evaluates at steps 16 and 24): each run resumes from the newest complete
  checkpoint on disk, and the run that finishes ends bit-identical to the
  uninterrupted one."""
  workdir = tmp_path / 'killed'
  for fault in ('step:3', 'save:12', 'term:14', 'eval:2'):
    code, err = launch_and_check_resume(workdir, fault)
    if fault.startswith('term'):
      assert code == 0, err[-3000:]
      # The signal arrives while step 14 is logged, after that step's check:
      # the loop stops after the next step, and saves it.
      assert 'SIGTERM: saved step 15; exiting.' in err, err[-3000:]
      assert newest_complete_checkpoint(workdir) == 15
    else:
      assert code == -signal.SIGKILL, (fault, err[-3000:])
  code, err = launch_and_check_resume(workdir)
  assert code == 0, err[-3000:]
  assert_identical(final_state(workdir), reference)
  # Every step logged once, and the training time goes on from each
  # checkpoint's (a run that restarted the clock would log a drop).
  train_lines = [r for r in metric_writers.read_metrics(str(workdir))
                 if r['split'] == 'train']
  assert [r['step'] for r in train_lines] == list(range(1, STEPS + 1))
  seconds = [r['train_seconds'] for r in train_lines]
  assert all(0 < a < b for a, b in zip(seconds, seconds[1:])), seconds


@pytest.mark.slow
def test_sigkill_at_random_moments_during_and_between_saves(reference,
                                                            tmp_path):
  """Kills at seeded random moments: inside the asynchronous writes of the
  saves at steps 6 and 18, and from outside at a random wall time."""
  rng = random.Random(13)
  workdir = tmp_path / 'random'
  for step in (6, 18):
    code, err = launch_and_check_resume(
        workdir, f'save:{step}:{rng.uniform(0.0, 0.3):.3f}')
    assert code in (-signal.SIGKILL, 0), err[-3000:]
  expected = newest_complete_checkpoint(workdir)
  proc = launch(workdir)
  time.sleep(rng.uniform(0.5, 4.0))
  proc.kill()
  _, err = proc.communicate()
  # None: killed before it got as far as restoring.
  assert resumed_from(err) in (expected, None), (expected, err[-3000:])
  code, err = launch_and_check_resume(workdir)
  assert code == 0, err[-3000:]
  assert_identical(final_state(workdir), reference)


def corrupt_truncate(step_dir):
  files = sorted((f for f in step_dir.rglob('*') if f.is_file() and
                  f.stat().st_size > 1000), key=lambda f: -f.stat().st_size)
  with open(files[0], 'r+b') as f:
    f.truncate(files[0].stat().st_size // 3)


def corrupt_remove_metadata(step_dir):
  for f in step_dir.rglob('_METADATA'):
    f.unlink()


def run_to_18(reference_workdir, destination):
  """The uninterrupted run as it stood after step 18 (checkpoints at 6, 12,
  18): a copy of it without the final checkpoint."""
  shutil.copytree(reference_workdir, destination)
  shutil.rmtree(destination / 'checkpoints' / str(STEPS))
  return destination


@pytest.mark.slow
@pytest.mark.parametrize('damage', [corrupt_truncate, corrupt_remove_metadata])
def test_damaged_newest_checkpoint_falls_back(reference, reference_workdir,
                                              tmp_path, damage):
  workdir = run_to_18(reference_workdir, tmp_path / 'damaged')
  damage(workdir / 'checkpoints' / '18')
  code, err = finish(launch(workdir))
  assert code == 0, err[-3000:]
  assert 'step 18' in err and 'damaged' in err
  assert 'Resumed from the checkpoint at step 12' in err
  assert (workdir / 'damaged_checkpoints' / '18').exists()  # Kept, aside.
  assert_identical(final_state(workdir), reference)


@pytest.mark.slow
def test_checkpoint_of_another_model_is_refused(tmp_path, quickstart_config):
  c = quickstart_config
  c.train.num_train_steps = 2
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(c, workdir)
  (pathlib.Path(workdir) / 'config.json').unlink()  # Bypass the config check.
  c.model.batch_norm = False
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match=r'step 2 .*differ'):
    train.train_and_evaluate(c, workdir)
  assert (pathlib.Path(workdir) / 'checkpoints' / '2').exists()


@pytest.mark.slow
def test_disk_full_during_save_keeps_the_previous_checkpoint(
    tmp_path, quickstart_config, monkeypatch):
  c = quickstart_config
  c.train.num_train_steps, c.train.checkpoint_every_steps = 12, 6
  workdir = tmp_path / 'full'
  save = checkpoints.save

  def failing_save(manager, step, state, force=False):
    if step == 12:
      raise OSError(28, 'No space left on device')
    return save(manager, step, state, force)

  monkeypatch.setattr(checkpoints, 'save', failing_save)
  with pytest.raises(OSError, match='No space left'):
    train.train_and_evaluate(c, str(workdir))
  assert (workdir / 'checkpoints' / '6').exists()
  monkeypatch.setattr(checkpoints, 'save', save)
  result = train.train_and_evaluate(c, str(workdir))
  assert result['step'] == 12
