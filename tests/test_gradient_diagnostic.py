"""experiments/gradient_diagnostic.py: the decay a gradient implies, checked on
quadratic losses whose gradients are known (default tier), and the gradient it
reads from the trainer's step checked against the batch-mean cross-entropy's
(slow tier)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import gradient_diagnostic as gd
from nin_jax import model_factory
from nin_jax import train


def test_decay_statistics_of_a_known_gradient():
  """L_b(w) = |w - c_b|^2 / 2 at w = (2, 0, 0), c_b = (3 +- 0.4, 1, 0):
  mean gradient (-1, -1, 0), so lambda_hat = 2 / 4 = 0.5 (a wrong sign gives
  -0.5, dividing by |w| gives 1.0), cos = 2 / (sqrt(2) * 2), per-batch
  lambda_hat 0.5 +- 0.2, hence SE = 0.2 * sqrt(4 / 3) / 2."""
  w = np.array([2.0, 0.0, 0.0])
  centres = np.array([[3.4, 1, 0], [2.6, 1, 0], [3.4, 1, 0], [2.6, 1, 0]])
  grads = np.stack([jax.grad(lambda v, c=c: 0.5 * jnp.sum((v - c) ** 2))(
      jnp.asarray(w)) for c in centres])
  stats = gd.decay_statistics(grads, w)
  assert stats['lambda_hat'] == pytest.approx(0.5)
  assert stats['se'] == pytest.approx(0.2 * np.sqrt(4 / 3) / 2)
  assert stats['cos'] == pytest.approx(1 / np.sqrt(2))
  assert stats['w_norm'] == pytest.approx(2.0)
  assert stats['grad_sq_over_w_sq'] == pytest.approx((1.4 ** 2 + 0.6 ** 2) / 2
                                                     / 4 + 1 / 4)


def test_a_stationary_point_of_loss_plus_decay_gives_its_decay():
  """At w* = argmin L + lam |w|^2 / 2 of a quadratic L, grad L = -lam w*:
  lambda_hat = lam, cos = 1, for a kernel-shaped parameter; batch noise that
  averages to zero only widens the standard error."""
  rng = np.random.default_rng(0)
  m = rng.normal(size=(6, 6))
  a, b, lam = m @ m.T + np.eye(6), rng.normal(size=6), 3e-3
  w_star = np.linalg.solve(a + lam * np.eye(6), b).reshape(1, 1, 3, 2)
  noise = rng.normal(size=(5, 6))
  noise -= noise.mean(axis=0)

  def loss(w, bb):
    v = w.reshape(-1)
    return 0.5 * v @ a @ v - bb @ v

  grads = np.stack([jax.grad(loss)(jnp.asarray(w_star), b + n)
                    for n in noise])
  stats = gd.decay_statistics(grads, w_star)
  assert stats['lambda_hat'] == pytest.approx(lam, rel=1e-4)
  assert stats['cos'] == pytest.approx(1.0, abs=1e-6)
  assert stats['se'] > 0
  exact = gd.decay_statistics(np.stack([grads.mean(axis=0)] * 2), w_star)
  assert exact['se'] == pytest.approx(0.0, abs=1e-12)


def test_decay_statistics_refuses_what_it_cannot_measure():
  w = np.ones(3)
  with pytest.raises(ValueError, match='two'):
    gd.decay_statistics(np.ones((1, 3)), w)
  with pytest.raises(ValueError, match='shape'):
    gd.decay_statistics(np.ones((2, 4)), w)
  with pytest.raises(ValueError, match='zero'):
    gd.decay_statistics(np.ones((2, 3)), np.zeros(3))


@pytest.mark.slow  # A train step's compilation: tens of seconds here.
def test_the_trainer_gradient_is_the_batch_mean_loss_gradient(
    quickstart_config):
  """batch_gradients reads train.train_step's gradient: that of the mean
  cross-entropy over the batch (a summed loss would be 8x it), parameters
  unchanged. Dropout and augmentation off: the trainer's keys do not matter."""
  c = quickstart_config
  c.model.dropout_rate = 0.0
  c.model.weight_init, c.model.batch_norm = 'faithful', False
  c.model.conv_impl = 'xla'
  c.data.augment, c.train.label_smoothing = False, 0.0
  model = model_factory.build_model(c.model)
  params = jax.jit(lambda: train.init_variables(model, (8, 8, 1), 0))()[
      'params']
  rng = np.random.default_rng(0)
  batch = {'image': rng.normal(size=(8, 8, 8, 1)).astype(np.float32),
           'label': np.arange(8, dtype=np.int32) % 10}

  def mean_loss(p):
    logits = model.apply({'params': p}, batch['image'])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, batch['label']).mean()

  expected = jax.jit(jax.grad(mean_loss))(params)
  (got,) = list(gd.batch_gradients(c, params, [batch]))
  for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-7)
  names = gd.caffe_layer_names(params)
  assert sorted(names.values()) == sorted(
      ['conv1', 'cccp1', 'cccp2', 'conv2', 'cccp3', 'cccp4', 'conv3', 'cccp5',
       'cccp6'])
  assert names[('mlpconv3', 'cccp2')] == 'cccp6'
