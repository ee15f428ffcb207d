"""Tests of the NiN modules: presets, pooling semantics, heads, reuse."""

import pathlib
import re

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import normal
import nin_jax
from nin_jax import layers
from nin_jax import models

EXPECTED_PARAMS = {
    'cifar10': 966_986,
    'cifar100': 984_356,
    'svhn': 1_986_026,
    'mnist': 349_674,
    'imagenet': 7_595_176,
    'quickstart': 90_826,
}


def count(tree) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))


def init_shapes(model, shape):
  return jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))


@pytest.mark.parametrize('preset', sorted(models.PRESETS))
def test_preset_param_count_and_output_shape(preset):
  spec = models.PRESETS[preset]
  model = nin_jax.create_model(preset)
  shape = (2, spec.image_size, spec.image_size, spec.channels)
  variables = init_shapes(model, shape)
  assert count(variables['params']) == EXPECTED_PARAMS[preset]
  out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros(shape)), variables)
  assert out.shape == (2, spec.num_classes)
  assert out.dtype == jnp.float32


def test_cifar10_layers_are_the_papers():
  params = init_shapes(nin_jax.create_model('cifar10'),
                       (1, 32, 32, 3))['params']
  kernels = [
      params[b][layer]['kernel'].shape
      for b in ('mlpconv1', 'mlpconv2', 'mlpconv3')
      for layer in ['conv'] + sorted(k for k in params[b] if k != 'conv')
  ]
  assert kernels == [
      (5, 5, 3, 192), (1, 1, 192, 160), (1, 1, 160, 96),
      (5, 5, 96, 192), (1, 1, 192, 192), (1, 1, 192, 192),
      (3, 3, 192, 192), (1, 1, 192, 192), (1, 1, 192, 10)]


def test_gap_head_has_only_conv_parameters_and_fc_head_adds_dense():
  gap = init_shapes(nin_jax.create_model('cifar10'), (1, 32, 32, 3))
  assert set(gap['params']) == {'mlpconv1', 'mlpconv2', 'mlpconv3'}
  fc = init_shapes(nin_jax.create_model('cifar10', head='fc'),
                   (1, 32, 32, 3))
  # Table 5: the last mlpconv's 8x8x10 maps feed a 10-way dense layer.
  assert count(fc['params']) - count(gap['params']) == 8 * 8 * 10 * 10 + 10


@pytest.mark.parametrize('size,expected', [(32, [16, 8]), (28, [14, 7]),
                                           (8, [4, 2]), (7, [3, 1]),
                                           (3, [1, 1])])
def test_ceil_mode_pool_sizes(size, expected):
  sizes = [size]
  for _ in range(2):
    sizes.append(layers.pooled_size(sizes[-1], 3, 2))
  assert sizes[1:] == expected


def caffe_pool(x: np.ndarray, window: int, stride: int, op: str) -> np.ndarray:
  """Caffe's pooling layer, literally: ceil mode, windows clipped to input."""
  b, h, w, c = x.shape
  out_h, out_w = layers.pooled_size(h, window, stride), layers.pooled_size(
      w, window, stride)
  out = np.zeros((b, out_h, out_w, c), x.dtype)
  for i in range(out_h):
    for j in range(out_w):
      patch = x[:, i * stride:min(i * stride + window, h),
                j * stride:min(j * stride + window, w)]
      out[:, i, j] = (patch.max(axis=(1, 2)) if op == 'max' else
                      patch.mean(axis=(1, 2)))
  return out


@pytest.mark.parametrize('size', [32, 16, 8, 7, 28, 13])
def test_pools_match_caffe(size):
  x = np.random.default_rng(size).normal(size=(2, size, size, 3)).astype(
      np.float32)
  np.testing.assert_allclose(layers.max_pool_ceil(jnp.asarray(x), 3, 2),
                             caffe_pool(x, 3, 2, 'max'), rtol=1e-6)
  np.testing.assert_allclose(layers.avg_pool_ceil(jnp.asarray(x), 3, 2),
                             caffe_pool(x, 3, 2, 'avg'), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('size', [16, 13, 7])
@pytest.mark.parametrize('relu_first', [False, True])
def test_max_pool_gradient_matches_reduce_window(size, relu_first):
  # After a ReLU many windows tie at 0; the ReLU's zero gradient there makes
  # the routing of tied gradients irrelevant, as in the network.
  x = normal(size, (2, size, size, 4))
  pad = layers._ceil_mode_padding(size, 3, 2)[1]
  first = jax.nn.relu if relu_first else (lambda x: x)
  reference = lambda x: nn.max_pool(first(x), (3, 3), (2, 2),
                                    padding=((0, pad), (0, pad)))
  fast = lambda x: layers.max_pool_ceil(first(x), 3, 2)
  np.testing.assert_allclose(fast(x), reference(x))
  g_fast = jax.grad(lambda x: jnp.sum(fast(x) ** 2))(x)
  g_ref = jax.grad(lambda x: jnp.sum(reference(x) ** 2))(x)
  np.testing.assert_allclose(g_fast, g_ref, rtol=1e-6)


@pytest.mark.parametrize('kernel,padding', [((1, 1), 0), ((3, 3), 1)])
def test_conv_equals_nn_conv(kernel, padding):
  x = normal(0, (2, 5, 5, 7))
  conv = layers.Conv(4, kernel, padding=padding)
  params = conv.init(jax.random.key(1), x)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(
      jnp.shape, nn.Conv(4, kernel).init(jax.random.key(1), x))
  reference = nn.Conv(4, kernel, padding=padding).apply(params, x)
  np.testing.assert_allclose(conv.apply(params, x), reference, rtol=1e-5,
                             atol=1e-6)
  dot = 'dot_general' in jax.jit(conv.apply).lower(params, x).as_text()
  assert dot == (kernel == (1, 1))


def test_the_conv_field_makes_every_convolution():
  """A model's convolutions all come from its `conv` module (how a plugin's
  kernels are plugged in), with the same parameters as the default."""
  made = []

  def recording_conv(features, kernel_size, **kwargs):
    made.append(tuple(kernel_size))
    return layers.Conv(features, kernel_size, **kwargs)

  x = jnp.zeros((1, 8, 8, 1))
  default = nin_jax.create_model('quickstart').init(jax.random.key(0), x)
  plugged = nin_jax.create_model('quickstart', conv=recording_conv).init(
      jax.random.key(0), x)
  assert made == [(3, 3), (1, 1), (1, 1)] * 3
  jax.tree.map(np.testing.assert_array_equal, default, plugged)


class ReferenceNiN(nn.Module):
  """The CIFAR-10 NiN written plainly with nn.Conv and nn.max_pool."""

  @nn.compact
  def __call__(self, x):
    def block(x, name, widths, k, pad):
      x = nn.relu(nn.Conv(widths[0], (k, k), padding=[(pad, pad)] * 2,
                          name=f'{name}_conv')(x))
      for i, w in enumerate(widths[1:]):
        x = nn.relu(nn.Conv(w, (1, 1), name=f'{name}_cccp{i + 1}')(x))
      return x
    pool = lambda x: nn.max_pool(x, (3, 3), (2, 2), padding=((0, 2), (0, 2)))
    x = pool(block(x, 'b1', (192, 160, 96), 5, 2))
    x = pool(block(x, 'b2', (192, 192, 192), 5, 2))
    x = block(x, 'b3', (192, 192, 10), 3, 1)
    return jnp.mean(x, axis=(1, 2))


def test_cifar10_matches_plain_reference():
  model = nin_jax.create_model('cifar10')
  x = normal(0, (2, 32, 32, 3))
  params = model.init(jax.random.key(1), x)['params']
  ref_params = {}
  for b in (1, 2, 3):
    for layer, value in params[f'mlpconv{b}'].items():
      ref_params[f'b{b}_{layer}'] = value
  ours = model.apply({'params': params}, x)
  theirs = ReferenceNiN().apply({'params': ref_params}, x)
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_dropout_only_in_train_mode():
  model = nin_jax.create_model('quickstart')
  x = normal(0, (4, 8, 8, 1))
  variables = model.init(jax.random.key(1), x)
  a = model.apply(variables, x)
  np.testing.assert_array_equal(a, model.apply(variables, x))
  b = model.apply(variables, x, train=True,
                  rngs={'dropout': jax.random.key(2)})
  c = model.apply(variables, x, train=True,
                  rngs={'dropout': jax.random.key(3)})
  assert not np.allclose(b, c)
  with pytest.raises(flax.errors.InvalidRngError, match='dropout'):
    model.apply(variables, x, train=True)


@pytest.mark.slow
def test_any_input_size():
  model = nin_jax.create_model('cifar10')
  x = jnp.zeros((1, 48, 40, 3))
  variables = model.init(jax.random.key(0), x)
  assert model.apply(variables, x).shape == (1, 10)


@pytest.mark.slow
def test_faithful_and_modern_init():
  x = jnp.zeros((1, 32, 32, 3))
  faithful = nin_jax.create_model('cifar10').init(jax.random.key(0), x)
  kernel = faithful['params']['mlpconv2']['conv']['kernel']
  assert abs(float(jnp.std(kernel)) - 0.05) < 0.002
  assert float(jnp.abs(faithful['params']['mlpconv2']['conv']['bias']).max()) == 0
  modern = nin_jax.create_model('cifar10', weight_init='modern',
                                batch_norm=True).init(jax.random.key(0), x)
  kernel = modern['params']['mlpconv2']['conv']['kernel']
  assert abs(float(jnp.std(kernel)) - np.sqrt(2 / (5 * 5 * 96))) < 0.003
  assert 'batch_stats' in modern and 'bias' not in modern['params'][
      'mlpconv2']['conv']


def test_second_pool_option_and_bad_names():
  caffe = nin_jax.create_model('cifar10', second_pool='avg')
  assert caffe.blocks[1].pool == 'avg' and caffe.blocks[0].pool == 'max'
  with pytest.raises(ValueError, match='Unknown preset'):
    nin_jax.create_model('resnet')
  with pytest.raises(ValueError, match='second_pool'):
    nin_jax.create_model('cifar10', second_pool='min')


def test_bfloat16_compute_keeps_float32_params():
  model = nin_jax.create_model('quickstart', dtype=jnp.bfloat16)
  x = jnp.ones((2, 8, 8, 1))
  variables = model.init(jax.random.key(0), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  assert model.apply(variables, x).dtype == jnp.float32


def test_mlpconv_alone_in_other_flax_code():
  class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nin_jax.MlpConv((8, 6, 4), kernel_size=3, padding=1)(x)
      return layers.global_average_pool(x)
  x = jnp.ones((3, 6, 6, 2))
  variables = Tiny().init(jax.random.key(0), x)
  assert Tiny().apply(variables, x).shape == (3, 4)


def readme_block(marker: str) -> str:
  """The README's ```python block that contains `marker`."""
  readme = (pathlib.Path(__file__).resolve().parents[1] / 'README.md'
            ).read_text()
  blocks = re.findall(r'```python\n(.*?)```', readme, re.S)
  return next(b for b in blocks if marker in b)


@pytest.mark.slow
def test_readme_nnx_code_trains_with_batchnorm():
  from flax import nnx
  images = normal(1, (4, 32, 32, 3))
  labels = jnp.arange(4)
  scope = {'jax': jax, 'jnp': jnp, 'nin_jax': nin_jax, 'images': images}
  exec(readme_block('nnx.bridge.ToNNX'), scope)  # pylint: disable=exec-used
  model, train_step = scope['model'], scope['train_step']
  assert scope['logits'].shape == (4, 10)
  linen = init_shapes(nin_jax.create_model('cifar10', weight_init='modern',
                                          batch_norm=True), (1, 32, 32, 3))
  assert count(nnx.state(model, nnx.Param)) == count(linen['params'])
  stats = jax.tree.map(jnp.copy, nnx.state(model, nnx.BatchStat))
  kernel = jnp.copy(model.mlpconv1['conv']['kernel'][...])
  # 30 steps on the same 4 images: the model learns them. (Over a step or
  # two, dropout's noise can outweigh the descent either way.)
  losses = [float(train_step(model, scope['optimizer'], images, labels))
            for _ in range(30)]
  assert np.mean(losses[-3:]) < 0.5 * losses[0], losses
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), stats,
                       nnx.state(model, nnx.BatchStat))
  assert min(jax.tree.leaves(moved)) > 0  # Every running statistic updated.
  assert not jnp.allclose(kernel, model.mlpconv1['conv']['kernel'][...])


def test_bernoulli_mask_rates_and_dropout_scaling():
  for keep in (0.5, 0.75, 0.3):
    mask = layers.bernoulli_mask(jax.random.key(0), keep, (64, 8, 8, 37))
    assert mask.shape == (64, 8, 8, 37) and mask.dtype == jnp.bool_
    assert abs(float(mask.mean()) - keep) < 0.01
  # Packed bits are independent: neighbours in a word agree half the time.
  mask = np.asarray(layers.bernoulli_mask(jax.random.key(1), 0.5, (512, 64)))
  assert abs(np.mean(mask[:, :-1] == mask[:, 1:]) - 0.5) < 0.01
  x = jnp.ones((16, 64))
  y = layers.Dropout(0.5).apply({}, x, rngs={'dropout': jax.random.key(2)})
  assert set(np.unique(np.asarray(y))) == {0.0, 2.0}
  np.testing.assert_array_equal(layers.Dropout(0.5, deterministic=True).apply(
      {}, x), x)


@pytest.mark.parametrize('dtype', [None, jnp.bfloat16])
def test_batch_norm_matches_flax(dtype):
  x = normal(0, (16, 6, 6, 12)) * 3 + 1
  g = normal(1, (16, 6, 6, 12))
  ref = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5,
                     dtype=dtype)
  ours = layers.BatchNorm(momentum=0.9, epsilon=1e-5, dtype=dtype)
  variables = ref.init(jax.random.key(2), x)
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(
      jnp.shape, ours.init(jax.random.key(2), x, train=True))
  params = {'scale': jnp.linspace(0.5, 2, 12), 'bias': jnp.linspace(-1, 1, 12)}

  def run(module, **kw):
    def loss(x, p):
      y, new = module.apply({'params': p, **variables}, x,
                            mutable=['batch_stats'], **kw)
      return jnp.sum(jax.nn.relu(y).astype(jnp.float32) * g), (y, new)
    return jax.value_and_grad(loss, (0, 1), has_aux=True)(x, params)

  (ref_loss, (ref_y, ref_stats)), ref_grads = run(ref)
  (our_loss, (our_y, our_stats)), our_grads = jax.jit(
      lambda: run(ours, train=True))()
  assert our_y.dtype == ref_y.dtype
  np.testing.assert_allclose(our_y.astype(float), ref_y.astype(float),
                             atol=1e-5)
  for a, b in zip(jax.tree.leaves((our_grads, our_stats)),
                  jax.tree.leaves((ref_grads, ref_stats))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  evaluated = [m.apply({'params': params, **ref_stats}, x, **kw)
               for m, kw in ((nn.BatchNorm(use_running_average=True,
                                           dtype=dtype), {}),
                             (ours, {'train': False}))]
  np.testing.assert_allclose(evaluated[0].astype(float),
                             evaluated[1].astype(float), atol=1e-6)


@pytest.mark.slow
def test_cifar100_faithful_init_is_the_authors_per_layer_std():
  """cuda-convnet NIN/cifar-100_def: conv1 0.001, cccp1-2 0.01, the rest
  0.05 (CIFAR-10 keeps 0.05 everywhere)."""
  x = jnp.zeros((1, 32, 32, 3))
  params = nin_jax.create_model('cifar100').init(jax.random.key(0), x)[
      'params']
  cifar10 = nin_jax.create_model('cifar10').init(jax.random.key(0), x)[
      'params']
  std = lambda p, block, layer: float(jnp.std(p[block][layer]['kernel']))
  for block, layer, expected in (
      ('mlpconv1', 'conv', 0.001), ('mlpconv1', 'cccp1', 0.01),
      ('mlpconv1', 'cccp2', 0.01), ('mlpconv2', 'conv', 0.05),
      ('mlpconv3', 'cccp2', 0.05)):
    assert abs(std(params, block, layer) - expected) < 0.05 * expected, (
        block, layer)
  assert abs(std(cifar10, 'mlpconv1', 'conv') - 0.05) < 0.0025


@pytest.mark.slow
def test_imagenet_faithful_init_is_the_zoo_prototxts_per_layer_std():
  params = nin_jax.create_model('imagenet').init(
      jax.random.key(0), jnp.zeros((1, 224, 224, 3)))['params']
  std = lambda block, layer: float(jnp.std(params[block][layer]['kernel']))
  for block, layer, expected in (
      ('mlpconv1', 'conv', 0.01), ('mlpconv1', 'cccp1', 0.05),
      ('mlpconv2', 'conv', 0.05), ('mlpconv3', 'conv', 0.01),
      ('mlpconv3', 'cccp2', 0.05), ('mlpconv4', 'conv', 0.05),
      ('mlpconv4', 'cccp2', 0.01)):  # cccp8, the class maps.
    assert abs(std(block, layer) - expected) < 0.05 * expected, (block, layer)
  with pytest.raises(ValueError, match='2 initializers for 3 layers'):
    models.MlpConv((4, 4, 4), kernel_inits=(nn.initializers.zeros,) * 2).init(
        jax.random.key(0), jnp.zeros((1, 4, 4, 1)))
