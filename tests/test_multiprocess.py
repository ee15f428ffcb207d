"""Multi-process training on JAX's distributed runtime, with real processes on
loopback (gloo CPU collectives).

Runs of the same topology are compared bit for bit. Runs of different
topologies sum in a different order, and training amplifies that rounding
step by step, so they are compared only where it cannot grow: a restored
state element by element, and the first two steps after it.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from experiments import launch_local
from helpers import (REPO, assert_identical, restore_in_this_process,
                     shared_run)
from nin_jax import checkpoints

STEPS = 20
ARGS = ['--config=configs/quickstart.py', f'--config.train.num_train_steps={STEPS}',
        '--config.train.checkpoint_every_steps=10', '--config.train.eval_every_steps=10',
        '--config.train.log_every_steps=1', '--config.train.keep_checkpoints=5',
        '--config.train.eval_batch_size=360']
# The losses of the first two steps of different topologies (a restored
# state's forward pass, then one update), compared relatively. What may differ
# is float32 rounding only: oneDNN picks its convolution blocking, hence the
# order in which each output sums, from the per-device batch (64 rows on
# 1 x 1, 16 on 2 x 2 and 1 x 4) and from the CPU's vector width (AVX2 or
# AVX-512); the loss and the BatchNorm statistics sum over devices, through
# gloo between processes and XLA within one, in an order set by the topology.
# Each such sum is a few ulps off (a float32 ulp is 1.2e-7 relative).
# Measured here (2-core AVX-512 EPYC): 2 x 2 and 1 x 4 equal at all 20 steps;
# 1 x 1 resumed from 2 x 2 equal at its two first steps; 2 x 2 resumed from
# 1 x 1 one ulp off (1.04e-7) at its first step, equal at the second.
# 1e-5 is about 80 ulps, room for a CPU that blocks differently, and 10 times
# below the closest two consecutive steps' losses here (1.1e-4 apart; median
# 1.3e-2): a state restored at the wrong step or data position (another
# batch) is caught.
FIRST_STEPS_RTOL = 1e-5

# nin_jax.main instrumented for the tests, one record per process at exit:
# the training rows it materialized and every file it opened for writing.
# NIN_JAX_TEST_SIGTERM=P:K sends SIGTERM to process P as it builds its K-th
# training batch (a preemption notice at a chosen step). The notice reaches
# the other processes through the coordination service, which takes a moment
# however loaded the machine is, so process P then slows its batches until
# the processes agree on the step to stop at (else a fast run could end first).
INSTRUMENTED_MAIN = r'''
import atexit, builtins, json, os, signal, sys, time
import jax
from jax.experimental import multihost_utils
rows = {'train': 0, 'batches': 0, 'written': []}
term_process, _, term_batch = os.environ.get(
    'NIN_JAX_TEST_SIGTERM', '-1:0').partition(':')
preemption = {'signalled': False, 'agreed': False}
reached = multihost_utils.reached_preemption_sync_point
def watching(step):
  agreed = reached(step)
  preemption['agreed'] = preemption['agreed'] or agreed
  return agreed
multihost_utils.reached_preemption_sync_point = watching
make = jax.make_array_from_process_local_data
def counting(sharding, data, *args, **kwargs):
  if data.ndim == 4 and data.shape[0] != 360 // jax.process_count():
    rows['train'] += data.shape[0]
    rows['batches'] += 1
    if (jax.process_index() == int(term_process) and
        rows['batches'] == int(term_batch)):
      os.kill(os.getpid(), signal.SIGTERM)
      preemption['signalled'] = True
    elif preemption['signalled'] and not preemption['agreed']:
      time.sleep(0.5)
  return make(sharding, data, *args, **kwargs)
jax.make_array_from_process_local_data = counting
real_open = builtins.open
def recording_open(file, mode='r', *args, **kwargs):
  if any(m in mode for m in 'wax+'):
    rows['written'].append(os.path.abspath(os.fspath(file)))
  return real_open(file, mode, *args, **kwargs)
builtins.open = recording_open
def dump():
  path = os.environ['NIN_JAX_TEST_ROWS']
  with real_open(f'{path}.{jax.process_index()}', 'w') as f:
    json.dump(rows, f)
atexit.register(dump)
from absl import app
from nin_jax import cli, main
app.run(main.main, flags_parser=cli.parse_flags)
'''


def run(workdir, processes, devices, tmp_path, extra=(), sigterm=None,
        timeout=240):
  """Runs the instrumented main; returns (exit status, log directory)."""
  tag = f'{pathlib.Path(workdir).name}_{processes}x{devices}'
  logs = tmp_path / f'logs_{tag}'
  env = {'NIN_JAX_TEST_ROWS': str(tmp_path / f'rows_{tag}')}
  if sigterm:
    env['NIN_JAX_TEST_SIGTERM'] = sigterm
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    code = launch_local.launch(
        [*ARGS, f'--workdir={workdir}', *extra], processes, devices,
        str(logs), timeout=timeout, entry=('-c', INSTRUMENTED_MAIN))
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  return code, logs


def log_text(logs, process=0):
  return (logs / f'process_{process}.log').read_text()


def process_record(tmp_path, workdir, processes, devices, process):
  tag = f'{pathlib.Path(workdir).name}_{processes}x{devices}'
  return json.loads((tmp_path / f'rows_{tag}.{process}').read_text())


def metrics(workdir):
  return [json.loads(l) for l in
          (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines()]


def train_losses(workdir):
  return {l['step']: l['loss'] for l in metrics(workdir)
          if l['split'] == 'train'}


def state_at(workdir, step=STEPS):
  return checkpoints.read_numpy(
      str(pathlib.Path(workdir) / 'checkpoints' / str(step) / 'default'))


def copy_checkpoint(source, step, destination):
  """A new workdir holding only `source`'s checkpoint at `step` and config."""
  (destination / 'checkpoints').mkdir(parents=True)
  shutil.copytree(source / 'checkpoints' / str(step),
                  destination / 'checkpoints' / str(step))
  shutil.copy(source / 'config.json', destination / 'config.json')


def train_two(directory):
  """The quick start as 2 processes x 2 devices in `directory`/two, its logs
  and records beside it."""
  code, logs = run(directory / 'two', 2, 2, directory)
  assert code == 0, log_text(logs)[-3000:]


@pytest.fixture(scope='module')
def runs():
  """The quick start trained as 2 processes x 2 devices, once for both test
  tiers (helpers.shared_run): (log and record directory, its workdir).
  Tests only read them."""
  directory = shared_run('multiprocess_2x2', train_two)
  return directory, directory / 'two'


def test_two_processes_train_as_one(runs):
  tmp, two = runs
  evals2 = [l for l in metrics(two) if l['split'] == 'test']
  assert [(e['step'], e['examples']) for e in evals2] == [(10, 359),
                                                          (20, 359)]
  # One voice: exactly one metrics line per logged step.
  assert [l['step'] for l in metrics(two) if l['split'] == 'train'] == list(
      range(1, STEPS + 1))
  # Each process materialized exactly its half of every global batch.
  for i in (0, 1):
    rows = process_record(tmp, two, 2, 2, i)
    assert (rows['train'], rows['batches']) == (STEPS * 32, STEPS)


@pytest.mark.slow
def test_two_processes_step_as_one_process_of_as_many_devices(runs, tmp_path):
  _, two = runs
  one = tmp_path / 'one'
  code, logs = run(one, 1, 4, tmp_path)
  assert code == 0, log_text(logs)[-3000:]
  losses2, losses1 = train_losses(two), train_losses(one)
  assert sorted(losses2) == sorted(losses1) == list(range(1, STEPS + 1))
  # Same global device count (4): the same batches, masks and dropout keys;
  # only gloo's reduction order differs, so the first steps agree closely.
  np.testing.assert_allclose([losses2[s] for s in (1, 2)],
                             [losses1[s] for s in (1, 2)],
                             rtol=FIRST_STEPS_RTOL)
  rows = process_record(tmp_path, one, 1, 4, 0)
  assert (rows['train'], rows['batches']) == (STEPS * 64, STEPS)


def test_only_process_zero_writes_logs_metrics_and_config(runs):
  tmp, two = runs
  written = [process_record(tmp, two, 2, 2, i)['written'] for i in (0, 1)]
  outside_checkpoints = [
      {pathlib.Path(p).relative_to(two).parts[0] for p in w
       if p.startswith(str(two)) and '/checkpoints/' not in p}
      for w in written]
  assert outside_checkpoints[1] == set(), written[1]
  names = outside_checkpoints[0]
  assert {'config.json', 'metrics.jsonl'} <= names, names
  events = [n for n in names if n.startswith('events.out.tfevents')]
  assert len(events) == 1, names
  assert len([p for p in two.iterdir()
              if p.name.startswith('events.out.tfevents')]) == 1
  logs = tmp / 'logs_two_2x2'
  step_lines = [[l for l in log_text(logs, i).splitlines()
                 if f'/{STEPS} loss ' in l] for i in (0, 1)]
  assert len(step_lines[0]) == STEPS and step_lines[1] == []


@pytest.mark.slow
def test_checkpoints_move_between_topologies(runs, tmp_path):
  """2 x 2 -> 1 x 1 -> 2 x 2: each restore is exact, and training goes on."""
  _, two = runs
  # In this process (1 device): nin_jax's restore of the 2 x 2 checkpoint
  # equals the arrays in the files, element by element.
  assert restore_in_this_process(two, state_at(two), 1438) == STEPS

  # A 1 x 1 process resumes from the 2 x 2 checkpoint at step 10 and writes
  # its own at step 15; a 2 x 2 run then resumes from that one.
  single = tmp_path / 'single'
  copy_checkpoint(two, 10, single)
  code, logs = run(single, 1, 1, tmp_path,
                   extra=['--config.train.checkpoint_every_steps=5'])
  assert code == 0, log_text(logs)[-3000:]
  assert 'Resumed from the checkpoint at step 10' in log_text(logs)
  back = tmp_path / 'back'
  copy_checkpoint(single, 15, back)
  code, logs = run(back, 2, 2, tmp_path)
  assert code == 0, log_text(logs)[-3000:]
  assert 'Resumed from the checkpoint at step 15' in log_text(logs)
  for resumed, before, first in ((single, two, 10), (back, single, 15)):
    losses, reference = train_losses(resumed), train_losses(before)
    assert sorted(losses) == list(range(first + 1, STEPS + 1))
    # Step first+1 is a forward pass on the restored state (parameters,
    # statistics, data position, dropout key); step first+2 follows one
    # update with the restored momentum.
    np.testing.assert_allclose([losses[first + 1], losses[first + 2]],
                               [reference[first + 1], reference[first + 2]],
                               rtol=FIRST_STEPS_RTOL)


def saved_on_sigterm(logs):
  """The step each process logged saving at SIGTERM (one each, all equal)."""
  saved = [[int(line.split('saved step ')[1].split(';')[0])
            for line in log_text(logs, i).splitlines()
            if 'SIGTERM: saved step' in line] for i in (0, 1)]
  assert len(saved[0]) == 1 and saved[0] == saved[1], saved
  return saved[0][0]


def damage(checkpoint):
  """Truncates the largest file of a checkpoint directory to a third."""
  largest = max((f for f in checkpoint.rglob('*') if f.is_file()),
                key=lambda f: f.stat().st_size)
  with open(largest, 'r+b') as f:
    f.truncate(largest.stat().st_size // 3)


@pytest.mark.slow
def test_sigterm_to_one_process_and_a_damaged_save_resume_bit_identically(
    runs, tmp_path):
  """A preemption notice reaching one host (process 1, not the coordinator:
  the notice has to travel; the handler itself is the single-process
  SIGTERM test's) stops every process at the same step (JAX's preemption
  sync point), after the regular save at step 10; each saves its part and
  exits 0.

  That save is then damaged: every process of the next run sees it, one
  moves it aside (kept, never deleted), and all resume from step 10. That
  run passes the damaged step again and saves it: the same arrays as the
  SIGTERM save, so resuming from that save would have gone on the same way.
  It ends bit-identical to the uninterrupted run, every step logged once.
  (Two 2-process launches for the three claims: each launch costs about
  half a minute here, the steps a fraction of a second each.)
  """
  _, two = runs
  workdir = tmp_path / 'term'
  code, logs = run(workdir, 2, 2, tmp_path, sigterm='1:12')
  assert code == 0, log_text(logs)[-3000:]
  previous = saved_on_sigterm(logs)
  assert 12 <= previous < STEPS
  assert int(state_at(workdir, previous)['step']) == previous

  saved = state_at(workdir, previous)
  fallback = max(int(p.name) for p in (workdir / 'checkpoints').iterdir()
                 if p.name.isdigit() and int(p.name) < previous)
  damage(workdir / 'checkpoints' / str(previous))
  code, logs = run(workdir, 2, 2, tmp_path, extra=[
      f'--config.train.checkpoint_every_steps={previous}'])
  assert code == 0, log_text(logs)[-3000:]
  for i in (0, 1):
    assert f'Checkpoint at step {previous} is damaged' in log_text(logs, i)
  assert f'Resumed from the checkpoint at step {fallback}' in log_text(logs)
  aside = sorted(p.name for p in (workdir / 'damaged_checkpoints').iterdir())
  assert aside == [str(previous)]  # Moved once, by one process; kept.
  assert_identical(state_at(workdir, previous), saved)
  assert_identical(state_at(workdir), state_at(two))
  assert [l['step'] for l in metrics(workdir) if l['split'] == 'train'] == (
      list(range(1, STEPS + 1)))
  assert train_losses(workdir) == train_losses(two)


def start_endless_run(tmp_path):
  """Launches 2 x 1-device processes that train until stopped; returns the
  launcher and process 1 once a few steps are logged. The launcher's own
  --timeout (its last resort) is far beyond any wait of the test, so it
  cannot be what stops the run."""
  launcher = subprocess.Popen(
      [sys.executable, '-m', 'experiments.launch_local',
       '--num_processes=2', '--devices_per_process=1',
       f'--log_dir={tmp_path / "logs"}', '--timeout=1800', '--',
       '--config=configs/quickstart.py', f'--workdir={tmp_path / "run"}',
       '--config.train.num_train_steps=100000', '--config.train.log_every_steps=1'],
      cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  metrics_file = tmp_path / 'run' / 'metrics.jsonl'
  deadline = time.time() + 600
  while time.time() < deadline and launcher.poll() is None and not (
      metrics_file.exists() and
      len(metrics_file.read_text().splitlines()) >= 3):
    time.sleep(0.2)
  victims = [p for p in psutil.Process(launcher.pid).children(recursive=True)
             if '--process_id=1' in ' '.join(p.cmdline())]
  assert victims, ('process 1 not found', launcher.poll())
  return launcher, victims[0]


def wait_or_kill(launcher, timeout):
  try:
    launcher.wait(timeout=timeout)
  finally:
    if launcher.poll() is None:
      launcher.kill()


@pytest.mark.slow
def test_a_dead_process_stops_the_launcher(tmp_path):
  """SIGKILL to process 1, whose peer would otherwise wait for it in a
  collective: the launcher notices, kills process 0 and exits with process
  1's status. The 300 s wait only detects a hang, it measures no speed: the
  launcher polls every 0.1 s and kills with SIGKILL, which no load delays
  that long; the status and the message show that the death stopped it, not
  the launcher's --timeout."""
  launcher, victim = start_endless_run(tmp_path)
  victim.send_signal(signal.SIGKILL)
  wait_or_kill(launcher, 300)
  stderr = launcher.stderr.read()
  assert launcher.returncode == 128 + signal.SIGKILL, stderr[-3000:]
  assert ('launch_local: process 1 exited with status -9; stopping the '
          'others.') in stderr, stderr[-3000:]
  survivors = [p for p in psutil.process_iter(['cmdline'])
               if str(tmp_path / 'run') in ' '.join(p.info['cmdline'] or [])]
  assert not survivors
