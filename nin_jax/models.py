"""Network in Network (Lin, Chen & Yan, ICLR 2014) as pure flax.linen modules.

`MlpConv` is the paper's micro network: a k x k convolution followed by 1 x 1
convolutions ("cccp" layers in the author's Caffe and cuda-convnet files), ReLU
after each. `NiN` stacks mlpconv blocks with Caffe-style ceil-mode pooling and
dropout between them, and ends in global average pooling over one feature map
per class (or, for the paper's Table 5 ablation, a fully connected head).

Presets reproduce the author's layer lists; `create_model(preset, **overrides)`
builds one. Every convolution is made by the module in the `conv` field
(`Conv` by default); an accelerated one (e.g. nin_jax.plugins.onednn's) is
plugged in there, never imported here.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from nin_jax.errors import check

Array = jax.Array
Initializer = Callable[..., Array]
ModuleDef = Any

INITS = ('faithful', 'modern')
HEADS = ('gap', 'fc')
POOLS = ('max', 'avg', 'none')

# Caffe's NIN model zoo files draw every conv weight from N(0, 0.05^2), biases 0.
FAITHFUL_STDDEV = 0.05


def kernel_initializer(init: str,
                       stddev: float = FAITHFUL_STDDEV) -> Initializer:
  """Weight initializer: 'faithful' (Gaussian, std `stddev`, Caffe) or
  'modern' (He)."""
  if init == 'faithful':
    return nn.initializers.normal(stddev=stddev)
  if init == 'modern':
    return nn.initializers.he_normal()
  raise ValueError(f'init must be one of {INITS}, got {init!r}.')


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


class MlpConv(nn.Module):
  """One mlpconv block: a k x k conv, then 1 x 1 convs, ReLU after each.

  Maps [batch, height, width, in_channels] to
  [batch, out_height, out_width, features[-1]]. `features[0]` is the width of
  the k x k convolution, the rest are the widths of the 1 x 1 layers.
  `conv` makes every convolution (flax's `nn.Conv` signature): `Conv`, or
  e.g. the oneDNN plugin's (`nin_jax.conv_select.conv_module('auto')`; same
  results to float tolerance, about 17% faster training on a 2-core CPU).
  `kernel_inits`, when given, initializes each layer's kernel in turn
  instead of `kernel_init`.
  """
  features: Sequence[int]
  kernel_size: int = 3
  stride: int = 1
  padding: int = 0
  kernel_init: Initializer = nn.initializers.normal(stddev=FAITHFUL_STDDEV)
  kernel_inits: Sequence[Initializer] = ()
  bias_init: Initializer = nn.initializers.zeros_init()
  batch_norm: bool = False
  final_relu: bool = True
  conv: ModuleDef = Conv
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    if not self.features:
      raise ValueError('MlpConv.features must list at least one width.')
    if self.kernel_inits and len(self.kernel_inits) != len(self.features):
      raise ValueError(f'MlpConv.kernel_inits has {len(self.kernel_inits)} '
                       f'initializers for {len(self.features)} layers.')
    for i, width in enumerate(self.features):
      kernel_init = (self.kernel_inits[i] if self.kernel_inits else
                     self.kernel_init)
      size, stride, pad = ((self.kernel_size, self.stride, self.padding)
                           if i == 0 else (1, 1, 0))
      x = self.conv(width, (size, size), strides=(stride, stride),
                    padding=[(pad, pad)] * 2, use_bias=not self.batch_norm,
                    kernel_init=kernel_init, bias_init=self.bias_init,
                    dtype=self.dtype, param_dtype=self.param_dtype,
                    name='conv' if i == 0 else f'cccp{i}')(x)
      if self.batch_norm:
        x = BatchNorm(momentum=0.9, epsilon=1e-5, dtype=self.dtype,
                      param_dtype=self.param_dtype, name=f'bn{i}')(
                          x, train=train)
      if i < len(self.features) - 1 or self.final_relu:
        x = nn.relu(x)
    return x


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """One mlpconv block and the pooling/dropout that follow it.

  `features`: widths of the k x k conv and the 1 x 1 convs after it. In the
  last block of a `NiN` the class-map layer (width `num_classes`) is appended.
  `pool`: 'max', 'avg' (Caffe semantics) or 'none'. `dropout`: dropout after
  the pool, at the network's `dropout_rate`. `init_stddevs`: the 'faithful'
  init's Gaussian std of each layer (the class-map layer's last in the last
  block), where the author's file sets them per layer; () = FAITHFUL_STDDEV.
  """
  features: tuple[int, ...]
  kernel_size: int
  stride: int = 1
  padding: int = 0
  pool: str = 'none'
  pool_window: int = 3
  pool_stride: int = 2
  dropout: bool = False
  init_stddevs: tuple[float, ...] = ()


class NiN(nn.Module):
  """Network in Network: mlpconv blocks, pooling, dropout and a GAP head.

  Input [batch, height, width, channels] (any size the pools can reduce);
  output logits [batch, num_classes]. With `train=True` dropout is active and
  needs a 'dropout' RNG; with `batch_norm` the 'batch_stats' collection is
  updated. `conv` makes every convolution (see `MlpConv`). The GAP head sows
  its input, the class maps [batch, h, w, num_classes], as
  ('intermediates', 'class_maps') when applied with
  `mutable=['intermediates']` (otherwise nothing is stored).
  """
  blocks: tuple[BlockSpec, ...]
  num_classes: int
  head: str = 'gap'
  dropout_rate: float = 0.5
  head_dropout_rate: float = 0.0
  weight_init: str = 'faithful'
  batch_norm: bool = False
  final_relu: bool = True
  conv: ModuleDef = Conv
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    if self.head not in HEADS:
      raise ValueError(f'NiN.head must be one of {HEADS}, got {self.head!r}.')
    kernel_init = kernel_initializer(self.weight_init)
    if self.dtype is not None:
      x = x.astype(self.dtype)
    for i, block in enumerate(self.blocks):
      last = i == len(self.blocks) - 1
      features = tuple(block.features) + ((self.num_classes,) if last else ())
      per_layer = ()
      if self.weight_init == 'faithful':
        per_layer = tuple(kernel_initializer('faithful', std)
                          for std in block.init_stddevs)
      x = MlpConv(features, block.kernel_size, block.stride, block.padding,
                  kernel_init=kernel_init, kernel_inits=per_layer,
                  batch_norm=self.batch_norm,
                  final_relu=self.final_relu or not last,
                  conv=self.conv, dtype=self.dtype,
                  param_dtype=self.param_dtype, name=f'mlpconv{i + 1}')(
                      x, train=train)
      if block.pool == 'max':
        x = max_pool_ceil(x, block.pool_window, block.pool_stride)
      elif block.pool == 'avg':
        x = avg_pool_ceil(x, block.pool_window, block.pool_stride)
      elif block.pool != 'none':
        raise ValueError(f'BlockSpec.pool must be one of {POOLS}, got '
                         f'{block.pool!r}.')
      if block.dropout and self.dropout_rate > 0:
        x = Dropout(self.dropout_rate, deterministic=not train)(x)
    if self.head == 'gap':
      # The class maps [batch, h, w, classes] (the paper's Figure 4), kept
      # only when 'intermediates' is mutable (experiments/confidence_maps.py).
      self.sow('intermediates', 'class_maps', x)
      logits = global_average_pool(x)
    else:
      x = x.reshape((x.shape[0], -1))
      if self.head_dropout_rate > 0:
        x = Dropout(self.head_dropout_rate, deterministic=not train)(x)
      logits = nn.Dense(self.num_classes, kernel_init=kernel_init,
                        dtype=self.dtype, param_dtype=self.param_dtype,
                        name='fc')(x)
    return logits.astype(jnp.float32)


def _cifar_blocks(second_pool: str, first_stddevs: tuple[float, ...] = ()
                  ) -> tuple[BlockSpec, ...]:
  return (
      BlockSpec((192, 160, 96), kernel_size=5, padding=2, pool='max',
                dropout=True, init_stddevs=first_stddevs),
      BlockSpec((192, 192, 192), kernel_size=5, padding=2, pool=second_pool,
                dropout=True),
      BlockSpec((192, 192), kernel_size=3, padding=1),
  )


@dataclasses.dataclass(frozen=True)
class Preset:
  """A named architecture: blocks, class count and the input it was built for."""
  blocks: tuple[BlockSpec, ...]
  num_classes: int
  image_size: int
  channels: int


PRESETS: dict[str, Preset] = {
    # cuda-convnet NIN/cifar10_def (max pooling); the Caffe model zoo file
    # uses average pooling after block 2: `second_pool='avg'`.
    'cifar10': Preset(_cifar_blocks('max'), 10, 32, 3),
    # cuda-convnet NIN/cifar-100_def: conv1 N(0, 0.001), cccp1-2 N(0, 0.01).
    'cifar100': Preset(_cifar_blocks('max', (0.001, 0.01, 0.01)), 100, 32, 3),
    'svhn': Preset((
        BlockSpec((128, 96, 64), kernel_size=5, padding=2, pool='max',
                  dropout=True),
        BlockSpec((320, 256, 128), kernel_size=5, padding=2, pool='max',
                  dropout=True),
        BlockSpec((384, 256), kernel_size=5, padding=2),
    ), 10, 32, 3),
    'mnist': Preset((
        BlockSpec((96, 64, 48), kernel_size=5, padding=2, pool='max',
                  dropout=True),
        BlockSpec((128, 96, 48), kernel_size=5, padding=2, pool='max',
                  dropout=True),
        BlockSpec((128, 96), kernel_size=5, padding=2),
    ), 10, 28, 1),
    # Caffe model zoo "NIN-Imagenet": 224 -> 54 -> 27 -> 13 -> 6, GAP over 6x6;
    # its train_val.prototxt draws conv1, conv3 and cccp8 from N(0, 0.01).
    'imagenet': Preset((
        BlockSpec((96, 96, 96), kernel_size=11, stride=4, pool='max',
                  init_stddevs=(0.01, 0.05, 0.05)),
        BlockSpec((256, 256, 256), kernel_size=5, padding=2, pool='max'),
        BlockSpec((384, 384, 384), kernel_size=3, padding=1, pool='max',
                  dropout=True, init_stddevs=(0.01, 0.05, 0.05)),
        BlockSpec((1024, 1024), kernel_size=3, padding=1,
                  init_stddevs=(0.05, 0.05, 0.01)),
    ), 1000, 224, 3),
    # A small NiN for scikit-learn's 8x8 digits: 8 -> 4 -> 2, GAP over 2x2.
    'quickstart': Preset((
        BlockSpec((64, 48, 32), kernel_size=3, padding=1, pool='max',
                  dropout=True),
        BlockSpec((96, 64, 48), kernel_size=3, padding=1, pool='max',
                  dropout=True),
        BlockSpec((96, 64), kernel_size=3, padding=1),
    ), 10, 8, 1),
}


def create_model(preset: str, *, second_pool: Optional[str] = None,
                 **overrides: Any) -> NiN:
  """Builds the `NiN` of a preset; `overrides` set any `NiN` field.

  `second_pool` ('max' or 'avg') replaces the pooling after block 2 (Caffe's
  CIFAR model averages there, cuda-convnet's takes the max).
  """
  if preset not in PRESETS:
    raise ValueError(f'Unknown preset {preset!r}; valid presets: '
                     f'{sorted(PRESETS)}.')
  spec = PRESETS[preset]
  blocks = spec.blocks
  if second_pool is not None:
    if second_pool not in ('max', 'avg'):
      raise ValueError(f"second_pool must be 'max' or 'avg', got "
                       f'{second_pool!r}.')
    blocks = (blocks[0], dataclasses.replace(blocks[1], pool=second_pool),
              *blocks[2:])
  fields = dict(blocks=blocks, num_classes=spec.num_classes)
  fields.update(overrides)
  return NiN(**fields)


def output_size(blocks: Sequence[BlockSpec], image_size: int) -> int:
  """Spatial size of the last block's maps for a square input; <1 if impossible."""
  size = image_size
  for block in blocks:
    size = (size + 2 * block.padding - block.kernel_size) // block.stride + 1
    if size < 1:
      return size
    if block.pool != 'none':
      size = pooled_size(size, block.pool_window, block.pool_stride)
  return size


DTYPES = ('float32', 'bfloat16', 'float16')


def validate_config(m: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first invalid field of config.model
  (conv_impl is conv_select's)."""
  check(m.preset in PRESETS, 'model.preset', m.preset,
        f'must be one of {sorted(PRESETS)}')
  check(m.head in HEADS, 'model.head', m.head, f'must be one of {HEADS}')
  check(m.weight_init in INITS, 'model.weight_init', m.weight_init,
        f'must be one of {INITS}')
  check(m.second_pool in ('', 'max', 'avg'), 'model.second_pool',
        m.second_pool, "must be '', 'max' or 'avg'")
  for field in ('dropout_rate', 'head_dropout_rate'):
    check(0.0 <= m[field] < 1.0, f'model.{field}', m[field],
          'must be in [0, 1)')
  check(m.dtype in DTYPES, 'model.dtype', m.dtype, f'must be one of {DTYPES}')
