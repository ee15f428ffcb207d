"""config.train.init_from: a new run starts from another workdir's parameters
(another run's, or an imported model's weights-only checkpoint)."""


import jax
import numpy as np
import pytest

from helpers import assert_identical
from nin_jax import checkpoints
from nin_jax import metric_writers
from nin_jax import train


def short(c, steps):
  c.train.num_train_steps = steps
  c.train.eval_every_steps = c.train.checkpoint_every_steps = steps
  c.train.log_every_steps = 1
  return c


@pytest.fixture(scope='module')
def source(tmp_path_factory):
  """The quick start trained 3 steps, checkpoints at 2 and 3: (workdir, its
  checkpoint arrays by step)."""
  from helpers import REPO  # pylint: disable=g-import-not-at-top
  from nin_jax import config_lib  # pylint: disable=g-import-not-at-top
  c = short(config_lib.load_config_file(
      str(REPO / 'configs' / 'quickstart.py')), 3)
  c.train.checkpoint_every_steps = 2
  workdir = tmp_path_factory.mktemp('source') / 'run'
  train.train_and_evaluate(c, str(workdir))
  saved = {step: checkpoints.read_numpy(
      str(workdir / 'checkpoints' / str(step) / 'default')) for step in (2, 3)}
  return workdir, saved


@pytest.mark.parametrize('suffix, step', [('', 3), (':2', 2)])
def test_a_run_starts_from_the_parameters_of_another(source, quickstart_config,
                                                      tmp_path, suffix, step):
  """At learning rate 1e-30 one step leaves the parameters those of the
  source checkpoint to float32 rounding (a fresh init is nowhere near); the
  step and PRNG key are a fresh run's, and it writes its own checkpoints
  only."""
  workdir, saved = source
  c = short(quickstart_config, 1)
  c.train.init_from = f'{workdir}{suffix}'
  c.optim.learning_rate = 1e-30
  c.optim.schedule, c.optim.warmup_epochs = 'constant', 0.0
  result = train.train_and_evaluate(c, str(tmp_path / 'new'))
  assert result['step'] == 1
  new = checkpoints.read_numpy(str(tmp_path / 'new' / 'checkpoints' / '1' /
                                   'default'))
  for a, b in zip(jax.tree.leaves(new['params']),
                  jax.tree.leaves(saved[step]['params'])):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-12)
  assert int(new['step']) == 1
  fresh = train.create_trainer(c, (8, 8, 1), 1438).state
  np.testing.assert_array_equal(new['rng'], np.asarray(fresh.rng))
  # BatchNorm's running statistics start from the source's: one training
  # step moves them by momentum 0.1 (flax's 0.9) towards the batch's, so
  # they are neither the source's nor a fresh run's.
  first = jax.tree.leaves(new['batch_stats'])[0]
  assert not np.array_equal(first, jax.tree.leaves(
      saved[step]['batch_stats'])[0])
  assert not np.array_equal(first, jax.tree.leaves(fresh.batch_stats)[0])
  assert sorted(p.name for p in (tmp_path / 'new' / 'checkpoints').iterdir()
                if p.name.isdigit()) == ['1']


def test_start_from_places_every_array_as_the_state_it_replaces(
    source, quickstart_config):
  workdir, saved = source
  state = train.create_trainer(quickstart_config, (8, 8, 1), 1438).state
  started = train.start_from(state, str(workdir))
  assert_identical(jax.device_get(started.params), saved[3]['params'])
  assert_identical(jax.device_get(started.batch_stats),
                   saved[3]['batch_stats'])
  assert_identical(jax.device_get(started.opt_state),
                   jax.device_get(state.opt_state))
  assert int(started.step) == 0
  for new, old in zip(jax.tree.leaves(started), jax.tree.leaves(state)):
    assert new.sharding == old.sharding and new.dtype == old.dtype


def test_a_resumed_run_ignores_init_from(source, quickstart_config, tmp_path,
                                         caplog):
  workdir, _ = source
  caplog.set_level('INFO', logger='absl')
  c = short(quickstart_config, 2)
  c.train.checkpoint_every_steps = 1
  c.train.init_from = str(workdir)
  train.train_and_evaluate(c, str(tmp_path / 'new'))
  train_lines = [r for r in metric_writers.read_metrics(str(tmp_path / 'new'))
                 if r['split'] == 'train']
  c.train.num_train_steps = 3
  train.train_and_evaluate(c, str(tmp_path / 'new'))
  messages = [r.getMessage() for r in caplog.records]
  assert 'Resumed from the checkpoint at step 2.' in messages
  assert 'config.train.init_from is not used: this run resumes.' in messages
  assert sum('Starting from the parameters of' in m for m in messages) == 1
  assert len(train_lines) == 2


@pytest.mark.parametrize('change, error', [
    (lambda c: setattr(c.model, 'batch_norm', False),
     "params mlpconv1/bn0/bias is (64,) there and absent in this run's model "
     '(27 differ)'),
    (lambda c: setattr(c.model, 'head', 'fc'),
     "params fc/bias is absent there and (10,) in this run's model (2 "
     'differ)'),
], ids=['no_batch_norm', 'fc_head'])
def test_another_architecture_is_one_error_before_anything_is_written(
    source, quickstart_config, tmp_path, change, error):
  workdir, _ = source
  c = short(quickstart_config, 1)
  c.train.init_from = str(workdir)
  change(c)
  with pytest.raises(checkpoints.CheckpointMismatchError) as raised:
    train.train_and_evaluate(c, str(tmp_path / 'new'))
  assert str(raised.value) == (
      f'config.train.init_from={workdir}: {error}; start from a workdir of '
      'the same config.model.')
  assert not (tmp_path / 'new').exists()


def test_a_missing_workdir_or_step_is_one_error(source, quickstart_config,
                                                tmp_path):
  workdir, _ = source
  c = short(quickstart_config, 1)
  c.train.init_from = str(tmp_path / 'nowhere')
  with pytest.raises(checkpoints.CheckpointError, match=(
      rf'^config.train.init_from={tmp_path}/nowhere: {tmp_path}/nowhere/'
      r'checkpoints holds no complete checkpoint; name a workdir')):
    train.train_and_evaluate(c, str(tmp_path / 'new'))
  c.train.init_from = f'{workdir}:7'
  with pytest.raises(checkpoints.CheckpointError, match=(
      rf'^config.train.init_from={workdir}:7: no checkpoint at step 7; that '
      r'workdir has steps \[2, 3\]\.$')):
    train.train_and_evaluate(c, str(tmp_path / 'new'))
  assert not (tmp_path / 'new').exists()


def test_a_weights_only_checkpoint_is_named_as_such_and_starts_a_run(
    quickstart_config, tmp_path):
  """The checkpoint nin_jax.caffe_import writes ({'step', 'params'} at step 0,
  of a model without BatchNorm) is whole: resuming it says what it lacks and
  how to start from it, and a run started from it trains."""
  c = short(quickstart_config, 1)
  c.model.batch_norm = False
  params = jax.device_get(train.create_trainer(c, (8, 8, 1), 1438).state.params)
  weights = tmp_path / 'weights'
  manager = checkpoints.create_manager(str(weights), keep=1, async_save=False)
  checkpoints.save(manager, 0, {'step': np.int32(0), 'params': params})
  manager.close()
  with pytest.raises(checkpoints.CheckpointError, match=(
      rf"^The checkpoint at step 0 in {weights}/checkpoints holds \['params', "
      r"'step'\] but no \['opt_state', 'rng'\]: the weights of "
      r'a model \(as nin_jax.caffe_import writes\), not a training state to '
      r'resume. Start a run from them in a new --workdir with '
      rf'--config.train.init_from={weights}\.$')):
    train.train_and_evaluate(c, str(weights))
  assert checkpoints.checkpoint_steps(str(weights)) == [0]  # Nothing moved.
  assert not (weights / 'damaged_checkpoints').exists()
  c.train.init_from = str(weights)
  assert train.train_and_evaluate(c, str(tmp_path / 'new'))['step'] == 1
