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
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from nin_jax import layers

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
  conv: ModuleDef = layers.Conv
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
        x = layers.BatchNorm(momentum=0.9, epsilon=1e-5, dtype=self.dtype,
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
  conv: ModuleDef = layers.Conv
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
        x = layers.max_pool_ceil(x, block.pool_window, block.pool_stride)
      elif block.pool == 'avg':
        x = layers.avg_pool_ceil(x, block.pool_window, block.pool_stride)
      elif block.pool != 'none':
        raise ValueError(f'BlockSpec.pool must be one of {POOLS}, got '
                         f'{block.pool!r}.')
      if block.dropout and self.dropout_rate > 0:
        x = layers.Dropout(self.dropout_rate, deterministic=not train)(x)
    if self.head == 'gap':
      # The class maps [batch, h, w, classes] (the paper's Figure 4), kept
      # only when 'intermediates' is mutable (experiments/confidence_maps.py).
      self.sow('intermediates', 'class_maps', x)
      logits = layers.global_average_pool(x)
    else:
      x = x.reshape((x.shape[0], -1))
      if self.head_dropout_rate > 0:
        x = layers.Dropout(self.head_dropout_rate, deterministic=not train)(x)
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

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """[height, width, channels] of the square images it was built for."""
    return (self.image_size, self.image_size, self.channels)


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
  entry = PRESETS[preset]
  blocks = entry.blocks
  if second_pool is not None:
    if second_pool not in ('max', 'avg'):
      raise ValueError(f"second_pool must be 'max' or 'avg', got "
                       f'{second_pool!r}.')
    blocks = (blocks[0], dataclasses.replace(blocks[1], pool=second_pool),
              *blocks[2:])
  fields = dict(blocks=blocks, num_classes=entry.num_classes)
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
      size = layers.pooled_size(size, block.pool_window, block.pool_stride)
  return size


