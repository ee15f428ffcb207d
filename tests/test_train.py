"""Tests of the trainer: learning, resume, metrics, data parallelism."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
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
c.num_train_steps = 12
c.log_every_steps = 1
c.eval_every_steps = 6
c.checkpoint_every_steps = 6
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
  assert len(one['losses']) == 12
  # Same masks and batches; only the summation order of the batch means
  # differs. The updates amplify that rounding step by step (1e-6 at step 4,
  # up to 3e-4 at step 12), so early steps are held tighter than late ones.
  np.testing.assert_allclose(eight['losses'][:8], one['losses'][:8], rtol=5e-5)
  np.testing.assert_allclose(eight['losses'], one['losses'], rtol=2e-3)
  np.testing.assert_allclose(eight['eval'], one['eval'], rtol=2e-3)


def test_nonfinite_loss_stops_with_the_step(quickstart_config, tmp_path):
  c = short(quickstart_config, steps=20, learning_rate=1e30)
  c.model.batch_norm = False
  with pytest.raises(train.NonFiniteError, match=r'Step \d+'):
    train.train_and_evaluate(c, str(tmp_path / 'nan'))


def test_stall_detector_needs_flat_loss_and_equal_logits():
  detector = train.StallDetector(10, patience=2)
  ln10 = float(np.log(10))
  assert not detector.update(ln10, 0.5, 1)  # Flat loss, logits still differ.
  assert not detector.update(ln10, 0.0, 2)
  assert detector.update(ln10 + 1e-4, 0.0, 3) and detector.warned
  assert not detector.update(1.0, 0.0, 4)


def test_classic_stall_is_reported(quickstart_config, tmp_path, caplog):
  c = short(quickstart_config, steps=60, log_every_steps=5)
  c.model.batch_norm = False
  c.model.weight_init = 'faithful'
  c.learning_rate = 0.1
  train.train_and_evaluate(c, str(tmp_path / 'stall'))
  assert any('classic NiN stall' in r.getMessage() for r in caplog.records)


def test_skip_nonfinite_steps_continues_with_finite_state(quickstart_config,
                                                          tmp_path):
  c = short(quickstart_config, steps=6, learning_rate=1e30,
            skip_nonfinite_steps=True)
  c.model.batch_norm = False
  result = train.train_and_evaluate(c, str(tmp_path / 'skip'))
  assert result['step'] == 6
  state = ocp.StandardCheckpointer().restore(
      tmp_path / 'skip' / 'checkpoints' / '6' / 'default')
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state))


def test_relative_workdir(quickstart_config, tmp_path, monkeypatch):
  """The README's commands pass a relative --workdir; orbax needs absolute."""
  monkeypatch.chdir(tmp_path)
  result = train.train_and_evaluate(short(quickstart_config, steps=2),
                                    'runs/relative')
  assert result['step'] == 2
  assert (tmp_path / 'runs' / 'relative' / 'checkpoints' / '2').exists()
