"""Multi-process training on JAX's distributed runtime, with real processes on
loopback (gloo CPU collectives): 2 processes x 2 devices against 1 x 4."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import psutil
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'experiments'))
from nin_jax import checkpoints  # pylint: disable=g-import-not-at-top
import launch_local  # pylint: disable=g-import-not-at-top,wrong-import-position

STEPS = 30
ARGS = ['--config=configs/quickstart.py', f'--config.num_train_steps={STEPS}',
        '--config.checkpoint_every_steps=15', '--config.eval_every_steps=15',
        '--config.log_every_steps=1', '--config.keep_checkpoints=5',
        '--config.eval_batch_size=360']

# nin_jax.main, counting the training rows each process materializes.
COUNTING_MAIN = r'''
import atexit, json, os, sys
import jax
from nin_jax import input_pipeline
rows = {'train': 0, 'batches': 0}
make = jax.make_array_from_process_local_data
def counting(sharding, data, *args, **kwargs):
  if data.ndim == 4 and data.shape[0] != 360 // jax.process_count():
    rows['train'] += data.shape[0]
    rows['batches'] += 1
  return make(sharding, data, *args, **kwargs)
jax.make_array_from_process_local_data = counting
def dump():
  path = os.environ['NIN_JAX_TEST_ROWS']
  with open(f'{path}.{jax.process_index()}', 'w') as f:
    json.dump(rows, f)
atexit.register(dump)
from absl import app
from nin_jax import main
app.run(main.main)
'''


def run(workdir, processes, devices, tmp_path, extra=(), timeout=240):
  os.environ['NIN_JAX_TEST_ROWS'] = str(tmp_path / f'rows_{processes}')
  try:
    code = launch_local.launch(
        [*ARGS, f'--workdir={workdir}', *extra], processes, devices,
        str(tmp_path / f'logs_{processes}x{devices}'), timeout=timeout,
        entry=('-c', COUNTING_MAIN))
  finally:
    del os.environ['NIN_JAX_TEST_ROWS']
  return code


def train_losses(workdir):
  lines = [json.loads(l) for l in
           (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines()]
  return lines, [l['loss'] for l in lines if l['split'] == 'train']


def final(workdir, step=STEPS):
  return checkpoints.read_numpy(
      str(pathlib.Path(workdir) / 'checkpoints' / str(step) / 'default'))


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('mp')
  two = tmp / 'two'
  one = tmp / 'one'
  assert run(two, 2, 2, tmp) == 0, (tmp / 'logs_2x2' / 'process_0.log'
                                     ).read_text()[-3000:]
  assert run(one, 1, 4, tmp) == 0, (tmp / 'logs_1x4' / 'process_0.log'
                                    ).read_text()[-3000:]
  return tmp, two, one


def test_two_processes_match_one(runs):
  tmp, two, one = runs
  lines2, losses2 = train_losses(two)
  _, losses1 = train_losses(one)
  assert len(losses2) == len(losses1) == STEPS
  np.testing.assert_allclose(losses2, losses1, rtol=2e-4)
  evals2 = [l for l in lines2 if l['split'] == 'test']
  evals1 = [l for l in train_losses(one)[0] if l['split'] == 'test']
  assert [e['examples'] for e in evals2] == [359, 359]
  np.testing.assert_allclose([e['accuracy'] for e in evals2],
                             [e['accuracy'] for e in evals1])
  np.testing.assert_allclose([e['loss'] for e in evals2],
                             [e['loss'] for e in evals1], rtol=1e-4)
  # One voice: exactly one line per logged step, from process 0 alone.
  steps = [l['step'] for l in lines2 if l['split'] == 'train']
  assert steps == list(range(1, STEPS + 1))
  # Each process materialized exactly its half of every global batch.
  for i in (0, 1):
    rows = json.loads((tmp / f'rows_2.{i}').read_text())
    assert rows == {'train': STEPS * 32, 'batches': STEPS}
  one_rows = json.loads((tmp / 'rows_1.0').read_text())
  assert one_rows == {'train': STEPS * 64, 'batches': STEPS}


def test_midpoint_checkpoint_restores_in_one_process(runs, tmp_path):
  _, two, _ = runs
  resumed = tmp_path / 'resumed'
  (resumed / 'checkpoints').mkdir(parents=True)
  shutil.copytree(two / 'checkpoints' / '15', resumed / 'checkpoints' / '15')
  shutil.copy(two / 'config.json', resumed / 'config.json')
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  out = subprocess.run(
      [sys.executable, '-m', 'nin_jax.main', *ARGS, f'--workdir={resumed}'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'Resumed from the checkpoint at step 15' in out.stderr
  _, two_losses = train_losses(two)
  lines, resumed_losses = train_losses(resumed)
  assert [l['step'] for l in lines if l['split'] == 'train'] == list(
      range(16, STEPS + 1))
  # Step 16 is one forward and backward pass from the restored state: it
  # matches to float rounding only if parameters, batch statistics, optimizer
  # state, data position and dropout key all came back.
  np.testing.assert_allclose(resumed_losses[0], two_losses[15], rtol=1e-5)
  # Later steps run on 1 device instead of 2 x 2, and the changed summation
  # order grows step by step (as between 1 and 8 devices, test_train.py).
  np.testing.assert_allclose(resumed_losses, two_losses[15:], rtol=2e-4)
  a, b = final(two), final(resumed)
  for x, y in zip(jax.tree.leaves(a['params']), jax.tree.leaves(b['params'])):
    np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-4)


def start_endless_run(tmp_path):
  """Launches 2 x 1-device processes that train until stopped; returns the
  launcher and process 1 once a few steps are logged."""
  launcher = subprocess.Popen(
      [sys.executable, str(REPO / 'experiments' / 'launch_local.py'),
       '--num_processes=2', '--devices_per_process=1',
       f'--log_dir={tmp_path / "logs"}', '--timeout=200', '--',
       '--config=configs/quickstart.py', f'--workdir={tmp_path / "run"}',
       '--config.num_train_steps=100000', '--config.log_every_steps=1'],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = tmp_path / 'run' / 'metrics.jsonl'
  deadline = time.time() + 150
  while time.time() < deadline and not (
      metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
    time.sleep(0.2)
  victims = [p for p in psutil.Process(launcher.pid).children(recursive=True)
             if '--process_id=1' in ' '.join(p.cmdline())]
  assert victims, 'process 1 not found'
  return launcher, victims[0]


def wait_or_kill(launcher, timeout):
  try:
    launcher.wait(timeout=timeout)
  finally:
    if launcher.poll() is None:
      launcher.kill()


def test_a_dead_process_stops_the_launcher(tmp_path):
  launcher, victim = start_endless_run(tmp_path)
  killed_at = time.time()
  victim.send_signal(signal.SIGKILL)
  wait_or_kill(launcher, 30)
  assert launcher.returncode != 0
  assert time.time() - killed_at < 30
  assert 'process 1 exited' in launcher.stderr.read()
  survivors = [p for p in psutil.process_iter(['cmdline'])
               if str(tmp_path / 'run') in ' '.join(p.info['cmdline'] or [])]
  assert not survivors


def test_sigterm_to_one_process_saves_all_at_one_step(tmp_path):
  """A preemption notice reaching one host stops every process at the same
  step (JAX's preemption sync point), each saves its part, all exit 0."""
  launcher, victim = start_endless_run(tmp_path)
  victim.send_signal(signal.SIGTERM)
  wait_or_kill(launcher, 90)
  assert launcher.returncode == 0, launcher.stderr.read()[-3000:]
  saved = []
  for i in (0, 1):
    text = (tmp_path / 'logs' / f'process_{i}.log').read_text()
    saved.append([int(line.split('saved step ')[1].split(';')[0])
                  for line in text.splitlines() if 'SIGTERM: saved step' in line])
  assert len(saved[0]) == 1 and saved[0] == saved[1], saved
  step = saved[0][0]
  assert checkpoints.read_numpy(
      str(tmp_path / 'run' / 'checkpoints' / str(step) / 'default')
  )['step'] == step
