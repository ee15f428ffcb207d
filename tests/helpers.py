"""Helpers shared by the test files (fixtures live in conftest.py)."""

import fcntl
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from nin_jax import checkpoints
from nin_jax import config_lib
from nin_jax import train

REPO = pathlib.Path(__file__).resolve().parents[1]


def grouped(fields: dict) -> dict:
  """Config fields named by their last part (e.g. `batch_size=8`) as an update
  of their subtrees ({'train': {'batch_size': 8}}): short test configs."""
  defaults = config_lib.default_config()
  groups = {}
  for name, value in fields.items():
    group = next(g for g in config_lib.SUBTREES if name in defaults[g])
    groups.setdefault(group, {})[name] = value
  return groups


def random_images(rng: np.random.Generator, n: int) -> list[np.ndarray]:
  """n uint8 images [h, w, 3] of varied sizes, the last one grayscale."""
  images = []
  for h, w in rng.integers(24, 90, (n, 2)):
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) % 256], -1)
    noise = rng.integers(0, 40, (h, w, 3))
    images.append(np.clip(smooth + noise, 0, 255).astype(np.uint8))
  images[-1] = images[-1][..., :1]
  return images


def write_tiny_imagenet(data_dir: pathlib.Path) -> None:
  """A tiny prepared imagenet2012 in the TFDS data_dir `data_dir`: 40 train
  and 12 validation JPEGs of varied sizes, random labels (seed 0)."""
  from nin_jax import tfds_source  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  splits = {'train': (random_images(rng, 40), rng.integers(0, 1000, 40)),
            'validation': (random_images(rng, 12), rng.integers(0, 1000, 12))}
  tfds_source.write_prepared('imagenet2012', str(data_dir), splits)


def shared_data_dir() -> pathlib.Path:
  """Real datasets (MNIST, CIFAR-10 .npz); override with NIN_JAX_DATA_DIR."""
  return pathlib.Path(os.environ.get('NIN_JAX_DATA_DIR',
                                     REPO.parent / 'shared' / 'data'))


def normal(seed: int, shape, scale: float = 1.0):
  """Standard-normal float32 test input of `shape`, from NumPy: jax.random
  would compile its generator anew for every shape (about a second each)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(
      shape, dtype=np.float32) * np.float32(scale))


def error_lines(stderr: str) -> list[str]:
  """The `nin_jax: error: ...` lines of a command's stderr."""
  return [l for l in stderr.splitlines() if l.startswith('nin_jax: error:')]


def command(module: str, *args: str) -> subprocess.CompletedProcess:
  """Runs `python -m nin_jax.MODULE ARGS` on one CPU device."""
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=1')
  return subprocess.run([sys.executable, '-m', f'nin_jax.{module}', *args],
                        capture_output=True, text=True, timeout=300,
                        cwd=REPO, env=env)


# ------------------------------- quick-start runs with faults injected --
# The uninterrupted run is the reference: every interrupted run must end
# with bit-identical parameters and optimizer state (test_reliability.py,
# test_cloud_storage.py).

STEPS = 24
ARGS = ['--config=configs/quickstart.py', f'--config.train.num_train_steps={STEPS}',
        '--config.train.checkpoint_every_steps=6', '--config.train.eval_every_steps=8',
        '--config.train.log_every_steps=1', '--config.train.keep_checkpoints=10']

# Runs nin_jax.main with a fault injected at a chosen point, in-process:
#   step:N   SIGKILL while logging train step N (between steps)
#   term:N   SIGTERM (a preemption notice) while logging train step N
#   save:N   SIGKILL right after the save of step N started (write in flight)
#   save:N:S SIGKILL S seconds after the save of step N started (training and
#            the asynchronous write go on meanwhile)
#   eval:K   SIGKILL inside the K-th evaluation, after its first batch ran
FAULT_RUNNER = r'''
import os, signal, sys, threading
kind, _, when = os.environ.get('NIN_JAX_TEST_FAULT', ':').partition(':')
when, _, delay = when.partition(':')
when = int(when or 0)
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
from nin_jax import batching, checkpoints, metric_writers
if kind in ('step', 'term'):
  write = metric_writers.MetricWriter.write
  signum = signal.SIGKILL if kind == 'step' else signal.SIGTERM
  def write_then_signal(self, step, split, metrics):
    write(self, step, split, metrics)
    if split == 'train' and step == when:
      os.kill(os.getpid(), signum)
  metric_writers.MetricWriter.write = write_then_signal
if kind == 'save':
  save = checkpoints.save
  def save_then_die(manager, step, state, force=False):
    result = save(manager, step, state, force)
    if step == when and delay:
      threading.Timer(float(delay), die).start()
    elif step == when:
      die()
    return result
  checkpoints.save = save_then_die
if kind == 'eval':
  batches, calls = batching.eval_batches, []
  def batches_then_die(*args):
    calls.append(1)
    for batch in batches(*args):
      yield batch
      if len(calls) == when:
        die()
  batching.eval_batches = batches_then_die
from absl import app
from nin_jax import main
app.run(main.main)
'''


def launch(workdir, fault=None, extra=()):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  if fault:
    env['NIN_JAX_TEST_FAULT'] = fault
  return subprocess.Popen(
      [sys.executable, '-c', FAULT_RUNNER, *ARGS, f'--workdir={workdir}',
       *extra], cwd=REPO, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=240):
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    raise
  return proc.returncode, err


def final_state(workdir, step=STEPS):
  return checkpoints.read_numpy(
      str(pathlib.Path(workdir) / 'checkpoints' / str(step) / 'default'))


def assert_identical(a, b):
  la, lb = jax.tree_util.tree_leaves_with_path(a), \
      jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (path, x), (_, y) in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                  err_msg=jax.tree_util.keystr(path))


def shared_run(name: str, build: Callable[[pathlib.Path], None]
               ) -> pathlib.Path:
  """The directory of the finished run `name`, made by `build(directory)`
  once for all xdist workers and all sessions sharing NIN_JAX_TEST_SHARED
  (conftest.py): the first to need it builds it while the others wait on a
  lock; a build that failed leaves nothing the next would trust. Tests only
  read it or copy it."""
  root = pathlib.Path(os.environ['NIN_JAX_TEST_SHARED']) / 'runs'
  root.mkdir(parents=True, exist_ok=True)
  directory, finished = root / name, root / f'{name}.finished'
  with open(root / f'{name}.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not finished.exists():
      shutil.rmtree(directory, ignore_errors=True)
      directory.mkdir()
      build(directory)
      finished.touch()
  return directory


def train_reference(workdir: pathlib.Path) -> None:
  """Trains the uninterrupted run (helpers.launch, no fault) into `workdir`."""
  code, err = finish(launch(workdir))
  assert code == 0, err[-3000:]


def resumed_from(err) -> Optional[int]:
  """The step a run's log says it resumed from; None for a fresh start."""
  found = re.findall(r'Resumed from the checkpoint at step (\d+)', err)
  assert len(found) <= 1, found
  return int(found[0]) if found else None


def restore_in_this_process(workdir: str, saved: dict, num_train_examples: int,
                            image_shape=(8, 8, 1)) -> int:
  """Restores WORKDIR's newest checkpoint through nin_jax (one device, its
  config.json's model) and asserts every array of the state equals `saved`
  (the checkpoint as plain orbax reads it), element by element; returns the
  restored step."""
  c = ml_collections.ConfigDict(json.loads(
      (epath.Path(workdir) / 'config.json').read_text()))
  trainer = train.create_trainer(c, image_shape, num_train_examples,
                                 mesh=train.create_mesh(jax.devices()[:1]))
  manager = checkpoints.create_manager(str(workdir), 5, async_save=False)
  try:
    step, restored = checkpoints.restore_latest(manager, trainer.state)
  finally:
    manager.close()
  for name in ('step', 'params', 'batch_stats', 'opt_state', 'rng'):
    ours, theirs = (jax.tree.leaves(t) for t in (
        jax.device_get(getattr(restored, name)), saved[name]))
    assert len(ours) == len(theirs) > 0, name
    for x, y in zip(ours, theirs):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                    err_msg=name)
  return step
