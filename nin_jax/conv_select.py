"""From a config's `model.conv_impl` to the convolution module a model takes.

The one place that may import a convolution plugin, and only lazily, so
`models`, `config_lib` and `train` stay free of it:
- 'xla': `layers.Conv` (XLA's convolutions, 1 x 1 ones as a dot).
- 'auto': the oneDNN plugin's module (nin_jax.plugins.onednn, the `cpu`
  extra) when it loads, else `layers.Conv`. The plugin itself uses XLA's
  convolution wherever it cannot run oneDNN (other backends, strided layers,
  float16, bfloat16 on CPUs without it, meshes with Explicit axes).
- 'onednn': the plugin's module, raising `OneDnnUnavailable` if it cannot
  load (`check_config` says so before a run starts).
"""

from __future__ import annotations

from typing import Any, Optional

from absl import logging

from nin_jax import layers
from nin_jax.errors import ConfigError, check

IMPLS = ('auto', 'xla', 'onednn')


def check_config(impl: str, backend: Optional[str] = None) -> None:
  """Raises ConfigError if config.model.conv_impl=`impl` is unknown, or is
  'onednn' and cannot be honoured on `backend` (jax.default_backend(); None:
  not known yet), before anything is compiled."""
  check(impl in IMPLS, 'model.conv_impl', impl, f'must be one of {IMPLS}')
  if impl != 'onednn' or backend is None:
    return
  fix = ("use config.model.conv_impl='auto' (oneDNN where it works, XLA "
         "elsewhere) or 'xla'")
  if backend != 'cpu':
    raise ConfigError(f"config.model.conv_impl='onednn': the oneDNN kernels "
                      f'run on the CPU backend only and this run is on '
                      f'{backend}; {fix}.')
  reason = onednn_unavailable_reason()
  if reason is not None:
    raise ConfigError(f"config.model.conv_impl='onednn': the oneDNN kernels "
                      f'are unavailable: {reason.splitlines()[0]}; {fix}.')


def _onednn():
  """The oneDNN plugin module, or None if it is not installed."""
  try:
    from nin_jax.plugins import onednn  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return onednn


def onednn_unavailable_reason() -> Optional[str]:
  """None if the oneDNN plugin loads here, else why not."""
  onednn = _onednn()
  if onednn is None:
    return "the nin_jax.plugins.onednn package is not installed"
  return onednn.unavailable_reason()


def conv_module(impl: str) -> Any:
  """The `conv` module (an `nn.Conv` factory) for conv_impl `impl`."""
  if impl not in IMPLS:
    raise ValueError(f'conv_impl must be one of {IMPLS}, got {impl!r}.')
  if impl == 'xla':
    return layers.Conv
  reason = onednn_unavailable_reason()
  if reason is not None:
    if impl == 'auto':
      logging.info("conv_impl='auto': oneDNN unavailable (%s); using XLA's "
                   'convolutions.', reason.rstrip('.'))
      return layers.Conv
    onednn = _onednn()
    raise (onednn.OneDnnUnavailable if onednn else RuntimeError)(reason)
  logging.info("conv_impl=%r: oneDNN convolutions on the CPU backend "
               '(nin_jax.plugins.onednn).', impl)
  return _onednn().conv_module(fallback=layers.conv_general_dilated)
