"""The paper's input normalizations, fitted on the training split only.

- `scale`: uint8 -> [0, 1].
- `standardize`: per-channel mean/std of the training images.
- `gcn_zca`: global contrast normalization (scale 55) then ZCA whitening
  (filter bias 0.1), as pylearn2's CIFAR-10 pipeline used by Maxout and NiN.
  The ZCA statistics are cached on disk, keyed by a hash of the training data.
- `lcn`: local contrast normalization, as used for SVHN.
- `caffe`: Caffe's convention for the model zoo's ImageNet NiN: channels
  reversed to BGR, then a mean pixel or mean image (0-255 units) subtracted.

`fit` learns a method's statistics from raw training images (`Fitted`, which
a workdir keeps for inference, see input_spec.py); `apply` normalizes raw
images with them on the host, `normalizer` on device (jax.numpy, for streamed
batches and exported models). All take raw images [batch, height, width,
channels] in the dataset's units (0..`max_value`) and return float32.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

GCN_SCALE = 55.0
GCN_MIN_DIVISOR = 1e-8
ZCA_FILTER_BIAS = 0.1
LCN_SIGMA = 2.0
LCN_EPS = 1e-4
# The methods config.data.preprocessing may name ('caffe' statistics come
# only with an imported Caffe model).
METHODS = ('scale', 'standardize', 'gcn_zca', 'lcn', 'none')
# The arrays each method's statistics hold (see `Fitted`).
STATISTICS = {'scale': (), 'none': (), 'lcn': (), 'standardize': ('mean', 'std'),
              'gcn_zca': ('zca_mean', 'zca_whiten'), 'caffe': ('mean',)}


def global_contrast_normalize(x: np.ndarray, scale: float = GCN_SCALE,
                              min_divisor: float = GCN_MIN_DIVISOR
                              ) -> np.ndarray:
  """Per image: subtract its mean, then scale its L2 norm to `scale` (pylearn2)."""
  flat = x.reshape(x.shape[0], -1).astype(np.float64)
  flat = flat - flat.mean(axis=1, keepdims=True)
  norms = np.sqrt((flat ** 2).sum(axis=1, keepdims=True)) / scale
  norms[norms < min_divisor] = 1.0
  return (flat / norms).reshape(x.shape).astype(np.float32)


def fit_zca(x: np.ndarray, filter_bias: float = ZCA_FILTER_BIAS
            ) -> tuple[np.ndarray, np.ndarray]:
  """Fits ZCA on `x` [n, ...]; returns (mean [d], whitening matrix [d, d]).

  The matrix is V diag(1/sqrt(eig + filter_bias)) V^T of the covariance
  X^T X / n of the centred data, as pylearn2's `ZCA(filter_bias=0.1)`.
  """
  flat = x.reshape(x.shape[0], -1).astype(np.float64)
  mean = flat.mean(axis=0)
  centred = flat - mean
  cov = centred.T @ centred / flat.shape[0]
  eigvals, eigvecs = np.linalg.eigh(cov)
  eigvals = np.maximum(eigvals, 0.0)
  whiten = (eigvecs / np.sqrt(eigvals + filter_bias)) @ eigvecs.T
  return mean.astype(np.float32), whiten.astype(np.float32)


def apply_zca(x: np.ndarray, mean: np.ndarray, whiten: np.ndarray,
              chunk: int = 4096) -> np.ndarray:
  """Applies a fitted ZCA to `x` [n, ...] in chunks (bounded extra memory)."""
  flat = x.reshape(x.shape[0], -1)
  out = np.empty(flat.shape, np.float32)
  for start in range(0, flat.shape[0], chunk):
    out[start:start + chunk] = (flat[start:start + chunk] - mean) @ whiten
  return out.reshape(x.shape)


def _fingerprint(x: np.ndarray, *params) -> str:
  digest = hashlib.sha256()
  digest.update(repr((x.shape, str(x.dtype), params)).encode())
  digest.update(np.ascontiguousarray(x).data)
  return digest.hexdigest()[:24]


def default_cache_dir() -> str:
  """`$XDG_CACHE_HOME/nin_jax`, else `~/.cache/nin_jax`."""
  return os.path.join(os.environ.get('XDG_CACHE_HOME') or
                      os.path.join(os.path.expanduser('~'), '.cache'),
                      'nin_jax')


def cached_zca(train: np.ndarray, cache_dir: Optional[str],
               filter_bias: float = ZCA_FILTER_BIAS
               ) -> tuple[np.ndarray, np.ndarray]:
  """`fit_zca(train)`, loaded from `cache_dir` when fitted before on the same data."""
  cache_dir = cache_dir or default_cache_dir()
  path = os.path.join(cache_dir,
                      f'zca_{_fingerprint(train, filter_bias)}.npz')
  if os.path.exists(path):
    try:
      with np.load(path, allow_pickle=False) as f:
        logging.info('Loaded ZCA statistics from %s', path)
        return f['mean'], f['whiten']
    except (OSError, ValueError, KeyError) as e:
      logging.warning('Ignoring unreadable ZCA cache %s (%s); refitting.',
                      path, e)
  logging.info('Fitting ZCA on %d training images ...', train.shape[0])
  mean, whiten = fit_zca(train, filter_bias)
  try:
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f'{path}.{os.getpid()}.tmp.npz'
    np.savez(tmp, mean=mean, whiten=whiten)
    os.replace(tmp, path)
    logging.info('Cached ZCA statistics in %s', path)
  except OSError as e:
    logging.warning('Could not cache ZCA statistics in %s: %s', cache_dir, e)
  return mean, whiten


def local_contrast_normalize(x: np.ndarray, sigma: float = LCN_SIGMA,
                             eps: float = LCN_EPS, chunk: int = 4096
                             ) -> np.ndarray:
  """Per image and channel: subtract a Gaussian local mean, divide by local std.

  The divisor is max(local std, the image's mean local std), as in Jarrett et
  al. (2009) and pylearn2's LeCun LCN. Works in chunks of images, so SVHN's
  600k images need little more memory than the float32 result.
  """
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  out = np.empty(x.shape, np.float32)
  spatial = (0, sigma, sigma, 0)
  for start in range(0, x.shape[0], chunk):
    part = x[start:start + chunk].astype(np.float32)
    centred = part - ndimage.gaussian_filter(part, spatial, mode='reflect')
    local_std = np.sqrt(ndimage.gaussian_filter(centred ** 2, spatial,
                                                mode='reflect'))
    floor = local_std.mean(axis=(1, 2), keepdims=True)
    out[start:start + chunk] = centred / np.maximum(
        np.maximum(local_std, floor), eps)
  return out


@dataclasses.dataclass(frozen=True)
class Fitted:
  """A normalization fitted on a training split.

  `method`: one of STATISTICS. `max_value`: the largest raw pixel value (255
  for uint8, 16 for sklearn digits). `arrays`: the method's statistics, in
  [0, 1] units ('standardize': per-channel 'mean' and 'std' [c]; 'gcn_zca':
  'zca_mean' [h*w*c] and 'zca_whiten' [h*w*c, h*w*c]) or in raw units
  ('caffe': 'mean', a BGR pixel [3] or image [h, w, 3]).
  """
  method: str
  max_value: float
  arrays: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.method not in STATISTICS:
      raise ValueError(f'Unknown preprocessing {self.method!r}; expected one '
                       f'of {sorted(STATISTICS)}.')
    missing = set(STATISTICS[self.method]) - set(self.arrays)
    if missing:
      raise ValueError(f'Preprocessing {self.method!r} needs statistics '
                       f'{sorted(missing)}.')


def fit(train: np.ndarray, method: str, max_value: float,
        cache_dir: Optional[str] = None) -> Fitted:
  """The statistics of `method` on raw training images [n, h, w, c]."""
  if method == 'caffe':
    raise ValueError("'caffe' statistics come with a Caffe model "
                     '(caffe_import), not from a training split.')
  arrays = {}
  if method == 'standardize':
    scaled = _scale(train, max_value)
    arrays['mean'] = scaled.mean(axis=(0, 1, 2), dtype=np.float64)
    std = scaled.std(axis=(0, 1, 2), dtype=np.float64)
    std[std == 0] = 1.0
    arrays['std'] = std
  elif method == 'gcn_zca':
    gcn = global_contrast_normalize(_scale(train, max_value))
    arrays['zca_mean'], arrays['zca_whiten'] = cached_zca(gcn, cache_dir)
  return Fitted(method, float(max_value), arrays)


def _scale(x: np.ndarray, max_value: float) -> np.ndarray:
  return np.divide(x, np.float32(max_value), dtype=np.float32)


def apply(fitted: Fitted, x: np.ndarray) -> np.ndarray:
  """Normalizes raw images `x` [n, h, w, c] on the host: float32 [n, h, w, c]."""
  a = fitted.arrays
  if fitted.method == 'caffe':
    return (x[..., ::-1].astype(np.float32) - a['mean']).astype(np.float32)
  x = _scale(x, fitted.max_value)
  if fitted.method == 'standardize':
    return ((x - a['mean']) / a['std']).astype(np.float32)
  if fitted.method == 'gcn_zca':
    return apply_zca(global_contrast_normalize(x), a['zca_mean'],
                     a['zca_whiten'])
  if fitted.method == 'lcn':
    return local_contrast_normalize(x)
  return x


def preprocess(train: np.ndarray, test: np.ndarray, method: str,
               max_value: float, cache_dir: Optional[str] = None
               ) -> tuple[np.ndarray, np.ndarray]:
  """Normalizes raw `train`/`test` images with statistics of `train` only.

  `max_value`: the largest raw pixel value (255 for uint8, 16 for digits).
  """
  fitted = fit(train, method, max_value, cache_dir)
  return apply(fitted, train), apply(fitted, test)


# ----------------------------------------------------------------- device --

def normalizer(fitted: Fitted) -> Callable[[jax.Array], jax.Array]:
  """`apply` in jax.numpy, for use inside compiled functions: raw images
  [batch, h, w, c] (uint8 or float, the dataset's units) -> float32.

  Agrees with `apply` to float32 rounding (GCN runs in float32 here, float64
  on the host); 'scale' and 'standardize' compute exactly what the streamed
  ImageNet pipeline always has.
  """
  a = {k: np.asarray(v, np.float64) for k, v in fitted.arrays.items()}
  method, max_value = fitted.method, fitted.max_value
  if method == 'caffe':
    mean = a['mean'].astype(np.float32)
    return lambda x: x[..., ::-1].astype(jnp.float32) - mean
  if method == 'standardize':
    mean = (max_value * a['mean']).astype(np.float32)
    std = (max_value * a['std']).astype(np.float32)
    return lambda x: (x.astype(jnp.float32) - mean) / std
  scale = lambda x: x.astype(jnp.float32) / np.float32(max_value)
  if method == 'gcn_zca':
    zca_mean = a['zca_mean'].astype(np.float32)
    whiten = a['zca_whiten'].astype(np.float32)
    return lambda x: _device_gcn_zca(scale(x), zca_mean, whiten)
  if method == 'lcn':
    return lambda x: _device_lcn(scale(x))
  return scale


def _device_gcn_zca(x: jax.Array, zca_mean: np.ndarray,
                    whiten: np.ndarray) -> jax.Array:
  """GCN then ZCA of float32 images [b, h, w, c] (as the host's)."""
  flat = x.reshape(x.shape[0], -1)
  flat = flat - flat.mean(axis=1, keepdims=True)
  norms = jnp.sqrt(jnp.sum(flat ** 2, axis=1, keepdims=True)) / GCN_SCALE
  flat = flat / jnp.where(norms < GCN_MIN_DIVISOR, 1.0, norms)
  return ((flat - zca_mean) @ whiten).reshape(x.shape)


def _gaussian_blur(x: jax.Array, sigma: float) -> jax.Array:
  """scipy.ndimage.gaussian_filter over height and width of [b, h, w, c]
  (truncated at 4 sigma, 'reflect' borders), as separable 1-D filters."""
  radius = int(4.0 * sigma + 0.5)
  taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
  taps = (taps / taps.sum()).astype(np.float32)
  for axis in (1, 2):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (radius, radius)
    padded = jnp.pad(x, pad, mode='symmetric')
    x = sum(tap * jax.lax.slice_in_dim(padded, k, k + x.shape[axis],
                                       axis=axis)
            for k, tap in enumerate(taps))
  return x


def _device_lcn(x: jax.Array, sigma: float = LCN_SIGMA,
                eps: float = LCN_EPS) -> jax.Array:
  """`local_contrast_normalize` of float32 images [b, h, w, c]."""
  centred = x - _gaussian_blur(x, sigma)
  local_std = jnp.sqrt(_gaussian_blur(centred ** 2, sigma))
  floor = local_std.mean(axis=(1, 2), keepdims=True)
  return centred / jnp.maximum(jnp.maximum(local_std, floor), eps)
