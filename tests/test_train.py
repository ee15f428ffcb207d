"""Tests of the trainer: learning, resume, metrics, data parallelism."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import grouped
from nin_jax import batching
from nin_jax import config_lib
from nin_jax import datasets
from nin_jax import errors
from nin_jax import hooks
from nin_jax import input_pipeline
from nin_jax import metric_writers
from nin_jax import train

REPO = pathlib.Path(__file__).resolve().parents[1]


def short(config, steps=30, **fields):
  config.train.num_train_steps = steps
  config.optim.schedule = 'step'
  config.optim.lr_boundaries_epochs = (1.0,)
  config.train.log_every_steps = 1
  config.train.eval_every_steps = 10_000
  config.train.checkpoint_every_steps = 10
  config.update(grouped(fields))
  return config


def sub_jaxprs(value):
  """The jaxprs inside an equation's parameter (a jaxpr, a closed jaxpr, or a
  sequence of them: jit, custom_vjp, cond and scan bodies)."""
  if hasattr(value, 'eqns'):
    return [value]
  if hasattr(value, 'jaxpr') and hasattr(value.jaxpr, 'eqns'):
    return [value.jaxpr]
  if isinstance(value, (tuple, list)):
    return [j for v in value for j in sub_jaxprs(v)]
  return []


def matmul_operand_dtypes(jaxpr) -> list[tuple[str, ...]]:
  """The operand dtypes of every convolution and matrix product in `jaxpr`
  and its sub-jaxprs: XLA's convolutions and dots (1x1 convolutions) and the
  oneDNN plugin's forward and gradient convolutions."""
  found = []
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name in ('conv_general_dilated', 'dot_general') or name.startswith(
        'nin_onednn_conv'):
      found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
    for value in eqn.params.values():
      for sub in sub_jaxprs(value):
        found.extend(matmul_operand_dtypes(sub))
  return found


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_train_steps_lower_the_loss_on_a_fixed_batch(quickstart_config,
                                                     dtype):
  """The quick-start model learns a fixed batch; with model.dtype=bfloat16
  every convolution and matrix product of the step (forward and backward)
  computes in bfloat16 while the parameters, BatchNorm statistics and
  momentum stay float32."""
  c = quickstart_config
  c.data.augment = False
  c.model.dropout_rate = 0.0
  c.model.dtype = dtype
  c.optim.learning_rate = 0.05
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(32, 8, 8, 1)).astype(np.float32)
  labels = rng.integers(0, 10, 32).astype(np.int32)
  trainer = train.create_trainer(c, (8, 8, 1), 32)
  state = trainer.state
  batch = {'image': jax.device_put(images, trainer.data_sharding),
           'label': jax.device_put(labels, trainer.data_sharding)}
  products = matmul_operand_dtypes(
      jax.make_jaxpr(trainer.train_fn)(state, batch).jaxpr)
  # 3 blocks of 3 layers (2 in the last): 8 forward, 15 backward (no input
  # gradient for the first layer) at the least.
  assert len(products) >= 23, products
  assert set(products) == {(dtype, dtype)}, products
  losses = []
  for _ in range(25):
    state, metrics = trainer.train_fn(state, batch)
    losses.append(float(metrics['loss']))
  assert int(state.step) == 25
  assert losses[-1] < 0.5 * losses[0], losses
  kept = jax.tree.leaves((state.params, state.batch_stats, state.opt_state))
  assert {x.dtype for x in kept if jnp.issubdtype(x.dtype, jnp.inexact)} == {
      jnp.dtype(jnp.float32)}


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
  assert steps[-1] == total and len(steps) <= quickstart_config.train.keep_checkpoints

  again = train.train_and_evaluate(quickstart_config, workdir)
  assert again['step'] == total
  assert again['accuracy'] == result['accuracy']
  new_train_lines = [r for r in metric_writers.read_metrics(workdir)
                     if r['split'] == 'train']
  assert len(new_train_lines) == len(train_lines)  # Nothing retrained.


def test_batches_are_a_function_of_seed_and_step():
  split = batching.Split(np.arange(100, dtype=np.float32)[:, None, None,
                                                                None],
                               np.arange(100, dtype=np.int32))
  idx = [batching.train_batch_indices(3, s, 32, 100) for s in range(9)]
  epoch0 = np.concatenate(idx[:3])
  assert len(set(epoch0.tolist())) == 96  # No repeats within an epoch.
  assert not np.array_equal(idx[0], idx[3])  # Reshuffled each epoch.
  np.testing.assert_array_equal(
      idx[5], batching.train_batch_indices(3, 5, 32, 100))
  sharding = jax.sharding.NamedSharding(train.create_mesh(),
                                        jax.sharding.PartitionSpec('data'))
  resumed = next(batching.train_batches(split, 3, 32, 5, sharding))
  np.testing.assert_array_equal(np.asarray(resumed['label']), idx[5])


def test_eval_covers_every_example_once():
  n = 37
  split = batching.Split(np.zeros((n, 2, 2, 1), np.float32),
                               np.arange(n, dtype=np.int32) % 3)
  sharding = jax.sharding.NamedSharding(train.create_mesh(),
                                        jax.sharding.PartitionSpec('data'))
  seen = []
  for batch in batching.eval_batches(split, 16, sharding):
    seen.append(int(np.asarray(batch['mask']).sum()))
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
c.train.num_train_steps = 3
c.train.log_every_steps = 1
c.train.eval_every_steps = 3
c.train.checkpoint_every_steps = 3
result = train.train_and_evaluate(c, sys.argv[2])
losses = [r['loss'] for r in metric_writers.read_metrics(sys.argv[2])
          if r['split'] == 'train']
print(json.dumps({'devices': jax.device_count(), 'losses': losses,
                  'eval': result['loss']}))
'''


def start_on_devices(n, workdir):
  """Starts MULTI_DEVICE_SCRIPT on `n` virtual CPU devices."""
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={n}'
  env['JAX_PLATFORMS'] = 'cpu'
  return subprocess.Popen(
      [sys.executable, '-c', MULTI_DEVICE_SCRIPT,
       str(REPO / 'configs' / 'quickstart.py'), str(workdir)],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def result_of(proc):
  """The JSON line a MULTI_DEVICE_SCRIPT process prints last."""
  try:
    out, err = proc.communicate(timeout=300)
  except subprocess.TimeoutExpired:
    proc.kill()
    raise
  assert proc.returncode == 0, err[-3000:]
  return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_eight_devices_match_one(tmp_path):
  # The two runs are independent processes: started together, they compile
  # side by side.
  procs = [start_on_devices(n, tmp_path / str(n)) for n in (1, 8)]
  one, eight = [result_of(p) for p in procs]
  assert (one['devices'], eight['devices']) == (1, 8)
  assert len(one['losses']) == 3
  # Same masks, batches and dropout keys: only float32 rounding differs. On 8
  # devices each reduction over the batch (the loss and gradient means, the
  # BatchNorm statistics, the evaluation sums) is 8 per-device partial sums
  # added across devices instead of one sum, and each device's convolutions
  # see a batch of 8, not 64, so oneDNN's (or XLA's) kernels block and
  # accumulate in another order, which also depends on the CPU's vector
  # width. Each is a rounding of about 1e-7 relative; step 1's loss carries
  # only the forward pass's, every update adds the gradient's to the
  # parameters, and the following steps amplify it, so the gap grows with
  # the steps. Hence only 3 steps and the evaluation after them: measured
  # here, 1.0e-7 (one float32 ulp of a loss near 2.3) and 1.5e-7 relative.
  # rtol 1e-5 leaves a hundredfold margin for other CPUs, and is far below
  # what a real difference makes: another dropout key per device count moved
  # the three losses by 0.3% to 2%.
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


def overflow_base_config(schedule):
  """4 good steps of the quick start with `schedule`, a checkpoint after each."""
  c = config_lib.load_config_file(str(REPO / 'configs' / 'quickstart.py'))
  return short(c, steps=4, checkpoint_every_steps=1, keep_checkpoints=20,
               schedule=schedule)


@pytest.fixture(scope='module')
def overflow_bases(tmp_path_factory):
  """schedule -> the workdir of `overflow_base_config(schedule)` trained, once
  per schedule in this module: the overflow tests copy it, never change it."""
  bases = {}

  def base(schedule):
    if schedule not in bases:
      workdir = tmp_path_factory.mktemp(f'overflow_base_{schedule}')
      train.train_and_evaluate(overflow_base_config(schedule), str(workdir))
      bases[schedule] = workdir
    return bases[schedule]

  return base


def overflowing_run(overflow_bases, tmp_path, schedule='step', **fields):
  """A copy of the 4 good steps of `overflow_base_config(schedule)`, and the
  config that resumes it to step 6 at a learning rate whose float32 value is
  infinite: the loss and gradient of step 4 are finite, but the update
  overflows the parameters."""
  workdir = tmp_path / 'overflow'
  shutil.copytree(overflow_bases(schedule), workdir)
  c = overflow_base_config(schedule)
  c.train.num_train_steps, c.optim.learning_rate = 6, 1e300
  c.update(grouped(fields))
  return c, str(workdir)


# 'plateau' keeps a best value that starts at +inf in its optimizer state:
# not an overflow.
@pytest.mark.slow
@pytest.mark.parametrize('schedule', ['step', 'plateau'])
def test_update_that_overflows_is_stopped_and_never_saved(overflow_bases,
                                                          tmp_path, schedule):
  c, workdir = overflowing_run(overflow_bases, tmp_path, schedule)
  with pytest.raises(
      errors.NonFiniteError,
      match=r'^Step 4: the update overflowed the parameters, momentum or '
      r'BatchNorm statistics \(loss [0-9.]+, gradient norm [0-9.]+\); '
      r'stopped\. The last good checkpoint is step 4 in '
      + re.escape(f'{workdir}/checkpoints.')):
    train.train_and_evaluate(c, workdir)
  states = saved_states(workdir)
  assert sorted(states) == [1, 2, 3, 4]
  assert_all_finite(states)


@pytest.mark.slow
def test_skip_mode_keeps_the_last_finite_state(overflow_bases, tmp_path,
                                               caplog):
  c, workdir = overflowing_run(overflow_bases, tmp_path,
                               skip_nonfinite_steps=True)
  assert train.train_and_evaluate(c, workdir)['step'] == 6
  assert sum('the update overflowed' in r.getMessage()
             for r in caplog.records) == 2
  states = saved_states(workdir)
  assert sorted(states) == list(range(1, 7))
  assert_all_finite(states)
  for step in (5, 6):  # Both steps skipped: the step-4 state, unchanged.
    assert int(states[step]['step']) == step
    for name in ('params', 'batch_stats', 'opt_state'):
      jax.tree.map(np.testing.assert_array_equal, states[step][name],
                   states[4][name])


@pytest.mark.slow
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


@pytest.mark.slow
def test_relative_workdir(quickstart_config, tmp_path, monkeypatch):
  """The README's commands pass a relative --workdir; orbax needs absolute."""
  monkeypatch.chdir(tmp_path)
  result = train.train_and_evaluate(short(quickstart_config, steps=2),
                                    'runs/relative')
  assert result['step'] == 2
  assert (tmp_path / 'runs' / 'relative' / 'checkpoints' / '2').exists()


class FakeWriter:
  def __init__(self):
    self.rows = []

  def write(self, step, split, record):
    self.rows.append((step, split, record))


def step_metrics(loss=1.0, finite=True):
  return {'loss': np.float32(loss), 'accuracy': np.float32(0.5),
          'grad_norm': np.float32(1.0), 'logit_spread': np.float32(1.0),
          'learning_rate': np.float32(0.1), 'finite': np.bool_(finite)}


def test_images_per_second_count_training_time_alone(quickstart_config,
                                                     monkeypatch):
  """The first (compiling) step and time inside `paused` (evaluation,
  checkpoints) are left out of img/s and the ETA."""
  now = [0.0]
  monkeypatch.setattr(hooks.time, 'perf_counter', lambda: now[0])
  c = quickstart_config
  c.train.batch_size, c.train.log_every_steps = 10, 4
  writer = FakeWriter()
  log = hooks.TrainLog(c, writer, steps_per_epoch=100, total_steps=8,
                       num_classes=10)
  for done in range(1, 9):
    now[0] += 1000.0 if done == 1 else 2.0  # Step 1 compiles.
    log.record(done, step_metrics())
    if done == 2:
      with log.paused():
        now[0] += 500.0  # An evaluation.
    if log.due(done):
      log.flush(done, 'none')
  (_, _, first), (_, _, second) = [r for r in writer.rows]
  # Steps 2-4 (3 steps, 6 s), then steps 5-8 (4 steps, 8 s): 5 img/s.
  assert first['images_per_sec'] == pytest.approx(3 * 10 / 6.0)
  assert second['images_per_sec'] == pytest.approx(4 * 10 / 8.0)


def test_metrics_leave_the_device_only_at_log_eval_and_save_steps(
    quickstart_config, tmp_path, monkeypatch):
  flushed = []
  flush = hooks.TrainLog.flush

  def recording(self, done, last_good):
    flushed.append(done)
    return flush(self, done, last_good)

  monkeypatch.setattr(hooks.TrainLog, 'flush', recording)
  fetched = []
  device_get = jax.device_get
  monkeypatch.setattr(train.jax, 'device_get',
                      lambda x: fetched.append(1) or device_get(x))
  lookups = []
  lookup = datasets.lookup
  monkeypatch.setattr(datasets, 'lookup',
                      lambda name: lookups.append(name) or lookup(name))
  c = short(quickstart_config, steps=12, log_every_steps=5,
            eval_every_steps=8, checkpoint_every_steps=6)
  train.train_and_evaluate(c, str(tmp_path / 'run'))
  # The run resolves its dataset once and hands the spec on.
  assert lookups == ['sklearn:digits']
  assert flushed == [5, 6, 8, 10, 12]
  # One fetch per flush and one per evaluation (steps 8 and 12).
  assert len(fetched) == len(flushed) + 2


def test_nonfinite_step_is_reported_at_its_own_step_when_fetched_late(
    quickstart_config):
  c = quickstart_config
  c.train.log_every_steps = 10
  log = hooks.TrainLog(c, FakeWriter(), 100, 100, 10)
  for done, finite in ((1, True), (2, True), (3, False), (4, False)):
    log.record(done, step_metrics(float('nan') if not finite else 1.0,
                                  finite))
  with pytest.raises(errors.NonFiniteError, match=r'^Step 2: loss nan'):
    log.flush(4, 'step 0')


def test_profile_steps_writes_a_trace_into_the_workdir(quickstart_config,
                                                       tmp_path, caplog):
  # The absl logger's own level, which flag parsing elsewhere in the worker
  # may have set to WARNING, not only the root's.
  caplog.set_level('INFO', logger='absl')
  c = short(quickstart_config, steps=4, profile_steps=2)
  train.train_and_evaluate(c, str(tmp_path / 'run'))
  traces = list((tmp_path / 'run' / 'profile').rglob('*.xplane.pb'))
  assert len(traces) == 1 and traces[0].stat().st_size > 0
  assert any('Profile of steps 2-3' in r.getMessage() for r in caplog.records)


def test_a_finished_run_resumed_evaluates_and_trains_no_further(
    quickstart_config, tmp_path):
  c = short(quickstart_config, steps=3)
  workdir = str(tmp_path / 'run')
  first = train.train_and_evaluate(c, workdir)
  again = train.train_and_evaluate(c, workdir)
  assert again['step'] == first['step'] == 3
  assert again['accuracy'] == first['accuracy']
  records = metric_writers.read_metrics(workdir)
  assert [r['step'] for r in records if r['split'] == 'train'] == [1, 2, 3]
  assert [r['step'] for r in records if r['split'] == 'test'] == [3]


def test_pipeline_batches_are_dicts_and_close(quickstart_config):
  images = np.arange(40, dtype=np.float32).reshape(10, 2, 2, 1)
  dataset = input_pipeline.Dataset(
      'sklearn:digits', batching.Split(images, np.arange(10) % 3),
      batching.Split(images[:7], np.arange(7) % 3), 3)
  mesh = train.create_mesh()
  pipeline = input_pipeline.Pipeline(
      dataset, seed=0, batch_size=4, eval_batch_size=100,
      sharding=jax.sharding.NamedSharding(mesh,
                                          jax.sharding.PartitionSpec('data')))
  with pipeline.train_iter(start_step=2) as batches:
    batch = next(batches)
  assert set(batch) == {'image', 'label'} and batch['image'].shape == (
      4, 2, 2, 1)
  np.testing.assert_array_equal(
      np.asarray(batch['label']),
      np.arange(10)[batching.train_batch_indices(0, 2, 4, 10)] % 3)
  evaluation = list(pipeline.eval_iter())
  # The batch of 100 shrinks to the 7 examples (rounded up to the devices).
  assert len(evaluation) == 1 and set(evaluation[0]) == {'image', 'label',
                                                         'mask'}
  assert int(np.asarray(evaluation[0]['mask']).sum()) == 7



def test_a_resumed_run_logs_each_step_once(tmp_path):
  """Lines a killed run logged after its last checkpoint are dropped when the
  run resumes from that checkpoint (they are logged again)."""
  writer = metric_writers.MetricWriter(str(tmp_path), enabled=True)
  for step in range(1, 6):
    writer.write(step, 'train', {'loss': float(step)})
  writer.close()
  writer = metric_writers.MetricWriter(str(tmp_path), enabled=True,
                                       resume_step=3)
  writer.write(4, 'train', {'loss': 40.0})
  writer.close()
  records = metric_writers.read_metrics(str(tmp_path))
  assert [(r['step'], r['loss']) for r in records] == [
      (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
  assert sorted(p.name for p in tmp_path.iterdir()
                if not p.name.startswith('events')) == ['metrics.jsonl']
