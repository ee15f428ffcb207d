"""Loading the genuine CIFAR-10 in ../shared/data (override with
NIN_JAX_DATA_DIR). Learning on the genuine MNIST is test_inference.py's run
(configs/mnist.py on its first 2,000 training images)."""

import numpy as np
import pytest

from helpers import shared_data_dir
from nin_jax import readers


def test_cifar10_npz_loads_with_official_counts_and_statistics():
  path = shared_data_dir() / 'cifar10' / 'cifar10.npz'
  if not path.exists():
    pytest.skip(f'{path} not found; set NIN_JAX_DATA_DIR')
  x_train, y_train, x_test, y_test = readers.load_npz(str(path))
  assert x_train.shape == (50_000, 32, 32, 3)
  assert x_test.shape == (10_000, 32, 32, 3)
  assert np.bincount(y_train).tolist() == [5000] * 10
  assert np.bincount(y_test).tolist() == [1000] * 10
  mean = x_train[::10].mean(axis=(0, 1, 2)) / 255.0
  np.testing.assert_allclose(mean, (0.4914, 0.4822, 0.4465), atol=0.005)
