"""A PyTorch NiN built from nin_jax's presets: the benchmark peer of nin-jax.

Not part of the package. Same layers as `nin_jax.models.PRESETS` (k x k conv
and 1 x 1 convs with ReLU after each, BatchNorm optional, Caffe ceil-mode
pooling, dropout, global average pooling), the same inits (the author's
Gaussian(0.05) or flax's truncated He normal), and the same SGD-with-momentum
step on softmax cross-entropy; channels-last memory format. The benchmark
times `TorchRunner`; experiments/torch_train.py trains it for the race.

  python -m experiments.benchmark --preset cifar10 --batch-size 128
"""

from __future__ import annotations

import torch
from torch import nn

from nin_jax import models

VARIANTS = ('eager', 'compile', 'bf16')


def init_weight(weight: torch.Tensor, weight_init: str) -> None:
  """'faithful': N(0, 0.05); 'modern': flax's he_normal (a normal truncated at
  2 standard deviations, rescaled to variance 2 / fan_in)."""
  if weight_init == 'faithful':
    nn.init.normal_(weight, std=models.FAITHFUL_STDDEV)
    return
  fan_in = weight[0].numel()
  std = (2.0 / fan_in) ** 0.5 / 0.87962566103423978
  nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


class TorchNiN(nn.Module):
  """The NiN of a `models.PRESETS` entry; input [batch, channels, h, w]."""

  def __init__(self, preset: str, dropout_rate: float = 0.5,
               batch_norm: bool = False, weight_init: str = 'faithful',
               final_relu: bool = True):
    super().__init__()
    if weight_init not in ('faithful', 'modern'):
      raise ValueError(f"weight_init must be 'faithful' or 'modern', got "
                       f'{weight_init!r}.')
    spec = models.PRESETS[preset]
    layers = []
    in_channels = spec.channels
    for i, block in enumerate(spec.blocks):
      last = i == len(spec.blocks) - 1
      widths = tuple(block.features) + ((spec.num_classes,) if last else ())
      for j, width in enumerate(widths):
        k = block.kernel_size if j == 0 else 1
        conv = nn.Conv2d(in_channels, width, k,
                         stride=block.stride if j == 0 else 1,
                         padding=block.padding if j == 0 else 0,
                         bias=not batch_norm)
        init_weight(conv.weight, weight_init)
        layers.append(conv)
        if batch_norm:
          layers.append(nn.BatchNorm2d(width, momentum=0.1, eps=1e-5))
        else:
          nn.init.zeros_(conv.bias)
        if not (last and j == len(widths) - 1) or final_relu:
          layers.append(nn.ReLU(inplace=True))
        in_channels = width
      if block.pool == 'max':
        layers.append(nn.MaxPool2d(block.pool_window, block.pool_stride,
                                   ceil_mode=True))
      elif block.pool == 'avg':
        layers.append(nn.AvgPool2d(block.pool_window, block.pool_stride,
                                   ceil_mode=True, count_include_pad=False))
      if block.dropout and dropout_rate > 0:
        layers.append(nn.Dropout(dropout_rate))
    self.features = nn.Sequential(*layers)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.features(x).mean(dim=(2, 3))


class TorchRunner:
  """One variant ('eager', 'compile', 'bf16' autocast) of the NiN's steps."""

  def __init__(self, preset: str, batch_size: int, variant: str,
               batch_norm: bool = False, learning_rate: float = 0.1,
               seed: int = 0):
    if variant not in VARIANTS:
      raise ValueError(f'variant must be one of {VARIANTS}, got {variant!r}.')
    torch.manual_seed(seed)
    spec = models.PRESETS[preset]
    self.variant = variant
    self.model = TorchNiN(preset, batch_norm=batch_norm).to(
        memory_format=torch.channels_last)
    self.forward = (torch.compile(self.model) if variant == 'compile'
                    else self.model)
    self.optimizer = torch.optim.SGD(self.model.parameters(), lr=learning_rate,
                                     momentum=0.9, weight_decay=1e-4)
    self.images = torch.randn(
        batch_size, spec.channels, spec.image_size, spec.image_size
    ).contiguous(memory_format=torch.channels_last)
    self.labels = torch.randint(0, spec.num_classes, (batch_size,))

  def _autocast(self):
    return torch.autocast('cpu', dtype=torch.bfloat16,
                          enabled=self.variant == 'bf16')

  def train_step(self) -> float:
    """One SGD step; returns the loss."""
    self.model.train()
    self.optimizer.zero_grad(set_to_none=True)
    with self._autocast():
      loss = nn.functional.cross_entropy(self.forward(self.images),
                                         self.labels)
    loss.backward()
    self.optimizer.step()
    return loss.item()

  @torch.no_grad()
  def eval_step(self) -> float:
    """Forward pass in eval mode; returns the number of correct predictions."""
    self.model.eval()
    with self._autocast():
      logits = self.forward(self.images)
    return (logits.argmax(-1) == self.labels).sum().item()
