"""Training and loading on the genuine MNIST and CIFAR-10 in ../shared/data
(override with NIN_JAX_DATA_DIR)."""

import numpy as np
import pytest

from helpers import shared_data_dir
from nin_jax import config_lib
from nin_jax import readers
from nin_jax import train


def mnist_path():
  path = shared_data_dir() / 'mnist' / 'mnist.npz'
  if not path.exists():
    pytest.skip(f'{path} not found; set NIN_JAX_DATA_DIR to the folder that '
                f'holds mnist/mnist.npz')
  return path


@pytest.mark.slow
def test_mnist_preset_learns_real_mnist(tmp_path):
  """configs/mnist.py, 40 steps on 20,000 images, scored on the whole test
  set (the default tier's real-data check is test_inference.py's run, on 500
  test images). Without dropout and with the class maps at the full
  learning rate, so that a few steps suffice: the model, the loading of the
  official files and the scoring of every test image are what it checks."""
  c = config_lib.sibling_config(__file__, '../configs/mnist.py')
  c.data.dataset = f'npz:{mnist_path()}'
  c.data.max_train_examples = 20_000
  c.train.batch_size = 64
  c.train.num_train_steps = 40
  c.optim.update(schedule='cosine', last_layer_lr_mult=1.0)
  c.model.dropout_rate = 0.0
  c.train.eval_every_steps = 10_000
  c.train.checkpoint_every_steps = 10_000
  result = train.train_and_evaluate(c, str(tmp_path / 'mnist'))
  assert result['examples'] == 10_000  # The whole official test set.
  # A broken pipeline (labels shuffled, images misaligned) stays near 10%.
  assert result['accuracy'] >= 0.90, result  # 94.1% measured.


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
