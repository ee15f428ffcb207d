"""oneDNN convolutions for XLA's CPU backend: an optional nin-jax plugin.

Installed with the `cpu` extra (`pip install 'nin-jax[cpu]'`, Linux x86-64).
XLA's CPU convolutions reach about 185 GFLOP/s on NiN's 5 x 5 and 3 x 3 layers
on a 2-core AVX-512 machine, where oneDNN (PyTorch's CPU backend) reaches about
250. `conv_general_dilated` routes stride-1, float32 or bfloat16, NHWC/HWIO
convolutions to oneDNN through three XLA FFI handlers (forward, input
gradient, weight gradient), each a JAX primitive whose derivatives are the
others, and everything else, and every non-CPU backend, to its `fallback`.
`Conv` is `nn.Conv` with it, the module a model takes as its `conv` field
(`nin_jax.conv_select` picks it from a config's `model.conv_impl`). Results agree with XLA's to float tolerance
(summation order differs).

The C++ handlers (`onednn_conv.cc`) are compiled by `setup.py` when nin-jax is
installed, against the headers of `onednn-devel-cpu-gomp`; nothing is compiled
at run time. The library itself comes from the `onednn-cpu-gomp` wheel that the
`cpu` extra installs; without it (`pip install nin-jax`) the handlers cannot
load and `available()` is False. A library whose oneDNN major.minor version
differs from the headers' is refused. Under a mesh of Auto axes
(`jax.sharding.use_abstract_mesh`, which the trainer sets) the call runs per
device through `shard_map` with the batch split over every mesh axis, and the
weight gradient is summed across devices.

Reverse and forward-mode AD, derivatives of any order and vmap run on the
handlers. What the plugin cannot do:
- Meshes with Explicit axes: the convolution falls back to `fallback` (XLA).
- `jax.export`: the custom calls have no compatibility guarantee, so JAX
  refuses to serialize them (`ValueError` naming `NinConvForward`); export a
  model built with conv_impl='xla' (`nin_jax.layers.Conv`), as
  `nin_jax.inference.export` does.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import os
import pathlib
import sys
import threading
from typing import Any, Callable, Optional, Sequence

from absl import logging
import flax.linen as nn
import jax
from jax.extend import core as jex_core
from jax.interpreters import ad
from jax.interpreters import batching
from jax.interpreters import mlir
import jax.numpy as jnp
import numpy as np

_HERE = pathlib.Path(__file__).parent
_EXTENSION = '_onednn_conv'  # setup.py's Extension nin_jax.plugins.onednn._onednn_conv
_LIBRARY = 'libdnnl.so.3'
_INSTALL = ("install the oneDNN runtime with `pip install 'nin-jax[cpu]'` "
            "(Linux x86-64), or use conv_impl='xla'")
_TARGETS = {'fwd': 'NinConvForward', 'bwd_data': 'NinConvBackwardData',
            'bwd_weights': 'NinConvBackwardWeights'}
_NHWC = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
# dnnl::memory::data_type codes of _DTYPES.
_DNNL_TYPES = {jnp.dtype(jnp.float32): 3, jnp.dtype(jnp.bfloat16): 2}
_lock = threading.Lock()
_state: dict[str, Any] = {}


class OneDnnUnavailable(RuntimeError):
  """The oneDNN kernels are not built or cannot be loaded."""


def _candidate_prefixes() -> list[pathlib.Path]:
  """Where to look for lib/libdnnl.so.3: $NIN_JAX_ONEDNN_ROOT alone if set,
  else this environment's prefixes (where the oneDNN wheel puts it)."""
  root = os.environ.get('NIN_JAX_ONEDNN_ROOT')
  prefixes = [root] if root else [sys.prefix, sys.base_prefix, '/usr/local',
                                  '/usr']
  return [pathlib.Path(p) for p in dict.fromkeys(prefixes)]


def _find_library() -> pathlib.Path:
  for prefix in _candidate_prefixes():
    path = prefix / 'lib' / _LIBRARY
    if path.exists():
      return path
  raise OneDnnUnavailable(
      f'{_LIBRARY} not found under '
      f'{[str(p / "lib") for p in _candidate_prefixes()]}; {_INSTALL}.')


def _find_extension() -> pathlib.Path:
  for suffix in importlib.machinery.EXTENSION_SUFFIXES:
    path = _HERE / f'{_EXTENSION}{suffix}'
    if path.exists():
      return path
  raise OneDnnUnavailable(
      f'the oneDNN kernels ({_EXTENSION}*.so in {_HERE}) were not built when '
      'nin-jax was installed (they need Linux x86-64 and g++); reinstall '
      "with `pip install 'nin-jax[cpu]'`, or use conv_impl='xla'.")


def _version(code: int) -> str:
  return f'{code // 10000}.{code // 100 % 100}.{code % 100}'


def _load() -> None:
  """Loads oneDNN and the handlers and registers them; raises if it cannot."""
  with _lock:
    if 'error' in _state:
      raise _state['error']
    if 'loaded' in _state:
      return
    try:
      extension = _find_extension()
      # The extension names libdnnl.so.3 without a path: load it first.
      ctypes.CDLL(str(_find_library()), mode=ctypes.RTLD_GLOBAL)
      library = ctypes.CDLL(str(extension))
      built, running = (library.NinConvBuiltWithVersion(),
                        library.NinConvRuntimeVersion())
      if built // 100 != running // 100:
        raise OneDnnUnavailable(
            f'{extension.name} was built against oneDNN {_version(built)} '
            f'but oneDNN {_version(running)} is installed; reinstall nin-jax '
            "(`pip install 'nin-jax[cpu]'`), or use conv_impl='xla'.")
      for target in _TARGETS.values():
        jax.ffi.register_ffi_target(
            target, jax.ffi.pycapsule(getattr(library, target)),
            platform='cpu')
    except (OSError, OneDnnUnavailable) as e:
      error = e if isinstance(e, OneDnnUnavailable) else OneDnnUnavailable(
          f'loading the oneDNN kernels failed: {type(e).__name__}: {e}; '
          f'{_INSTALL}.')
      _state['error'] = error
      raise error from None
    _state['library'] = library
    _state['dtypes'] = tuple(
        d for d, code in _DNNL_TYPES.items() if library.NinConvSupports(code))
    _state['loaded'] = True


def available() -> bool:
  """Whether the oneDNN kernels are built and load (loads them on first call)."""
  return unavailable_reason() is None


def supports(dtype: Any) -> bool:
  """Whether the kernels run convolutions of `dtype` on this CPU (bfloat16
  needs AVX-512 or AVX2-VNNI-2; elsewhere XLA convolves bfloat16)."""
  return available() and jnp.dtype(dtype) in _state['dtypes']


def unavailable_reason() -> Optional[str]:
  """None if the kernels are built and load, else why not."""
  try:
    _load()
  except OneDnnUnavailable as e:
    return str(e)
  return None


def _platform() -> str:
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and getattr(mesh, 'platform', None):
    return mesh.platform
  return jax.default_backend()


def _explicit_mesh(mesh) -> bool:
  return any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)


def _threads(mesh) -> int:
  """oneDNN threads per call: this process's cores over its devices."""
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:
    cores = os.cpu_count() or 1
  devices = jax.local_device_count() if mesh.empty else max(
      1, mesh.size // jax.process_count())
  return max(1, cores // devices)


def _varying(a) -> frozenset:
  return jax.typeof(a).manual_axis_type.varying


def _vary_like(a, axes: frozenset):
  """`a` typed as varying over `axes` as well."""
  extra = tuple(sorted(axes - _varying(a)))
  return jax.lax.pcast(a, extra, to='varying') if extra else a


def _aligned(*args) -> list[jax.Array]:
  """`args`, each typed as varying over the union of their mesh axes, as
  JAX's own binary ops do; the transpose of that cast sums a replicated
  kernel's gradient over the devices."""
  axes = frozenset().union(*map(_varying, args))
  return [_vary_like(a, axes) for a in args]


def _fwd_shape(x, kernel, pad):
  n, h, w, _ = x.shape
  kh, kw, _, out = kernel.shape
  return (n, h + 2 * pad - kh + 1, w + 2 * pad - kw + 1, out)


def _bwd_data_shape(dy, kernel, pad):
  n, oh, ow, _ = dy.shape
  kh, kw, c, _ = kernel.shape
  return (n, oh - 2 * pad + kh - 1, ow - 2 * pad + kw - 1, c)


def _bwd_weights_shape(x, dy, pad):
  _, h, w, c = x.shape
  _, oh, ow, out = dy.shape
  return (h + 2 * pad - oh + 1, w + 2 * pad - ow + 1, c, out)


@functools.lru_cache(maxsize=None)
def _eager(prim, pad: int, threads: int):
  return jax.jit(functools.partial(prim.bind, pad=pad, threads=threads))


def _xla_conv(x, kernel, pad: int):
  """What the forward handler computes, in XLA: a stride-1 NHWC x HWIO
  convolution with `pad` zeros on each side."""
  return jax.lax.conv_general_dilated(
      x, kernel, (1, 1), [(pad, pad)] * 2,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _xla_conv_bwd_data(dy, kernel, pad: int):
  x = jnp.zeros(_bwd_data_shape(dy, kernel, pad), dy.dtype)
  return jax.vjp(lambda x: _xla_conv(x, kernel, pad), x)[1](dy)[0]


def _xla_conv_bwd_weights(x, dy, pad: int):
  kernel = jnp.zeros(_bwd_weights_shape(x, dy, pad), x.dtype)
  return jax.vjp(lambda k: _xla_conv(x, k, pad), kernel)[1](dy)[0]


def _primitive(name: str, target: str, shape_rule,
               xla_rule) -> jex_core.Primitive:
  """A JAX primitive of two arrays that calls the FFI handler `target` on
  the CPU backend; every other platform (a program exported or lowered for
  TPU or GPU from a CPU host) gets `xla_rule`, the same function in XLA."""
  prim = jex_core.Primitive(name)
  prim.def_impl(lambda a, b, *, pad, threads: _eager(prim, pad, threads)(a, b))
  prim.def_abstract_eval(lambda a, b, *, pad, threads: a.update(
      shape=shape_rule(a, b, pad), weak_type=False))

  def lower(ctx, a, b, *, pad, threads):
    return jax.ffi.ffi_lowering(target)(ctx, a, b, pad=np.int64(pad),
                                        threads=np.int64(threads))

  def batch(args, dims, **params):
    # Under vmap (e.g. per-example gradients): one call per element.
    mapped = [d is not None for d in dims]
    moved = [jnp.moveaxis(a, d, 0) for a, d in zip(args, dims) if d is not None]

    def one(elements):
      it = iter(elements)
      return prim.bind(*[next(it) if m else a for a, m in zip(args, mapped)],
                       **params)
    return jax.lax.map(one, moved), 0

  mlir.register_lowering(prim, mlir.lower_fun(
      lambda a, b, *, pad, threads: xla_rule(a, b, pad),
      multiple_results=False))
  mlir.register_lowering(prim, lower, platform='cpu')
  batching.primitive_batchers[prim] = batch
  return prim


_conv_p = _primitive('nin_onednn_conv', _TARGETS['fwd'], _fwd_shape,
                     _xla_conv)
_conv_bwd_data_p = _primitive('nin_onednn_conv_bwd_data',
                              _TARGETS['bwd_data'], _bwd_data_shape,
                              _xla_conv_bwd_data)
_conv_bwd_weights_p = _primitive('nin_onednn_conv_bwd_weights',
                                 _TARGETS['bwd_weights'], _bwd_weights_shape,
                                 _xla_conv_bwd_weights)


def _conv(x, kernel, pad: int, threads: int):
  """y = conv(x, kernel): [n, h, w, c] x [kh, kw, c, o] -> [n, oh, ow, o]."""
  return _conv_p.bind(*_aligned(x, kernel), pad=pad, threads=threads)


def _conv_bwd_data(dy, kernel, pad: int, threads: int):
  """dx of y = conv(x, kernel) for dy: the transpose of conv in x."""
  return _conv_bwd_data_p.bind(*_aligned(dy, kernel), pad=pad,
                               threads=threads)


def _conv_bwd_weights(x, dy, pad: int, threads: int):
  """dkernel of y = conv(x, kernel) for dy: the transpose of conv in kernel."""
  return _conv_bwd_weights_p.bind(*_aligned(x, dy), pad=pad, threads=threads)


# conv(x, kernel) is bilinear and its transposes are the two gradient calls;
# theirs are again the three, as for lax.conv_general_dilated. So reverse and
# forward mode, and derivatives of any order, run on the three handlers.
ad.defbilinear(_conv_p,
               lambda ct, x, k, **p: _conv_bwd_data(ct, k, **p),
               lambda ct, x, k, **p: _conv_bwd_weights(x, ct, **p))
ad.defbilinear(_conv_bwd_data_p,
               lambda ct, dy, k, **p: _conv(ct, k, **p),
               lambda ct, dy, k, **p: _conv_bwd_weights(ct, dy, **p))
ad.defbilinear(_conv_bwd_weights_p,
               lambda ct, x, dy, **p: _conv_bwd_data(dy, ct, **p),
               lambda ct, x, dy, **p: _conv(x, ct, **p))


def _onednn_eligible(x, kernel, window_strides, padding, lhs_dilation,
                     rhs_dilation, dimension_numbers, feature_group_count,
                     batch_group_count) -> Optional[int]:
  """The symmetric padding if oneDNN can run this convolution's shape, else
  None (`use_onednn` checks the dtypes and backend)."""
  if x.ndim != 4 or tuple(window_strides) != (1, 1):
    return None
  if any(d is not None and tuple(d) != (1, 1)
         for d in (lhs_dilation, rhs_dilation)):
    return None
  if feature_group_count != 1 or batch_group_count != 1:
    return None
  dn = jax.lax.conv_dimension_numbers(x.shape, kernel.shape,
                                      dimension_numbers)
  if (tuple(dn.lhs_spec), tuple(dn.rhs_spec), tuple(dn.out_spec)) != _NHWC:
    return None
  if isinstance(padding, str) or len({tuple(p) for p in padding}) != 1:
    return None
  lo, hi = padding[0]
  if lo != hi or lo < 0:
    return None
  dn_x = [x.shape[d] for d in dn.lhs_spec[2:]]
  dn_k = [kernel.shape[d] for d in dn.rhs_spec[2:]]
  if any(size + 2 * lo < k for size, k in zip(dn_x, dn_k)):
    return None  # An empty output: XLA reports it.
  return lo


def conv_general_dilated(x: jax.Array, kernel: jax.Array,
                         window_strides: Sequence[int], padding: Any,
                         lhs_dilation: Optional[Sequence[int]] = None,
                         rhs_dilation: Optional[Sequence[int]] = None,
                         dimension_numbers: Any = None,
                         feature_group_count: int = 1,
                         batch_group_count: int = 1,
                         precision: Any = None,
                         preferred_element_type: Any = None, *,
                         fallback: Callable[..., jax.Array] = (
                             jax.lax.conv_general_dilated)) -> jax.Array:
  """`lax.conv_general_dilated`, run by oneDNN on CPU where it can be.

  oneDNN runs it when the backend is CPU, the convolution is eligible
  (float32, or bfloat16 on CPUs with AVX-512 or AVX2-VNNI-2; stride 1,
  NHWC/HWIO, symmetric padding, no dilation or groups), no mesh axis is
  Explicit, and the kernels load; otherwise `fallback` (same signature) does,
  with one warning if the kernels cannot load. x is [batch, height, width,
  in]; kernel [kh, kw, in, out].
  """
  pad = _onednn_eligible(x, kernel, window_strides, padding, lhs_dilation,
                         rhs_dilation, dimension_numbers, feature_group_count,
                         batch_group_count)
  if (pad is None or preferred_element_type not in (None, x.dtype)
      or not use_onednn(x, kernel)):
    return fallback(x, kernel, window_strides, padding,
                    lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                    dimension_numbers=dimension_numbers,
                    feature_group_count=feature_group_count,
                    batch_group_count=batch_group_count, precision=precision,
                    preferred_element_type=preferred_element_type)
  return onednn_conv(x, kernel, pad)


def use_onednn(x: jax.Array, kernel: jax.Array) -> bool:
  """Whether convolutions of these operands run in oneDNN here: the CPU
  backend, a dtype this CPU's oneDNN has, no Explicit mesh axes, and the
  kernels loaded (else one warning, and False)."""
  if _platform() != 'cpu' or _explicit_mesh(jax.sharding.get_abstract_mesh()):
    return False
  if x.dtype not in _DTYPES or kernel.dtype != x.dtype:
    return False
  if available():
    return x.dtype in _state['dtypes']
  if not _state.get('warned'):
    _state['warned'] = True
    logging.warning("oneDNN convolutions unavailable, using XLA's: %s",
                    _state['error'])
  return False


def onednn_conv(x: jax.Array, kernel: jax.Array, pad: int) -> jax.Array:
  """Stride-1 convolution by oneDNN with `pad` zeros on every side.

  x [batch, height, width, in] and kernel [kh, kw, in, out], float32 or
  bfloat16, gives [batch, height + 2 pad - kh + 1, width + 2 pad - kw + 1,
  out]. Under an abstract mesh of Auto axes the batch is split over all of
  them; a mesh with Explicit axes raises ValueError (`conv_general_dilated`
  falls back to XLA there instead).
  """
  _load()
  mesh = jax.sharding.get_abstract_mesh()
  if _explicit_mesh(mesh):
    raise ValueError('the oneDNN convolutions do not take meshes with '
                     "Explicit axes; use conv_impl='xla'.")
  threads = _threads(mesh)
  auto = all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  if mesh.empty or not auto or x.shape[0] % mesh.size:
    # Unsharded, already inside a shard_map, or a batch the mesh cannot split.
    return _conv(x, kernel, pad, threads)
  spec = jax.sharding.PartitionSpec(tuple(mesh.axis_names))
  return jax.shard_map(
      lambda xs, ks: _conv(xs, ks, pad, threads), mesh=mesh,
      in_specs=(spec, jax.sharding.PartitionSpec()), out_specs=spec)(
          x, kernel)


@functools.lru_cache(maxsize=None)
def conv_module(fallback: Callable[..., jax.Array] = (
    jax.lax.conv_general_dilated)) -> Callable[..., nn.Conv]:
  """`nn.Conv` with `conv_general_dilated` (and this `fallback`): the module a
  model takes as its `conv` field. The same object for the same fallback, so
  models that use it compare equal."""
  return functools.partial(
      nn.Conv, conv_general_dilated=functools.partial(
          conv_general_dilated, fallback=fallback))


Conv = conv_module()
