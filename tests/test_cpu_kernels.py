"""Tests of the oneDNN CPU convolutions (Linux x86-64 CPUs only).

Everything that every platform runs (config validation, BatchNorm) is tested
in the other modules, never behind this module's platform skip.
"""

import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nin_jax
from nin_jax import cpu_kernels

from conftest import REPO

DN = ('NHWC', 'HWIO', 'NHWC')

# nin-jax installs oneDNN on Linux x86-64, so there the kernels must build.
pytestmark = pytest.mark.skipif(
    jax.default_backend() != 'cpu' or not sys.platform.startswith('linux')
    or platform.machine() != 'x86_64',
    reason='the oneDNN kernels are installed on Linux x86-64 CPUs')


def xla_conv(x, w, pad):
  return jax.lax.conv_general_dilated(x, w, (1, 1), [(pad, pad)] * 2,
                                      dimension_numbers=DN)


def value_and_grads(conv, x, w, g):
  y, vjp = jax.vjp(lambda x, w: jax.nn.relu(conv(x, w)), x, w)
  return (y, *vjp(g))


@pytest.mark.parametrize('shape', [
    # batch, height, width, in, out, kernel, pad
    (4, 9, 9, 5, 7, 5, 2),
    (3, 8, 6, 16, 12, 3, 1),
    (2, 7, 7, 11, 13, 1, 0),
    (2, 10, 10, 3, 8, 3, 0),  # VALID: the output shrinks.
    (2, 5, 5, 4, 6, 5, 3),    # padding larger than the kernel's half.
])
def test_onednn_conv_matches_xla_forward_and_gradients(shape):
  n, h, w_, ci, co, k, pad = shape
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (n, h, w_, ci))
  w = jax.random.normal(keys[1], (k, k, ci, co)) * 0.2
  out = h + 2 * pad - k + 1
  g = jax.random.normal(keys[2], (n, out, w_ + 2 * pad - k + 1, co))
  ours = jax.jit(lambda x, w, g: value_and_grads(
      lambda x, w: cpu_kernels.onednn_conv(x, w, pad), x, w, g))(x, w, g)
  ref = value_and_grads(lambda x, w: xla_conv(x, w, pad), x, w, g)
  for a, b, name in zip(ours, ref, ('y', 'dx', 'dw')):
    assert a.shape == b.shape, name
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=name)


def test_bfloat16_convolutions_run_on_every_cpu():
  """'auto' and 'onednn' take bfloat16 to oneDNN where this CPU has it and to
  XLA elsewhere; either way the result is XLA's within bfloat16 rounding."""
  keys = jax.random.split(jax.random.key(0), 2)
  x = jax.random.normal(keys[0], (2, 6, 6, 8)).astype(jnp.bfloat16)
  w = (jax.random.normal(keys[1], (3, 3, 8, 4)) * 0.2).astype(jnp.bfloat16)
  ref = xla_conv(x, w, 1).astype(np.float32)
  for impl in ('auto', 'onednn'):
    assert cpu_kernels.use_onednn(x, w, impl) == cpu_kernels.supports(
        jnp.bfloat16)
    out = jax.jit(lambda x, w: cpu_kernels.conv_general_dilated(
        x, w, (1, 1), [(1, 1), (1, 1)], dimension_numbers=DN,
        impl=impl))(x, w)
    np.testing.assert_allclose(out.astype(np.float32), ref,
                               atol=1e-2 * float(np.abs(ref).max()))


def test_onednn_conv_in_bfloat16_matches_xla():
  if not cpu_kernels.supports(jnp.bfloat16):
    pytest.skip('oneDNN has no bfloat16 convolution on this CPU (it needs '
                'AVX-512 or AVX2-VNNI-2); XLA convolves bfloat16 here')
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (4, 9, 9, 16)).astype(jnp.bfloat16)
  w = (jax.random.normal(keys[1], (3, 3, 16, 8)) * 0.2).astype(jnp.bfloat16)
  g = jax.random.normal(keys[2], (4, 9, 9, 8)).astype(jnp.bfloat16)
  ours = jax.jit(lambda x, w, g: value_and_grads(
      lambda x, w: cpu_kernels.onednn_conv(x, w, 1), x, w, g))(x, w, g)
  ref = value_and_grads(lambda x, w: xla_conv(x, w, 1), x, w, g)
  for a, b in zip(ours, ref):
    assert a.dtype == b.dtype == jnp.bfloat16
    scale = float(jnp.abs(b.astype(jnp.float32)).max())
    np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32),
                               atol=1e-2 * scale)


def test_onednn_conv_under_vmap_per_example_gradients():
  x = jax.random.normal(jax.random.key(0), (3, 6, 6, 4))
  w = jax.random.normal(jax.random.key(1), (3, 3, 4, 5))
  per_example = lambda conv: jax.vmap(jax.grad(
      lambda w, xi: jnp.sum(jnp.tanh(conv(xi[None], w)))), (None, 0))(w, x)
  np.testing.assert_allclose(
      per_example(lambda x, w: cpu_kernels.onednn_conv(x, w, 1)),
      per_example(lambda x, w: xla_conv(x, w, 1)), rtol=1e-4, atol=1e-4)


def test_conv_general_dilated_uses_onednn_only_where_it_can():
  x = jnp.ones((2, 8, 8, 4))
  w = jnp.ones((3, 3, 4, 5))

  def hlo(**kw):
    fn = lambda x, w: cpu_kernels.conv_general_dilated(
        x, w, kw.pop('strides', (1, 1)), kw.pop('padding', [(1, 1)] * 2),
        dimension_numbers=DN, **kw)
    return jax.jit(fn).lower(x, w).as_text()

  assert 'NinConvForward' in hlo(impl='auto')
  assert 'NinConvForward' in hlo(impl='onednn')
  assert 'NinConvForward' not in hlo(impl='xla')
  assert 'NinConvForward' not in hlo(impl='auto', strides=(2, 2))
  assert 'NinConvForward' not in hlo(impl='auto', padding=[(0, 1)] * 2)
  assert 'NinConvForward' not in hlo(impl='auto', padding='SAME')
  f16 = jax.jit(lambda x, w: cpu_kernels.conv_general_dilated(
      x, w, (1, 1), [(1, 1)] * 2, dimension_numbers=DN)).lower(
          x.astype(jnp.float16), w.astype(jnp.float16)).as_text()
  assert 'NinConvForward' not in f16
  with pytest.raises(ValueError, match='conv impl must be one of'):
    cpu_kernels.conv_general_dilated(x, w, (1, 1), [(1, 1)] * 2,
                                     dimension_numbers=DN, impl='mkl')


def test_unbuildable_kernels_fall_back_or_raise(monkeypatch, tmp_path):
  monkeypatch.setattr(cpu_kernels, '_state', {})
  monkeypatch.setenv('NIN_JAX_CACHE', str(tmp_path / 'cache'))
  monkeypatch.setattr(cpu_kernels, '_candidate_prefixes',
                      lambda: [tmp_path / 'nowhere'])
  x, w = jnp.ones((1, 6, 6, 2)), jnp.ones((3, 3, 2, 3))
  conv = lambda impl: cpu_kernels.conv_general_dilated(
      x, w, (1, 1), [(1, 1)] * 2, dimension_numbers=DN, impl=impl)
  np.testing.assert_allclose(conv('auto'), xla_conv(x, w, 1))
  assert not cpu_kernels.available()
  with pytest.raises(cpu_kernels.OneDnnUnavailable,
                     match='pip install onednn-cpu-gomp'):
    conv('onednn')


def test_cifar10_model_with_onednn_matches_xla_and_plain_reference():
  x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  xla = nin_jax.create_model('cifar10', conv_impl='xla')
  ours = nin_jax.create_model('cifar10', conv_impl='onednn')
  params = xla.init(jax.random.key(1), x)['params']
  assert jax.tree.structure(params) == jax.tree.structure(
      ours.init(jax.random.key(1), x)['params'])

  def loss(model, params):
    return jnp.sum(model.apply({'params': params}, x) ** 2)

  ref_loss, ref_grads = jax.value_and_grad(lambda p: loss(xla, p))(params)
  our_loss, our_grads = jax.jit(jax.value_and_grad(
      lambda p: loss(ours, p)))(params)
  np.testing.assert_allclose(our_loss, ref_loss, rtol=1e-4)
  for a, b in zip(jax.tree.leaves(our_grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(a, b, rtol=2e-3,
                               atol=2e-3 * float(jnp.abs(b).max()))


MESH_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from nin_jax import cpu_kernels
assert jax.device_count() == 4
mesh = Mesh(np.array(jax.devices()), ('data',))
keys = jax.random.split(jax.random.key(0), 3)
x = jax.random.normal(keys[0], (8, 6, 6, 5))
w = jax.random.normal(keys[1], (3, 3, 5, 7)) * 0.2
g = jax.random.normal(keys[2], (8, 6, 6, 7))
def vg(conv, x, w, g):
  y, vjp = jax.vjp(lambda x, w: jnp.tanh(conv(x, w)), x, w)
  return (y, *vjp(g))
def sharded(x, w):
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    return cpu_kernels.onednn_conv(x, w, 1)
data, rep = NamedSharding(mesh, P('data')), NamedSharding(mesh, P())
fn = jax.jit(lambda x, w, g: vg(sharded, x, w, g),
             in_shardings=(data, rep, data))
text = fn.lower(x, w, g).as_text()
assert 'NinConvForward' in text and 'all_reduce' in text, text[-3000:]
ours = fn(jax.device_put(x, data), jax.device_put(w, rep), jax.device_put(g, data))
ref = vg(lambda x, w: jax.lax.conv_general_dilated(
    x, w, (1, 1), [(1, 1)] * 2, dimension_numbers=('NHWC', 'HWIO', 'NHWC')),
    x, w, g)
assert ours[0].sharding.spec == P('data'), ours[0].sharding
for a, b in zip(ours, ref):
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
print('OK')
"""


def test_onednn_conv_per_device_under_a_mesh_sums_weight_gradients():
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=4')
  out = subprocess.run([sys.executable, '-c', MESH_SCRIPT], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().endswith('OK')
