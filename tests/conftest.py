"""Shared pytest fixtures for nin-jax."""

import atexit
import os
import pathlib
import shutil
import tempfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

# One persistent XLA compilation cache for this test session, shared by the
# processes the tests start (they inherit the environment): the many short
# runs of the same quick-start model compile each step once, not once per
# run. A fresh directory per session, so no result depends on an old cache.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(
      prefix='nin_jax_test_xla_cache_')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'],
                  ignore_errors=True)


def shared_data_dir() -> pathlib.Path:
  """Real datasets (MNIST, CIFAR-10 .npz); override with NIN_JAX_DATA_DIR."""
  return pathlib.Path(os.environ.get('NIN_JAX_DATA_DIR',
                                     REPO.parent / 'shared' / 'data'))


@pytest.fixture
def repo_root() -> pathlib.Path:
  return REPO


@pytest.fixture
def quickstart_config():
  """The quick-start config, for tests to shorten."""
  from nin_jax import config_lib  # pylint: disable=g-import-not-at-top
  return config_lib.load_config_file(str(REPO / 'configs' / 'quickstart.py'))


@pytest.fixture(scope='session')
def reference(tmp_path_factory):
  """The final state of test_reliability's uninterrupted quick-start run, made
  once per session for every test that compares a resumed run with it."""
  import test_reliability  # pylint: disable=g-import-not-at-top
  return test_reliability.reference_run(tmp_path_factory)
