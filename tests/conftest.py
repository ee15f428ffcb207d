"""Shared pytest fixtures for nin-jax."""

import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


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
