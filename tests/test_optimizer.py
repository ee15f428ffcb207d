"""Tests of the Caffe-style optimizer: decay mask, lr multipliers, schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nin_jax
from nin_jax import config_lib
from nin_jax import optimizer


def cifar_params():
  model = nin_jax.create_model('cifar10')
  return model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params']


def test_labels_find_biases_and_the_class_map_layer():
  labels = optimizer.param_labels(cifar_params())
  assert labels['mlpconv1']['conv']['kernel'] == 'weight'
  assert labels['mlpconv1']['conv']['bias'] == 'bias'
  assert labels['mlpconv3']['cccp2']['kernel'] == 'last_weight'
  assert labels['mlpconv3']['cccp2']['bias'] == 'last_bias'
  assert labels['mlpconv3']['cccp1']['kernel'] == 'weight'
  fc = nin_jax.create_model('quickstart', head='fc').init(
      jax.random.key(0), jnp.zeros((1, 8, 8, 1)))['params']
  assert optimizer.param_labels(fc)['fc']['kernel'] == 'last_weight'


def test_decay_on_weights_only_and_lr_multipliers():
  c = config_lib.default_config()
  c.optim.schedule, c.optim.momentum = 'constant', 0.0
  c.optim.learning_rate, c.optim.weight_decay = 0.5, 0.01
  params = cifar_params()
  tx, _ = optimizer.create_optimizer(c.optim, params, 10, 100)
  state = tx.init(params)
  # Zero gradient: only weight decay moves the weights, nothing moves biases.
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, state, params)
  w = params['mlpconv1']['conv']['kernel']
  np.testing.assert_allclose(updates['mlpconv1']['conv']['kernel'],
                             -0.5 * 0.01 * w, rtol=1e-5)
  assert float(jnp.abs(updates['mlpconv1']['conv']['bias']).max()) == 0.0
  # Unit gradient: biases x2, the class-map layer x0.1 (biases x0.2).
  c.optim.weight_decay = 0.0
  tx, _ = optimizer.create_optimizer(c.optim, params, 10, 100)
  ones = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(ones, tx.init(params), params)
  np.testing.assert_allclose(updates['mlpconv1']['conv']['bias'], -1.0)
  np.testing.assert_allclose(updates['mlpconv1']['cccp1']['kernel'], -0.5)
  np.testing.assert_allclose(updates['mlpconv3']['cccp2']['kernel'], -0.05)
  np.testing.assert_allclose(updates['mlpconv3']['cccp2']['bias'], -0.1,
                             rtol=1e-6)


def schedule_values(**fields):
  c = config_lib.default_config()
  c.optim.update(fields)
  _, schedule = optimizer.create_optimizer(c.optim, {'w': jnp.zeros(2)}, 10, 100)
  return [float(schedule(s)) for s in (0, 9, 10, 29, 30, 99)]


def test_step_cosine_one_cycle_warmup():
  assert schedule_values(schedule='step', learning_rate=1.0,
                         lr_boundaries_epochs=(1, 3)) == pytest.approx(
                             [1, 1, .1, .1, .01, .01])
  cos = schedule_values(schedule='cosine', learning_rate=1.0)
  assert cos[0] == 1.0 and cos[-1] < 0.01 and cos == sorted(cos, reverse=True)
  one = schedule_values(schedule='one_cycle', learning_rate=1.0)
  assert one[0] < 0.1 and max(one) > 0.9 and one[-1] < 1e-3
  warm = schedule_values(schedule='constant', learning_rate=1.0,
                         warmup_epochs=1.0)
  assert warm[0] == 0.0 and warm[2] == 1.0


def test_plateau_divides_by_ten_at_most_twice():
  c = config_lib.default_config()
  c.optim.schedule, c.optim.learning_rate = 'plateau', 1.0
  c.optim.plateau_patience_epochs, c.optim.plateau_max_reductions = 2, 2
  params = {'w': jnp.ones(3)}
  tx, schedule = optimizer.create_optimizer(c.optim, params, steps_per_epoch=4,
                                            num_steps=1000)
  state = tx.init(params)
  grads = {'w': jnp.zeros(3)}
  update = jax.jit(lambda s: tx.update(grads, s, params, value=0.5)[1])
  seen = []
  for step in range(4 * 20):  # 20 epochs with a flat training error.
    state = update(state)
    seen.append(float(optimizer.current_learning_rate(schedule, state, step)))
  assert seen[0] == 1.0
  assert sorted(set(np.round(seen, 6)), reverse=True) == [1.0, 0.1, 0.01]
