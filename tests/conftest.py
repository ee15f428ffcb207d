"""Shared pytest fixtures for nin-jax."""

import atexit
import json
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


def restore_in_this_process(workdir: str, saved: dict, num_train_examples: int,
                            image_shape=(8, 8, 1)) -> int:
  """Restores WORKDIR's newest checkpoint through nin_jax (one device, its
  config.json's model) and asserts every array of the state equals `saved`
  (the checkpoint as plain orbax reads it), element by element; returns the
  restored step."""
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  from nin_jax import checkpoints, train  # pylint: disable=g-import-not-at-top
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
