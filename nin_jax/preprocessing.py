"""The paper's input normalizations, fitted on the training split only.

- `scale`: uint8 -> [0, 1].
- `standardize`: per-channel mean/std of the training images.
- `gcn_zca`: global contrast normalization (scale 55) then ZCA whitening
  (filter bias 0.1), as pylearn2's CIFAR-10 pipeline used by Maxout and NiN.
  The ZCA statistics are cached on disk, keyed by a hash of the training data.
- `lcn`: local contrast normalization, as used for SVHN.

All functions take and return float32 [batch, height, width, channels].
"""

from __future__ import annotations

import hashlib
import os
from typing import Optional

import numpy as np
from absl import logging
from scipy import ndimage

GCN_SCALE = 55.0
ZCA_FILTER_BIAS = 0.1


def global_contrast_normalize(x: np.ndarray, scale: float = GCN_SCALE,
                              min_divisor: float = 1e-8) -> np.ndarray:
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
  return os.path.join(os.path.expanduser('~'), '.cache', 'nin_jax')


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


def local_contrast_normalize(x: np.ndarray, sigma: float = 2.0,
                             eps: float = 1e-4, chunk: int = 4096
                             ) -> np.ndarray:
  """Per image and channel: subtract a Gaussian local mean, divide by local std.

  The divisor is max(local std, the image's mean local std), as in Jarrett et
  al. (2009) and pylearn2's LeCun LCN. Works in chunks of images, so SVHN's
  600k images need little more memory than the float32 result.
  """
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


def preprocess(train: np.ndarray, test: np.ndarray, method: str,
               max_value: float, cache_dir: Optional[str] = None
               ) -> tuple[np.ndarray, np.ndarray]:
  """Normalizes raw `train`/`test` images with statistics of `train` only.

  `max_value`: the largest raw pixel value (255 for uint8, 16 for digits).
  """
  train = np.divide(train, np.float32(max_value), dtype=np.float32)
  test = np.divide(test, np.float32(max_value), dtype=np.float32)
  if method in ('scale', 'none'):
    return train, test
  if method == 'standardize':
    mean = train.mean(axis=(0, 1, 2), dtype=np.float64)
    std = train.std(axis=(0, 1, 2), dtype=np.float64)
    std[std == 0] = 1.0
    return ((train - mean) / std).astype(np.float32), (
        (test - mean) / std).astype(np.float32)
  if method == 'gcn_zca':
    train = global_contrast_normalize(train)
    test = global_contrast_normalize(test)
    mean, whiten = cached_zca(train, cache_dir)
    return apply_zca(train, mean, whiten), apply_zca(test, mean, whiten)
  if method == 'lcn':
    return local_contrast_normalize(train), local_contrast_normalize(test)
  raise ValueError(f'config.preprocessing={method!r} is not a preprocessing.')
