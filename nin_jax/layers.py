"""The layers NiN is built from, as drop-in flax.linen pieces tuned for speed.

Caffe's ceil-mode max and average pooling, a Dropout that draws fewer random
bits, a BatchNorm with its own backward pass, and a `Conv` that computes 1 x 1
convolutions as a matrix product. Each gives the same results as its plain
flax/XLA counterpart (tests/test_models.py compares them) and is faster on CPU.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def _ceil_mode_padding(size: int, window: int, stride: int) -> tuple[int, int]:
  """Right padding that makes a VALID pool produce Caffe's ceil-mode output size."""
  if size <= window:
    out = 1
  else:
    out = math.ceil((size - window) / stride) + 1
    # Caffe drops a last window that would start entirely in the padding.
    if (out - 1) * stride >= size:
      out -= 1
  return out, max(0, (out - 1) * stride + window - size)


def pooled_size(size: int, window: int, stride: int) -> int:
  """Spatial size after a Caffe ceil-mode pool (e.g. 32 -> 16 -> 8 for 3/2)."""
  return _ceil_mode_padding(size, window, stride)[0]


def max_pool_ceil(x: Array, window: int, stride: int) -> Array:
  """Caffe/cuda-convnet ceil-mode max pooling of `x` [batch, height, width, channels].

  A square max is separable, so it is taken along the width and then along the
  height, each as a maximum over the window's strided slices. The forward
  result is identical to `lax.reduce_window`; the backward pass is two short
  chains of selects instead of XLA's select-and-scatter (several times slower
  on CPU) or one chain over all window**2 slices (about 100 ms per CIFAR-10
  train step slower). Gradients agree wherever the window maximum is unique.
  """
  _, h, w, _ = x.shape
  out_h, pad_h = _ceil_mode_padding(h, window, stride)
  out_w, pad_w = _ceil_mode_padding(w, window, stride)
  x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)),
              constant_values=-jnp.inf)
  return _max_along(_max_along(x, 2, out_w, window, stride), 1, out_h, window,
                    stride)


def _max_along(x: Array, axis: int, out: int, window: int,
               stride: int) -> Array:
  """1-D max pooling of `x` along `axis` (already padded) to `out` positions."""
  result = None
  for offset in range(window):
    start = [0] * x.ndim
    start[axis] = offset
    limit = list(x.shape)
    limit[axis] = offset + (out - 1) * stride + 1
    strides = [1] * x.ndim
    strides[axis] = stride
    piece = jax.lax.slice(x, start, limit, strides)
    result = piece if result is None else jnp.maximum(result, piece)
  return result


def avg_pool_ceil(x: Array, window: int, stride: int) -> Array:
  """Caffe ceil-mode average pooling of `x` [batch, height, width, channels].

  Each window is divided by the number of input pixels it covers (Caffe clips
  the window to the input), not by window**2 as zero padding would.
  """
  _, h, w, _ = x.shape
  _, pad_h = _ceil_mode_padding(h, window, stride)
  _, pad_w = _ceil_mode_padding(w, window, stride)
  padding = ((0, pad_h), (0, pad_w))
  return nn.avg_pool(x, (window, window), (stride, stride), padding=padding,
                     count_include_pad=False)


def global_average_pool(x: Array) -> Array:
  """[batch, height, width, channels] -> [batch, channels], mean over space."""
  return jnp.mean(x, axis=(1, 2))


def bernoulli_mask(key: jax.Array, keep_prob: float,
                   shape: Sequence[int]) -> Array:
  """Boolean mask of `shape`, each entry True with probability `keep_prob`.

  When `keep_prob` is a multiple of 2**-bits for bits <= 8 (0.5 needs one bit)
  each entry spends only `bits` random bits, packed 32 // bits to a uint32
  along the last axis, instead of the 32 of `jax.random.bernoulli`: the mask
  has exactly the same distribution and is cheaper to draw (threefry dominates
  dropout on CPU). Other probabilities fall back to `jax.random.bernoulli`.
  """
  shape = tuple(shape)
  bits = next((b for b in (1, 2, 4, 8)
               if float(keep_prob * 2**b).is_integer()), None)
  if bits is None or not shape:
    return jax.random.bernoulli(key, keep_prob, shape)
  per_word = 32 // bits
  words = -(-shape[-1] // per_word)
  random = jax.random.bits(key, (*shape[:-1], words), jnp.uint32)
  shifts = jnp.arange(per_word, dtype=jnp.uint32) * bits
  values = (random[..., None] >> shifts) & jnp.uint32(2**bits - 1)
  values = values.reshape(*shape[:-1], words * per_word)[..., :shape[-1]]
  return values < jnp.uint32(round(keep_prob * 2**bits))


class Dropout(nn.Module):
  """Inverted dropout (as `nn.Dropout`) drawing its mask with `bernoulli_mask`.

  Zeroes each entry with probability `rate` and scales the rest by
  1 / (1 - rate) when not `deterministic`; needs a 'dropout' RNG then.
  """
  rate: float
  deterministic: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.deterministic or self.rate == 0.0:
      return x
    if self.rate == 1.0:
      return jnp.zeros_like(x)
    keep_prob = 1.0 - self.rate
    mask = bernoulli_mask(self.make_rng('dropout'), keep_prob, x.shape)
    return jnp.where(mask, x / keep_prob, jnp.zeros_like(x))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x: Array, scale: Array, bias: Array,
                     epsilon: float) -> tuple[Array, Array, Array]:
  """Training-mode batch norm over all axes but the last: (y, mean, var).

  x [..., features]; y = (x - mean) * scale / sqrt(var + epsilon) + bias with
  the batch's biased variance, computed in float32 as `nn.BatchNorm` does.
  The backward pass is the closed-form BN gradient (one reduction pass, one
  elementwise pass), about twice as fast on CPU as autodiff of the forward.
  `mean` and `var` are meant for running averages: their cotangents are
  ignored.
  """
  return _batch_norm_forward(x, scale, bias, epsilon)[0]


def _batch_norm_forward(x, scale, bias, epsilon):
  axes = tuple(range(x.ndim - 1))
  x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mean = jnp.mean(x32, axes)
  var = jnp.maximum(jnp.mean(jnp.square(x32), axes) - jnp.square(mean), 0.)
  rstd = jax.lax.rsqrt(var + epsilon)
  y = (x32 - mean) * (rstd * scale) + bias
  return (y, mean, var), (x, mean, rstd, scale)


def _batch_norm_backward(epsilon, residuals, cotangents):
  del epsilon
  x, mean, rstd, scale = residuals
  dy = cotangents[0].astype(mean.dtype)
  axes = tuple(range(x.ndim - 1))
  count = math.prod(x.shape[:-1])
  xhat = (x.astype(mean.dtype) - mean) * rstd
  dbias = jnp.sum(dy, axes)
  dscale = jnp.sum(dy * xhat, axes)
  dx = (rstd * scale) * (dy - dbias / count - xhat * (dscale / count))
  return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias


batch_norm_train.defvjp(_batch_norm_forward, _batch_norm_backward)


class BatchNorm(nn.Module):
  """`nn.BatchNorm` over the last axis with a hand-written backward pass.

  Same variables ('params': scale, bias; 'batch_stats': mean, var), defaults
  and results as `nn.BatchNorm(use_running_average=not train)`, so checkpoints
  move between the two; no `axis_name` (under jit the batch mean is already
  global across devices).
  """
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    features = (x.shape[-1],)
    scale = self.param('scale', nn.initializers.ones, features,
                       self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, features,
                      self.param_dtype)
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, features,
                            jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, features,
                           jnp.float32)
    if train:
      y, mean, var = batch_norm_train(x, scale, bias, self.epsilon)
      if not self.is_initializing():
        ra_mean.value = (self.momentum * ra_mean.value
                         + (1 - self.momentum) * jax.lax.stop_gradient(mean))
        ra_var.value = (self.momentum * ra_var.value
                        + (1 - self.momentum) * jax.lax.stop_gradient(var))
    else:
      mul = jax.lax.rsqrt(ra_var.value + self.epsilon) * scale
      y = (x.astype(jnp.promote_types(x.dtype, jnp.float32)) - ra_mean.value
           ) * mul + bias
    dtype = self.dtype or jnp.result_type(x, scale, bias)
    return y.astype(dtype)


def conv_general_dilated(x: Array, kernel: Array, window_strides: Sequence[int],
                         padding: Any, lhs_dilation: Any = None,
                         rhs_dilation: Any = None,
                         dimension_numbers: Any = None,
                         feature_group_count: int = 1,
                         batch_group_count: int = 1, precision: Any = None,
                         preferred_element_type: Any = None) -> Array:
  """`lax.conv_general_dilated`, with 1 x 1 convolutions as a matrix product.

  A stride-1, unpadded, undilated, ungrouped 1 x 1 convolution of x
  [batch, height, width, in] with kernel [1, 1, in, out] (NHWC/HWIO) is a dot
  over channels, 3x faster than XLA's 1 x 1 convolution on CPU; every other
  convolution is `lax.conv_general_dilated`'s.
  """
  xla = functools.partial(
      jax.lax.conv_general_dilated, x, kernel, window_strides, padding,
      lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision,
      preferred_element_type=preferred_element_type)
  if (x.ndim != 4 or kernel.shape[:2] != (1, 1)
      or tuple(window_strides) != (1, 1) or isinstance(padding, str)
      or any(tuple(p) != (0, 0) for p in padding)
      or any(d is not None and tuple(d) != (1, 1)
             for d in (lhs_dilation, rhs_dilation))
      or feature_group_count != 1 or batch_group_count != 1):
    return xla()
  dn = jax.lax.conv_dimension_numbers(x.shape, kernel.shape,
                                      dimension_numbers)
  if (tuple(dn.lhs_spec), tuple(dn.rhs_spec),
      tuple(dn.out_spec)) != ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2)):
    return xla()
  return jnp.einsum('bhwc,cd->bhwd', x, kernel[0, 0], precision=precision,
                    preferred_element_type=preferred_element_type)


class Conv(nn.Conv):
  """`nn.Conv` computing its 1 x 1 convolutions as a matrix product (see
  `conv_general_dilated`): the default `conv` of `MlpConv` and `NiN`, same
  parameters and results as `nn.Conv`."""
  conv_general_dilated: Callable[..., Array] = conv_general_dilated
