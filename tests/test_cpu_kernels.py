"""Tests of the oneDNN CPU convolution plugin and of XLA's convolutions where
it cannot run.

The kernels are installed on Linux x86-64 CPUs only: the tests that run them
carry `needs_plugin`. The fallbacks to XLA (shapes oneDNN does not take,
meshes with Explicit axes, kernels that do not load, no plugin at all) run on
every platform; they make any attempt to load the kernels fail the test, so
they pass here only because they never need them. Config validation,
BatchNorm and the `conv` field are tested in the other modules.
"""

import ctypes
import os
import pathlib
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import normal
import nin_jax
from nin_jax import config_lib
from nin_jax import conv_select
from nin_jax import layers
from nin_jax.plugins import onednn

REPO = pathlib.Path(__file__).resolve().parents[1]
DN = ('NHWC', 'HWIO', 'NHWC')

# The test extra installs the cpu extra on Linux x86-64, so there the kernels
# must load: the skip is by platform, never by whether they load.
needs_plugin = pytest.mark.skipif(
    jax.default_backend() != 'cpu' or not sys.platform.startswith('linux')
    or platform.machine() != 'x86_64',
    reason='the oneDNN plugin is installed on Linux x86-64 CPUs')


@pytest.fixture
def no_kernels(monkeypatch):
  """The plugin as on a platform where its kernels were not built: looking
  for them fails with the plugin's own error (kept, as any load error), and
  each look is recorded in the list returned."""
  attempts = []

  def find_extension():
    attempts.append(1)
    raise onednn.OneDnnUnavailable(
        'the oneDNN kernels (_onednn_conv*.so) were not built (simulated)')

  monkeypatch.setattr(onednn, '_state', {})
  monkeypatch.setattr(onednn, '_find_extension', find_extension)
  return attempts


def xla_conv(x, w, pad):
  return jax.lax.conv_general_dilated(x, w, (1, 1), [(pad, pad)] * 2,
                                      dimension_numbers=DN)


def value_and_grads(conv, x, w, g):
  y, vjp = jax.vjp(lambda x, w: jax.nn.relu(conv(x, w)), x, w)
  return (y, *vjp(g))


SHAPES = [
    # batch, height, width, in, out, kernel, pad
    (4, 9, 9, 5, 7, 5, 2),
    (3, 8, 6, 16, 12, 3, 1),
    (2, 7, 7, 11, 13, 1, 0),
    (2, 10, 10, 3, 8, 3, 0),  # VALID: the output shrinks.
    (2, 5, 5, 4, 6, 5, 3),    # padding larger than the kernel's half.
]


@needs_plugin
@pytest.mark.parametrize('shape', SHAPES)
def test_onednn_conv_matches_xla_forward_and_gradients(shape):
  n, h, w_, ci, co, k, pad = shape
  x = normal(0, (n, h, w_, ci))
  w = normal(1, (k, k, ci, co), 0.2)
  out = h + 2 * pad - k + 1
  g = normal(2, (n, out, w_ + 2 * pad - k + 1, co))
  ours = jax.jit(lambda x, w, g: value_and_grads(
      lambda x, w: onednn.onednn_conv(x, w, pad), x, w, g))(x, w, g)
  ref = value_and_grads(lambda x, w: xla_conv(x, w, pad), x, w, g)
  for a, b, name in zip(ours, ref, ('y', 'dx', 'dw')):
    assert a.shape == b.shape, name
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.parametrize('shape', SHAPES)
def test_other_platforms_lower_the_three_calls_to_what_they_compute(shape):
  """Lowered for TPU or GPU (a step exported from a CPU host), the plugin's
  forward, input-gradient and weight-gradient primitives become these XLA
  functions; each gives what XLA's own convolution and its gradients give,
  shapes included (the handlers are checked against the same above)."""
  n, h, w_, ci, co, k, pad = shape
  x = normal(0, (n, h, w_, ci))
  w = normal(1, (k, k, ci, co), 0.2)
  g = normal(2, (n, h + 2 * pad - k + 1, w_ + 2 * pad - k + 1, co))
  y, vjp = jax.vjp(lambda x, w: xla_conv(x, w, pad), x, w)
  dx, dw = vjp(g)
  for ours, ref, name in ((onednn._xla_conv(x, w, pad), y, 'y'),
                          (onednn._xla_conv_bwd_data(g, w, pad), dx, 'dx'),
                          (onednn._xla_conv_bwd_weights(x, g, pad), dw, 'dw')):
    assert ours.shape == ref.shape, name
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5, err_msg=name)


@needs_plugin
def test_the_plugin_loads_and_runs_float32():
  assert onednn.unavailable_reason() is None
  assert onednn.supports(jnp.float32)
  assert conv_select.onednn_unavailable_reason() is None


def test_bfloat16_convolutions_run_on_every_cpu():
  """bfloat16 goes to oneDNN where this CPU has it and to XLA elsewhere;
  either way the result is XLA's within bfloat16 rounding."""
  x = normal(0, (2, 6, 6, 8)).astype(jnp.bfloat16)
  w = normal(1, (3, 3, 8, 4), 0.2).astype(jnp.bfloat16)
  ref = xla_conv(x, w, 1).astype(np.float32)
  assert onednn.use_onednn(x, w) == onednn.supports(jnp.bfloat16)
  out = jax.jit(lambda x, w: onednn.conv_general_dilated(
      x, w, (1, 1), [(1, 1), (1, 1)], dimension_numbers=DN))(x, w)
  np.testing.assert_allclose(out.astype(np.float32), ref,
                             atol=1e-2 * float(np.abs(ref).max()))


@needs_plugin
def test_onednn_conv_in_bfloat16_matches_xla():
  if not onednn.supports(jnp.bfloat16):
    pytest.skip('oneDNN has no bfloat16 convolution on this CPU (it needs '
                'AVX-512 or AVX2-VNNI-2); XLA convolves bfloat16 here')
  x = normal(0, (4, 9, 9, 16)).astype(jnp.bfloat16)
  w = normal(1, (3, 3, 16, 8), 0.2).astype(jnp.bfloat16)
  g = normal(2, (4, 9, 9, 8)).astype(jnp.bfloat16)
  ours = jax.jit(lambda x, w, g: value_and_grads(
      lambda x, w: onednn.onednn_conv(x, w, 1), x, w, g))(x, w, g)
  ref = value_and_grads(lambda x, w: xla_conv(x, w, 1), x, w, g)
  for a, b in zip(ours, ref):
    assert a.dtype == b.dtype == jnp.bfloat16
    scale = float(jnp.abs(b.astype(jnp.float32)).max())
    np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32),
                               atol=1e-2 * scale)


@needs_plugin
def test_onednn_conv_under_vmap_per_example_gradients():
  x = normal(0, (3, 6, 6, 4))
  w = normal(1, (3, 3, 4, 5))
  per_example = lambda conv: jax.vmap(jax.grad(
      lambda w, xi: jnp.sum(jnp.tanh(conv(xi[None], w)))), (None, 0))(w, x)
  np.testing.assert_allclose(
      per_example(lambda x, w: onednn.onednn_conv(x, w, 1)),
      per_example(lambda x, w: xla_conv(x, w, 1)), rtol=1e-4, atol=1e-4)


@needs_plugin
def test_conv_general_dilated_uses_onednn_only_where_it_can():
  x = jnp.ones((2, 8, 8, 4))
  w = jnp.ones((3, 3, 4, 5))

  def hlo(x=x, w=w, strides=(1, 1), padding=((1, 1),) * 2):
    fn = lambda x, w: onednn.conv_general_dilated(
        x, w, strides, padding, dimension_numbers=DN)
    return jax.jit(fn).lower(x, w).as_text()

  assert 'NinConvForward' in hlo()
  assert 'NinConvForward' in hlo(w=jnp.ones((1, 1, 4, 5)),
                                 padding=((0, 0),) * 2)
  assert 'NinConvForward' not in hlo(strides=(2, 2))
  assert 'NinConvForward' not in hlo(padding=[(0, 1)] * 2)
  assert 'NinConvForward' not in hlo(padding='SAME')
  assert 'NinConvForward' not in hlo(x.astype(jnp.float16),
                                     w.astype(jnp.float16))


def _recording_fallback(calls):
  """XLA's convolution, recording the strides and padding of each call."""

  def fallback(*args, **kwargs):
    calls.append((tuple(args[2]), args[3]))
    return jax.lax.conv_general_dilated(*args, **kwargs)

  return fallback


def test_fallback_runs_what_onednn_cannot_without_loading_it(no_kernels):
  """Strided, asymmetrically or 'SAME'-padded, dilated and float16
  convolutions go to the fallback before the kernels are looked for."""
  calls = []
  fallback = _recording_fallback(calls)
  x, w = jnp.ones((1, 6, 6, 2)), jnp.ones((3, 3, 2, 3))
  for strides, padding, dilation, dtype in (
      ((2, 2), [(1, 1)] * 2, None, jnp.float32),
      ((1, 1), [(0, 1)] * 2, None, jnp.float32),
      ((1, 1), 'SAME', None, jnp.float32),
      ((1, 1), [(1, 1)] * 2, (2, 2), jnp.float32),
      ((1, 1), [(1, 1)] * 2, None, jnp.float16)):
    out = onednn.conv_general_dilated(
        x.astype(dtype), w.astype(dtype), strides, padding,
        rhs_dilation=dilation, dimension_numbers=DN, fallback=fallback)
    np.testing.assert_array_equal(out, jax.lax.conv_general_dilated(
        x.astype(dtype), w.astype(dtype), strides, padding,
        rhs_dilation=dilation, dimension_numbers=DN))
  assert len(calls) == 5
  assert not no_kernels  # Never looked for the kernels.


def test_eligible_convolutions_fall_back_where_the_kernels_do_not_load(
    no_kernels, caplog):
  calls = []
  x, w = jnp.ones((1, 6, 6, 2)), jnp.ones((3, 3, 2, 3))
  for _ in range(2):
    out = onednn.conv_general_dilated(x, w, (1, 1), [(1, 1)] * 2,
                                      dimension_numbers=DN,
                                      fallback=_recording_fallback(calls))
    np.testing.assert_array_equal(out, xla_conv(x, w, 1))
  assert calls == [((1, 1), [(1, 1)] * 2)] * 2
  assert no_kernels  # It tried, and fell back.
  warnings = [r.getMessage() for r in caplog.records
              if 'oneDNN convolutions unavailable' in r.getMessage()]
  assert warnings == ["oneDNN convolutions unavailable, using XLA's: the "
                      'oneDNN kernels (_onednn_conv*.so) were not built '
                      '(simulated)']  # Once, not at every convolution.


@needs_plugin
def test_the_kernels_run_what_they_can():
  calls = []
  x, w = jnp.ones((1, 6, 6, 2)), jnp.ones((3, 3, 2, 3))
  for strides in ((2, 2), (1, 1)):
    onednn.conv_general_dilated(x, w, strides, [(1, 1)] * 2,
                                dimension_numbers=DN,
                                fallback=_recording_fallback(calls))
  assert calls == [((2, 2), [(1, 1)] * 2)]


def test_conv_select_without_the_kernels_picks_xla(no_kernels):
  """'xla' never looks for the plugin; 'auto' falls back to XLA; 'onednn'
  refuses, before a run (check_config) and when building the model, with
  the plugin's reason."""
  assert conv_select.conv_module('xla') is layers.Conv
  conv_select.check_config('xla', 'cpu')
  assert not no_kernels
  assert conv_select.conv_module('auto') is layers.Conv
  conv_select.check_config('auto', 'cpu')
  with pytest.raises(onednn.OneDnnUnavailable,
                     match=r'^the oneDNN kernels \(_onednn_conv\*\.so\) were '
                     r'not built \(simulated\)$'):
    conv_select.conv_module('onednn')
  with pytest.raises(config_lib.ConfigError,
                     match=r"config\.model\.conv_impl='onednn': the oneDNN "
                     r'kernels are unavailable: the oneDNN kernels '
                     r"\(_onednn_conv\*\.so\) were not built \(simulated\); "
                     r"use config\.model\.conv_impl='auto'"):
    conv_select.check_config('onednn', 'cpu')


def test_conv_select_without_the_plugin_package_picks_xla(monkeypatch):
  """An install without nin_jax.plugins.onednn (any import of it fails)."""
  import nin_jax.plugins  # pylint: disable=g-import-not-at-top
  monkeypatch.delattr(nin_jax.plugins, 'onednn')
  monkeypatch.setitem(sys.modules, 'nin_jax.plugins.onednn', None)
  reason = 'the nin_jax.plugins.onednn package is not installed'
  assert conv_select.onednn_unavailable_reason() == reason
  assert conv_select.conv_module('xla') is layers.Conv
  assert conv_select.conv_module('auto') is layers.Conv
  with pytest.raises(RuntimeError, match=f'^{reason}$'):
    conv_select.conv_module('onednn')


def test_unloadable_kernels_fall_back_or_raise(monkeypatch, tmp_path):
  monkeypatch.setattr(onednn, '_state', {})
  monkeypatch.setenv('NIN_JAX_ONEDNN_ROOT', str(tmp_path / 'nowhere'))
  x, w = jnp.ones((1, 6, 6, 2)), jnp.ones((3, 3, 2, 3))
  out = onednn.conv_general_dilated(x, w, (1, 1), [(1, 1)] * 2,
                                    dimension_numbers=DN)
  np.testing.assert_allclose(out, xla_conv(x, w, 1))
  assert not onednn.available()
  assert conv_select.conv_module('auto') is layers.Conv
  with pytest.raises(onednn.OneDnnUnavailable, match=r"nin-jax\[cpu\]"):
    conv_select.conv_module('onednn')


@needs_plugin
def test_a_library_of_another_onednn_version_is_refused(monkeypatch):
  monkeypatch.setattr(onednn, '_state', {})
  real_cdll = ctypes.CDLL

  class OtherVersion:
    def __init__(self, library):
      self._library = library

    def __getattr__(self, name):
      if name == 'NinConvRuntimeVersion':
        return lambda: 30400  # oneDNN 3.4.0
      return getattr(self._library, name)

  def cdll(path, *args, **kwargs):
    library = real_cdll(path, *args, **kwargs)
    return OtherVersion(library) if '_onednn_conv' in str(path) else library

  monkeypatch.setattr(onednn.ctypes, 'CDLL', cdll)
  assert 'built against oneDNN 3.2' in onednn.unavailable_reason()
  assert '3.4.0 is installed' in onednn.unavailable_reason()


@pytest.mark.slow
@needs_plugin
def test_cifar10_model_with_onednn_matches_xla_and_plain_reference():
  x = normal(0, (4, 32, 32, 3))
  xla = nin_jax.create_model('cifar10', conv=conv_select.conv_module('xla'))
  ours = nin_jax.create_model('cifar10',
                              conv=conv_select.conv_module('onednn'))
  params = xla.init(jax.random.key(1), x)['params']
  assert 'NinConvForward' in jax.jit(ours.apply).lower(
      {'params': params}, x).as_text()
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
from nin_jax.plugins import onednn
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
    return onednn.onednn_conv(x, w, 1)
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


@pytest.mark.slow
@needs_plugin
def test_onednn_conv_per_device_under_a_mesh_sums_weight_gradients():
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=4')
  out = subprocess.run([sys.executable, '-c', MESH_SCRIPT], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().endswith('OK')


# Transforms beyond reverse mode: forward mode and higher derivatives run on
# the handlers; what the plugin cannot do (see its docstring) falls back to
# XLA's convolution or raises an error that says what to do.

def _model_and_batch(conv=None):
  """The quick-start model with the plugin's convolutions (`conv`: that
  module instead of conv_select's), its params and a batch."""
  model = nin_jax.create_model(
      'quickstart', conv=conv or conv_select.conv_module('onednn'))
  x = normal(0, (2, 8, 8, 1))
  params = model.clone(conv=layers.Conv).init(jax.random.key(1), x)['params']
  return model, params, x


@needs_plugin
def test_forward_mode_and_second_derivatives_match_xla():
  shape = (2, 7, 6, 3, 5, 3, 1)  # batch, height, width, in, out, kernel, pad
  n, h, w_, ci, co, k, pad = shape
  x = normal(0, (n, h, w_, ci))
  w = normal(1, (k, k, ci, co), 0.3)
  ours = lambda x, w: jnp.tanh(onednn.onednn_conv(x, w, pad))
  ref = lambda x, w: jnp.tanh(xla_conv(x, w, pad))

  def close(a, b):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_allclose(u, v, rtol=2e-4, atol=2e-4)

  tangents = (jnp.ones_like(x), jnp.ones_like(w))
  close(jax.jit(lambda x, w: jax.jvp(ours, (x, w), tangents))(x, w),
        jax.jvp(ref, (x, w), tangents))
  grad_of_grad = lambda f: jax.grad(lambda x: jnp.sum(jax.grad(
      lambda x, w: jnp.sum(f(x, w) ** 2), (0, 1))(x, w)[1] ** 2))(x)
  close(jax.jit(lambda x: grad_of_grad(ours))(x), grad_of_grad(ref))
  text = jax.jit(lambda x: grad_of_grad(ours)).lower(x).as_text()
  assert 'NinConvBackwardData' in text and 'convolution' not in text


@pytest.mark.slow
@needs_plugin
def test_jax_export_refuses_the_custom_calls():
  model, params, x = _model_and_batch()
  f = jax.jit(lambda x: model.apply({'params': params}, x))
  with pytest.raises(ValueError, match='NinConvForward'):
    jax.export.export(f)(x)
  xla = model.clone(conv=conv_select.conv_module('xla'))
  jax.export.export(jax.jit(lambda x: xla.apply({'params': params}, x)))(x)


def test_meshes_with_explicit_axes_fall_back_to_xla(no_kernels):
  """The plugin's module, as conv_select gives it where the kernels load:
  under Explicit axes it convolves with XLA without looking for them."""
  model, params, x = _model_and_batch(
      onednn.conv_module(fallback=layers.conv_general_dilated))
  mesh = jax.make_mesh((1,), ('data',),
                       axis_types=(jax.sharding.AxisType.Explicit,))

  def apply(params, x):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return model.apply({'params': params}, x)

  text = jax.jit(apply).lower(params, x).as_text()
  assert 'NinConvForward' not in text and 'convolution' in text
  with jax.set_mesh(mesh):
    out = jax.jit(apply)(params, x)
  # XLA's convolutions both: 1e-5 allows for another fusion under the mesh.
  np.testing.assert_allclose(
      out, model.clone(conv=layers.Conv).apply({'params': params}, x),
      rtol=1e-5, atol=1e-5)
  assert not no_kernels


@needs_plugin
def test_auto_picks_the_plugin_here():
  auto = conv_select.conv_module('auto')
  assert auto is conv_select.conv_module('onednn')  # Cached: models compare.
  assert auto is not layers.Conv
