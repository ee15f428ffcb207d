"""Builds the optional oneDNN convolution handlers (nin_jax/plugins/onednn).

On Linux x86-64 the build environment holds the oneDNN headers and jaxlib's
XLA FFI headers (pyproject.toml's [build-system] requires), and the handlers
are compiled into nin_jax/plugins/onednn/_onednn_conv*.so at install time.
The oneDNN library they call is installed only with the `cpu` extra; without
it the plugin reports itself unavailable and models use XLA's convolutions.
Compiling is optional: without a C++ compiler the install goes on without the
plugin. Everything else about the package is in pyproject.toml.
"""

import importlib.metadata
import importlib.util
import os
import pathlib
import platform
import sys

import setuptools

ONEDNN_DEVEL = 'onednn-devel-cpu-gomp'


def _onednn_include() -> str | None:
  """The include directory of the oneDNN headers in the build environment."""
  root = os.environ.get('NIN_JAX_ONEDNN_ROOT')
  if root:
    return os.path.join(root, 'include')
  try:
    files = importlib.metadata.distribution(ONEDNN_DEVEL).files or []
  except importlib.metadata.PackageNotFoundError:
    return None
  for f in files:
    if f.as_posix().endswith('oneapi/dnnl/dnnl.hpp'):
      path = pathlib.Path(f.locate()).resolve()
      return str(path.parents[2])
  return None


def _library_dir(include: str) -> str:
  """libdnnl.so's directory: the lib/ beside include/ (the wheels' layout)."""
  return str(pathlib.Path(include).parent / 'lib')


def _ffi_include() -> str | None:
  """jaxlib's bundled XLA FFI headers (what `jax.ffi.include_dir()` returns)."""
  spec = importlib.util.find_spec('jaxlib')
  if spec is None or not spec.submodule_search_locations:
    return None
  return os.path.join(list(spec.submodule_search_locations)[0], 'include')


def extensions() -> list[setuptools.Extension]:
  if not (sys.platform.startswith('linux') and platform.machine() == 'x86_64'):
    return []
  include, ffi_include = _onednn_include(), _ffi_include()
  if include is None or ffi_include is None:
    print(f'nin-jax: {ONEDNN_DEVEL} or jaxlib missing from the build '
          'environment; building without the oneDNN plugin.')
    return []
  return [setuptools.Extension(
      'nin_jax.plugins.onednn._onednn_conv',
      sources=['nin_jax/plugins/onednn/onednn_conv.cc'],
      include_dirs=[include, ffi_include],
      library_dirs=[_library_dir(include)],
      libraries=['dnnl'],
      language='c++',
      extra_compile_args=['-O2', '-std=c++17', '-fopenmp', '-w'],
      extra_link_args=['-fopenmp'],
      # No compiler: install without the plugin (conv_impl 'auto' uses XLA).
      optional=True)]


setuptools.setup(ext_modules=extensions())
