"""oneDNN convolutions for XLA's CPU backend, as a drop-in for `lax.conv_general_dilated`.

XLA's CPU convolutions reach about 185 GFLOP/s on NiN's 5 x 5 and 3 x 3 layers
on a 2-core AVX-512 machine, where oneDNN (PyTorch's CPU backend) reaches about
250. `conv_general_dilated(impl=...)` routes stride-1, float32 or bfloat16,
NHWC/HWIO convolutions to oneDNN through an XLA FFI custom call with its own
VJP (forward, input gradient, weight gradient); everything else, and every
non-CPU backend, uses XLA's convolution. Results agree with XLA's to float
tolerance (summation order differs).

The C++ handlers (`csrc/onednn_conv.cc`) are compiled with the system C++
compiler on first use and cached under `$NIN_JAX_CACHE` (default
`~/.cache/nin_jax`), against the oneDNN 3.2 wheels `onednn-cpu-gomp` and
`onednn-devel-cpu-gomp` (installed with nin-jax on Linux x86-64). Under a mesh
(`jax.sharding.use_abstract_mesh`, which the trainer sets) the call runs per
device through `shard_map` with the batch split over every mesh axis, and the
weight gradient is summed across devices.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from typing import Any, Optional, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

IMPLS = ('auto', 'xla', 'onednn')
_SOURCE = pathlib.Path(__file__).parent / 'csrc' / 'onednn_conv.cc'
_TARGETS = {'fwd': 'NinConvForward', 'bwd_data': 'NinConvBackwardData',
            'bwd_weights': 'NinConvBackwardWeights'}
_NHWC = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
# dnnl::memory::data_type codes of _DTYPES.
_DNNL_TYPES = {jnp.dtype(jnp.float32): 3, jnp.dtype(jnp.bfloat16): 2}
_lock = threading.Lock()
_state: dict[str, Any] = {}


class OneDnnUnavailable(RuntimeError):
  """The oneDNN kernels could not be built or loaded."""


def _candidate_prefixes() -> list[pathlib.Path]:
  prefixes = [os.environ.get('NIN_JAX_ONEDNN_ROOT'), sys.prefix,
              sys.base_prefix, sysconfig.get_config_var('prefix'),
              '/usr/local', '/usr']
  return [pathlib.Path(p) for p in dict.fromkeys(p for p in prefixes if p)]


def _find_onednn() -> tuple[pathlib.Path, pathlib.Path]:
  """The (include, lib) directories of an installed oneDNN 3."""
  for prefix in _candidate_prefixes():
    include, lib = prefix / 'include', prefix / 'lib'
    if (include / 'oneapi' / 'dnnl' / 'dnnl.hpp').exists() and any(
        lib.glob('libdnnl.so*')):
      return include, lib
  raise OneDnnUnavailable(
      'oneDNN headers/library not found under '
      f'{[str(p) for p in _candidate_prefixes()]}; install them with '
      "`pip install onednn-cpu-gomp==2023.2.0 onednn-devel-cpu-gomp==2023.2.0` "
      'or set NIN_JAX_ONEDNN_ROOT to a oneDNN 3 install prefix.')


def _cache_dir() -> pathlib.Path:
  root = os.environ.get('NIN_JAX_CACHE') or os.path.join(
      os.path.expanduser('~'), '.cache', 'nin_jax')
  return pathlib.Path(root)


def _build() -> pathlib.Path:
  """Compiles the FFI handlers once per (source, jax, oneDNN) and returns the .so."""
  include, lib = _find_onednn()
  cxx = os.environ.get('CXX') or shutil.which('g++') or shutil.which('c++')
  if not cxx:
    raise OneDnnUnavailable('no C++ compiler (g++/c++) found; install one or '
                            'set CXX.')
  cmd_tail = ['-O2', '-std=c++17', '-shared', '-fPIC', '-fopenmp', '-w',
              f'-I{include}', f'-I{jax.ffi.include_dir()}', f'-L{lib}',
              '-ldnnl', f'-Wl,-rpath,{lib}']
  digest = hashlib.sha256(
      _SOURCE.read_bytes() + ' '.join([cxx, jax.__version__, *cmd_tail]).encode()
  ).hexdigest()[:16]
  out = _cache_dir() / f'onednn_conv_{digest}.so'
  if out.exists():
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix='.so', dir=out.parent)
  os.close(fd)
  try:
    proc = subprocess.run([cxx, str(_SOURCE), '-o', tmp, *cmd_tail],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
      raise OneDnnUnavailable(f'compiling {_SOURCE.name} failed:\n'
                              f'{proc.stderr[-2000:]}')
    os.replace(tmp, out)  # Atomic, so concurrent processes never see half a file.
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return out


def _load() -> None:
  """Builds (if needed), loads and registers the handlers; raises if it cannot."""
  with _lock:
    if 'error' in _state:
      raise _state['error']
    if 'loaded' in _state:
      return
    try:
      import ctypes  # pylint: disable=g-import-not-at-top
      library = ctypes.cdll.LoadLibrary(str(_build()))
      for target in _TARGETS.values():
        jax.ffi.register_ffi_target(
            target, jax.ffi.pycapsule(getattr(library, target)),
            platform='cpu')
    except (OSError, subprocess.SubprocessError, OneDnnUnavailable) as e:
      error = e if isinstance(e, OneDnnUnavailable) else OneDnnUnavailable(
          f'building or loading the kernels in {_cache_dir()} failed: '
          f'{type(e).__name__}: {e}; set NIN_JAX_CACHE to a writable '
          "directory, or use conv_impl='xla'.")
      _state['error'] = error
      raise error from None
    _state['library'] = library
    _state['dtypes'] = tuple(
        d for d, code in _DNNL_TYPES.items() if library.NinConvSupports(code))
    _state['loaded'] = True


def available() -> bool:
  """Whether the oneDNN kernels are built and registered (builds on first call)."""
  return unavailable_reason() is None


def supports(dtype: Any) -> bool:
  """Whether the kernels run convolutions of `dtype` on this CPU (bfloat16
  needs AVX-512 or AVX2-VNNI-2; elsewhere XLA convolves bfloat16)."""
  return available() and jnp.dtype(dtype) in _state['dtypes']


def unavailable_reason() -> Optional[str]:
  """None if the kernels are built and registered, else why not."""
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
  """`a` typed as varying over `axes` (FFI results carry no such type)."""
  extra = tuple(sorted(axes - _varying(a)))
  return jax.lax.pcast(a, extra, to='varying') if extra else a


def _ffi(target: str, shape, dtype, *args, pad: int, threads: int):
  # Under vmap (e.g. per-example gradients) the call loops over the vmapped axis.
  return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, dtype),
                          vmap_method='sequential')(
      *args, pad=np.int64(pad), threads=np.int64(threads))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _onednn_conv(x: jax.Array, kernel: jax.Array, pad: int,
                 threads: int) -> jax.Array:
  n, h, w, _ = x.shape
  kh, kw, _, out = kernel.shape
  y = _ffi(_TARGETS['fwd'], (n, h + 2 * pad - kh + 1, w + 2 * pad - kw + 1,
                             out), x.dtype, x, kernel, pad=pad,
           threads=threads)
  return _vary_like(y, _varying(x) | _varying(kernel))


def _onednn_conv_fwd(x, kernel, pad, threads):
  return _onednn_conv(x, kernel, pad, threads), (x, kernel)


def _onednn_conv_bwd(pad, threads, residuals, dy):
  x, kernel = residuals
  dx = _ffi(_TARGETS['bwd_data'], x.shape, x.dtype, dy, kernel, pad=pad,
            threads=threads)
  dw = _ffi(_TARGETS['bwd_weights'], kernel.shape, kernel.dtype, x, dy,
            pad=pad, threads=threads)
  dx = _vary_like(dx, _varying(x))
  summed = tuple(sorted(_varying(dy) - _varying(kernel)))
  if summed:  # The kernel is replicated over these axes: add the shards' parts.
    dw = jax.lax.psum(_vary_like(dw, _varying(dy)), summed)
  return dx, dw


_onednn_conv.defvjp(_onednn_conv_fwd, _onednn_conv_bwd)


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
                         preferred_element_type: Any = None,
                         *, impl: str = 'auto') -> jax.Array:
  """`lax.conv_general_dilated`, run by oneDNN on CPU where it can be.

  impl: 'xla' always uses XLA; 'auto' uses oneDNN when the backend is CPU,
  the convolution is eligible (float32, or bfloat16 on CPUs with AVX-512 or
  AVX2-VNNI-2; stride 1, NHWC/HWIO, symmetric padding, no dilation or
  groups) and the kernels build, else XLA;
  'onednn'
  is 'auto' that raises instead of falling back when the kernels cannot
  build. x is [batch, height, width, in]; kernel [kh, kw, in, out].
  """
  xla = functools.partial(
      jax.lax.conv_general_dilated, x, kernel, window_strides, padding,
      lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision,
      preferred_element_type=preferred_element_type)
  pad = _onednn_eligible(x, kernel, window_strides, padding, lhs_dilation,
                         rhs_dilation, dimension_numbers, feature_group_count,
                         batch_group_count)
  if (pad is None or preferred_element_type not in (None, x.dtype)
      or not use_onednn(x, kernel, impl)):
    return xla()
  return onednn_conv(x, kernel, pad)


def use_onednn(x: jax.Array, kernel: jax.Array, impl: str) -> bool:
  """Whether `impl` runs a convolution of these operands with oneDNN.

  'auto' falls back (with one warning) when the kernels cannot be built;
  'onednn' raises OneDnnUnavailable then.
  """
  if impl not in IMPLS:
    raise ValueError(f'conv impl must be one of {IMPLS}, got {impl!r}.')
  if impl == 'xla' or _platform() != 'cpu':
    return False
  if x.dtype not in _DTYPES or kernel.dtype != x.dtype:
    return False
  if impl == 'onednn':
    _load()
    return x.dtype in _state['dtypes']
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
  bfloat16, gives [batch, height + 2 pad - kh + 1, width + 2 pad - kw + 1, out]. Under an
  abstract mesh of Auto axes the batch is split over all of them.
  """
  _load()
  mesh = jax.sharding.get_abstract_mesh()
  threads = _threads(mesh)
  auto = all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  if mesh.empty or not auto or x.shape[0] % mesh.size:
    # Unsharded, already inside a shard_map, or a batch the mesh cannot split.
    return _onednn_conv(x, kernel, pad, threads)
  spec = jax.sharding.PartitionSpec(tuple(mesh.axis_names))
  return jax.shard_map(
      lambda xs, ks: _onednn_conv(xs, ks, pad, threads), mesh=mesh,
      in_specs=(spec, jax.sharding.PartitionSpec()), out_specs=spec)(
          x, kernel)
