"""Tests of the trainer: learning, resume, metrics, data parallelism."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from nin_jax import input_pipeline
from nin_jax import metric_writers
from nin_jax import train

REPO = pathlib.Path(__file__).resolve().parents[1]


def short(config, steps=30, **fields):
  config.num_train_steps = steps
  config.schedule = 'step'
  config.lr_boundaries_epochs = (1.0,)
  config.log_every_steps = 1
  config.eval_every_steps = 10_000
  config.checkpoint_every_steps = 10
  config.update(fields)
  return config


def test_train_steps_lower_the_loss_on_a_fixed_batch(quickstart_config):
  c = quickstart_config
  c.augment = False
  c.model.dropout_rate = 0.0
  c.learning_rate = 0.05
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(32, 8, 8, 1)).astype(np.float32)
  labels = rng.integers(0, 10, 32).astype(np.int32)
  trainer = train.create_trainer(c, (8, 8, 1), 32)
  state = trainer.state
  images = jax.device_put(images, trainer.data_sharding)
  labels = jax.device_put(labels, trainer.data_sharding)
  losses = []
  for _ in range(25):
    state, metrics = trainer.train_fn(state, images, labels)
    losses.append(float(metrics['loss']))
  assert int(state.step) == 25
  assert losses[-1] < 0.5 * losses[0]


def test_quickstart_learns_writes_and_resumes(quickstart_config, tmp_path,
                                              caplog):
  workdir = str(tmp_path / 'qs')
  result = train.train_and_evaluate(quickstart_config, workdir)
  assert result['accuracy'] >= 0.97, result
  assert not any('NiN stall' in r.getMessage() for r in caplog.records)
  total = result['step']
  records = metric_writers.read_metrics(workdir)
  train_lines = [r for r in records if r['split'] == 'train']
  test_lines = [r for r in records if r['split'] == 'test']
  assert train_lines and test_lines
  assert {'loss', 'accuracy', 'learning_rate', 'images_per_sec'} <= set(
      train_lines[0])
  assert {'loss', 'accuracy', 'error'} <= set(test_lines[-1])
  assert test_lines[-1]['step'] == total
  assert list(pathlib.Path(workdir).glob('events.out.tfevents.*'))
  assert (pathlib.Path(workdir) / 'config.json').exists()
  steps = sorted(int(p.name) for p in (pathlib.Path(workdir) /
                                       'checkpoints').iterdir())
  assert steps[-1] == total and len(steps) <= quickstart_config.keep_checkpoints

  again = train.train_and_evaluate(quickstart_config, workdir)
  assert again['step'] == total
  assert again['accuracy'] == result['accuracy']
  new_train_lines = [r for r in metric_writers.read_metrics(workdir)
                     if r['split'] == 'train']
  assert len(new_train_lines) == len(train_lines)  # Nothing retrained.


def test_resume_continues_with_identical_state(quickstart_config, tmp_path):
  whole = str(tmp_path / 'whole')
  split = str(tmp_path / 'split')
  short(quickstart_config, steps=30)
  train.train_and_evaluate(quickstart_config, whole)
  first = short(quickstart_config, steps=20)
  train.train_and_evaluate(first, split)
  assert sorted(int(p.name) for p in (pathlib.Path(split) /
                                      'checkpoints').iterdir())[-1] == 20
  train.train_and_evaluate(short(quickstart_config, steps=30), split)
  # Plain orbax, without nin_jax: a pytree with params inside.
  a = ocp.StandardCheckpointer().restore(
      pathlib.Path(whole) / 'checkpoints' / '30' / 'default')
  b = ocp.StandardCheckpointer().restore(
      pathlib.Path(split) / 'checkpoints' / '30' / 'default')
  assert int(a['step']) == int(b['step']) == 30
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  la = [r['loss'] for r in metric_writers.read_metrics(whole)
        if r['split'] == 'train']
  lb = [r['loss'] for r in metric_writers.read_metrics(split)
        if r['split'] == 'train']
  assert la == lb


def test_batches_are_a_function_of_seed_and_step():
  split = input_pipeline.Split(np.arange(100, dtype=np.float32)[:, None, None,
                                                                None],
                               np.arange(100, dtype=np.int32))
  idx = [input_pipeline.train_batch_indices(3, s, 32, 100) for s in range(9)]
  epoch0 = np.concatenate(idx[:3])
  assert len(set(epoch0.tolist())) == 96  # No repeats within an epoch.
  assert not np.array_equal(idx[0], idx[3])  # Reshuffled each epoch.
  np.testing.assert_array_equal(
      idx[5], input_pipeline.train_batch_indices(3, 5, 32, 100))
  sharding = jax.sharding.NamedSharding(train.create_mesh(),
                                        jax.sharding.PartitionSpec('data'))
  resumed = next(input_pipeline.train_batches(split, 3, 32, 5, sharding))
  np.testing.assert_array_equal(np.asarray(resumed[1]), idx[5])


def test_eval_covers_every_example_once():
  n = 37
  split = input_pipeline.Split(np.zeros((n, 2, 2, 1), np.float32),
                               np.arange(n, dtype=np.int32) % 3)
  sharding = jax.sharding.NamedSharding(train.create_mesh(),
                                        jax.sharding.PartitionSpec('data'))
  seen = []
  for _, labels, mask in input_pipeline.eval_batches(split, 16, sharding):
    seen.append(int(np.asarray(mask).sum()))
  assert sum(seen) == n and len(seen) == 3


MULTI_DEVICE_SCRIPT = r'''
import json, sys
from absl import logging
logging.set_verbosity(logging.WARNING)
import jax
import importlib.util
spec = importlib.util.spec_from_file_location('q', sys.argv[1])
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
from nin_jax import train, metric_writers
c = m.get_config()
c.num_train_steps = 3
c.log_every_steps = 1
c.eval_every_steps = 3
c.checkpoint_every_steps = 3
result = train.train_and_evaluate(c, sys.argv[2])
losses = [r['loss'] for r in metric_writers.read_metrics(sys.argv[2])
          if r['split'] == 'train']
print(json.dumps({'devices': jax.device_count(), 'losses': losses,
                  'eval': result['loss']}))
'''


def run_on_devices(n, workdir):
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={n}'
  env['JAX_PLATFORMS'] = 'cpu'
  out = subprocess.run(
      [sys.executable, '-c', MULTI_DEVICE_SCRIPT,
       str(REPO / 'configs' / 'quickstart.py'), str(workdir)],
      env=env, capture_output=True, text=True, timeout=300, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_eight_devices_match_one(tmp_path):
  one = run_on_devices(1, tmp_path / 'one')
  eight = run_on_devices(8, tmp_path / 'eight')
  assert (one['devices'], eight['devices']) == (1, 8)
  assert len(one['losses']) == 3
  # Same masks, batches and dropout keys; only the summation order of the
  # batch means differs, by float rounding. Updates amplify that rounding
  # step by step, so only the first three steps (and the evaluation after
  # them) are compared, where it is still about 1e-7 relative.
  np.testing.assert_allclose(eight['losses'], one['losses'], rtol=1e-5)
  np.testing.assert_allclose(eight['eval'], one['eval'], rtol=1e-5)


def saved_states(workdir):
  """{step: state} of every checkpoint on disk, read with plain orbax."""
  directory = pathlib.Path(workdir) / 'checkpoints'
  return {int(p.name): ocp.StandardCheckpointer().restore(p / 'default')
          for p in directory.iterdir() if p.name.isdigit()}


def assert_all_finite(states):
  """Every saved leaf is finite, except reduce_on_plateau's best value, which
  is +inf until the first epoch ends (optax's bookkeeping, no overflow)."""
  checked = 0
  for step, state in states.items():
    for path, x in jax.tree_util.tree_leaves_with_path(state):
      name = jax.tree_util.keystr(path)
      if 'best_value' not in name:
        assert np.isfinite(np.asarray(x)).all(), (step, name)
        checked += 1
  assert checked > 0


def overflowing_run(config, tmp_path, schedule='step', **fields):
  """Trains 4 good steps (a checkpoint after each), then resumes to step 8
  at a learning rate whose float32 value is infinite: the loss and gradient
  of step 4 are finite, but the update overflows the parameters."""
  c = short(config, steps=4, checkpoint_every_steps=1, keep_checkpoints=20,
            schedule=schedule)
  workdir = str(tmp_path / 'overflow')
  train.train_and_evaluate(c, workdir)
  c.num_train_steps, c.learning_rate = 8, 1e300
  c.update(fields)
  return c, workdir


# 'plateau' keeps a best value that starts at +inf in its optimizer state:
# not an overflow.
@pytest.mark.parametrize('schedule', ['step', 'plateau'])
def test_update_that_overflows_is_stopped_and_never_saved(quickstart_config,
                                                          tmp_path, schedule):
  c, workdir = overflowing_run(quickstart_config, tmp_path, schedule)
  with pytest.raises(train.NonFiniteError,
                     match=r'Step 4: the update overflowed.*step 4 in'):
    train.train_and_evaluate(c, workdir)
  states = saved_states(workdir)
  assert sorted(states) == [1, 2, 3, 4]
  assert_all_finite(states)


def test_skip_mode_keeps_the_last_finite_state(quickstart_config, tmp_path,
                                               caplog):
  c, workdir = overflowing_run(quickstart_config, tmp_path,
                               skip_nonfinite_steps=True)
  assert train.train_and_evaluate(c, workdir)['step'] == 8
  assert sum('the update overflowed' in r.getMessage()
             for r in caplog.records) == 4
  states = saved_states(workdir)
  assert sorted(states) == list(range(1, 9))
  assert_all_finite(states)
  for step in range(5, 9):  # Every step skipped: the step-4 state, unchanged.
    assert int(states[step]['step']) == step
    for name in ('params', 'batch_stats', 'opt_state'):
      jax.tree.map(np.testing.assert_array_equal, states[step][name],
                   states[4][name])


def test_nonfinite_loss_in_skip_mode_saves_only_finite_state(
    quickstart_config, tmp_path):
  c = short(quickstart_config, steps=6, learning_rate=1e30,
            skip_nonfinite_steps=True, checkpoint_every_steps=2)
  c.model.batch_norm = False
  result = train.train_and_evaluate(c, str(tmp_path / 'skip'))
  assert result['step'] == 6
  states = saved_states(tmp_path / 'skip')
  assert sorted(states) == [2, 4, 6]
  assert_all_finite(states)


def test_relative_workdir(quickstart_config, tmp_path, monkeypatch):
  """The README's commands pass a relative --workdir; orbax needs absolute."""
  monkeypatch.chdir(tmp_path)
  result = train.train_and_evaluate(short(quickstart_config, steps=2),
                                    'runs/relative')
  assert result['step'] == 2
  assert (tmp_path / 'runs' / 'relative' / 'checkpoints' / '2').exists()
