"""Shared pytest configuration and fixtures for nin-jax.

The environment every test sees is pinned here, before any test module
imports JAX, so that no outcome depends on the caller's shell: the platform
(CPU), the device count of the test process (one: a caller's
`--xla_force_host_platform_device_count` is removed), no cluster variables
(a run inside a SLURM or Open MPI allocation must not join a distributed
runtime), fresh cache directories for nin-jax's ZCA statistics and TFDS, so a
result never comes from files an earlier run left behind, and one XLA
compilation cache for every process of the session. The
processes the tests start inherit all of it.

NIN_JAX_TEST_SHARED names a directory that several pytest sessions share
(.ci/run's two tiers): the XLA cache and the finished runs of the fixtures
both tiers use (`helpers.shared_run`) live there, so neither is made twice.
"""

import atexit
import importlib.abc
import os
import pathlib
import re
import shutil
import socket
import sys
import tempfile

import pytest


def _session_dir() -> str:
  """This session's directory, one for all its xdist workers: the
  controlling process makes it (and removes it at exit, after its workers)
  and the workers it starts inherit its path."""
  inherited = os.environ.get('NIN_JAX_TEST_SESSION_DIR')
  if inherited and os.environ.get('PYTEST_XDIST_WORKER'):
    return inherited
  path = tempfile.mkdtemp(prefix='nin_jax_tests_')
  os.environ['NIN_JAX_TEST_SESSION_DIR'] = path
  atexit.register(shutil.rmtree, path, ignore_errors=True)
  return path


_SESSION_DIR = _session_dir()

# Variables that change what JAX runs on, how many devices it has, its
# numerics, or whether a process joins a multi-process job.
_UNPINNED = ('JAX_NUM_CPU_DEVICES', 'JAX_ENABLE_X64', 'JAX_DISABLE_JIT',
             'JAX_DEFAULT_MATMUL_PRECISION', 'JAX_DEFAULT_DTYPE_BITS',
             'JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID',
             'SLURM_NTASKS', 'SLURM_JOB_ID', 'OMPI_COMM_WORLD_SIZE',
             'OMPI_COMM_WORLD_RANK', 'TPU_WORKER_HOSTNAMES',
             'CLOUD_STORAGE_EMULATOR_ENDPOINT', 'TFDS_DATA_DIR')


def _pin_environment(environ) -> None:
  for name in _UNPINNED:
    environ.pop(name, None)
  environ['JAX_PLATFORMS'] = 'cpu'
  xla_flags = re.sub(r'--xla_force_host_platform_device_count=\S*', '',
                     environ.get('XLA_FLAGS', '')).split()
  if xla_flags:
    environ['XLA_FLAGS'] = ' '.join(xla_flags)
  else:
    environ.pop('XLA_FLAGS', None)
  # Fresh per-session directories for nin-jax's ZCA statistics and TFDS, so
  # no result comes from files an earlier run left behind.
  for name, sub in (('XDG_CACHE_HOME', 'cache'),
                    ('TFDS_DATA_DIR', 'tensorflow_datasets')):
    environ[name] = os.path.join(_SESSION_DIR, sub)
    os.makedirs(environ[name], exist_ok=True)
  # One persistent XLA compilation cache, shared by the processes the tests
  # start: the many short runs of the quick-start model compile each program
  # once. It holds compiled programs keyed by their HLO, flags and JAX
  # version, never results. It lives in NIN_JAX_TEST_SHARED if the caller
  # set it (sessions that share it: .ci/run's tiers), else in this session's
  # directory.
  environ.setdefault('NIN_JAX_TEST_SHARED', _SESSION_DIR)
  xla_cache = os.path.join(environ['NIN_JAX_TEST_SHARED'], 'xla_cache')
  os.makedirs(xla_cache, exist_ok=True)
  environ['JAX_COMPILATION_CACHE_DIR'] = xla_cache
  environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'


_pin_environment(os.environ)

# Test files in the order xdist should start them (`--dist loadfile` hands
# out whole files in collection order): the longest first, so the two workers
# finish together instead of one waiting on a late heavy file.
_HEAVY_FIRST = (
    'test_multiprocess', 'test_author_model', 'test_reliability',
    'test_cloud_storage', 'test_paper_tables', 'test_train', 'test_inference',
    'test_race', 'test_init_from', 'test_cpu_kernels', 'test_experiments',
    'test_train_failures', 'test_figures', 'test_models',
)


def pytest_collection_modifyitems(config, items):
  """Puts heavy files first (a stable sort: the order inside a file is
  kept)."""
  del config
  rank = {name: i for i, name in enumerate(_HEAVY_FIRST)}
  items.sort(key=lambda item: rank.get(
      item.module.__name__.rpartition('.')[2], len(rank)))


@pytest.fixture
def repo_root():
  from helpers import REPO  # pylint: disable=g-import-not-at-top
  return REPO


@pytest.fixture
def quickstart_config():
  """The quick-start config, for tests to shorten."""
  from helpers import REPO  # pylint: disable=g-import-not-at-top
  from nin_jax import config_lib  # pylint: disable=g-import-not-at-top
  return config_lib.load_config_file(str(REPO / 'configs' / 'quickstart.py'))


@pytest.fixture(scope='session')
def reference_workdir() -> pathlib.Path:
  """The workdir of the uninterrupted quick-start run of helpers.launch, for
  every test that compares a resumed run with it (to read or copy)."""
  import helpers  # pylint: disable=g-import-not-at-top
  return helpers.shared_run('reference', helpers.train_reference)


@pytest.fixture(scope='session')
def reference(reference_workdir):
  """The final state of the uninterrupted run (`reference_workdir`)."""
  import helpers  # pylint: disable=g-import-not-at-top
  return helpers.final_state(reference_workdir)


@pytest.fixture
def offline(monkeypatch):
  """Records and refuses what would make a missing dataset slow to report: a
  TFDS download or preparation, and any network connection or name lookup
  (TFDS retries those for minutes on an offline machine). Yields the list of
  attempts; the test fails at teardown if it is not empty."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  attempts = []

  def refuse(what):
    def refused(*args, **kwargs):
      del args, kwargs
      attempts.append(what)
      raise OSError(f'{what} refused: the test is offline')
    return refused

  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare',
                      refuse('DatasetBuilder.download_and_prepare'))
  for name in ('connect', 'connect_ex'):
    monkeypatch.setattr(socket.socket, name, refuse(f'socket.{name}'))
  for name in ('create_connection', 'getaddrinfo'):
    monkeypatch.setattr(socket, name, refuse(f'socket.{name}'))
  yield attempts
  assert attempts == [], attempts


class _NoTorch(importlib.abc.MetaPathFinder):
  """Fails every import of torch as Python does where it is not installed."""

  def find_spec(self, name, path=None, target=None):
    del path, target
    if name == 'torch' or name.startswith('torch.'):
      raise ModuleNotFoundError(f'No module named {name!r}', name=name)
    return None


@pytest.fixture
def without_torch(monkeypatch):
  """This process as if PyTorch were not installed, whether or not it is:
  torch and the experiments modules that import it are unloaded, and a new
  import of torch fails."""
  import experiments  # pylint: disable=g-import-not-at-top
  for name in [n for n in sys.modules
               if n == 'torch' or n.startswith('torch.')
               or n in ('experiments.torch_train', 'experiments.torch_nin')]:
    monkeypatch.delitem(sys.modules, name)
  for name in ('torch_train', 'torch_nin'):
    monkeypatch.delattr(experiments, name, raising=False)
  monkeypatch.setattr(sys, 'meta_path', [_NoTorch(), *sys.meta_path])
