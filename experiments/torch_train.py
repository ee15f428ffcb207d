"""Trains a nin-jax config with PyTorch: the race's peer (experiments/race.py).

Not part of the package. It reads the same config as `nin_jax.main` and
mirrors what the config says, so both frameworks run one recipe:
  data      nin-jax's own loading and preprocessing (`input_pipeline.load_dataset`),
            and its batch order (`train_batch_indices`: the same images per step)
  augment   translation by up to data.translate_pixels with zero padding, then
            a horizontal flip with probability 1/2 (as `augmentation.augment`)
  model     experiments/torch_nin.TorchNiN of config.model (channels-last)
  loss      cross-entropy with train.label_smoothing
  optimizer SGD (Nesterov if optim.optimizer says so) with per-group learning
            rates for nin-jax's parameter classes (weights, biases x bias_lr_mult,
            the class-map layer x last_layer_lr_mult, BatchNorm), weight decay on
            weights only, and the base learning rate of every step taken from
            `optimizer.learning_rate_schedule` itself (the same numbers)
  eval      the evaluation split after each epoch and at the end, averaged over
            the mirror image when train.eval_flip

What it cannot mirror it refuses in one line (the plateau schedule, an fc
head, a streamed dataset, a dtype other than float32). The torch-free parts
(those checks, the batches, augmentation and learning rates) are in
experiments/race_plan.py, which the race imports without PyTorch.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional

import ml_collections
import numpy as np
import torch
from torch import nn

from experiments import race_plan
from experiments import torch_nin
from nin_jax import batching
from nin_jax import datasets
from nin_jax import input_pipeline
from nin_jax import models


def build_model(m: ml_collections.ConfigDict) -> torch_nin.TorchNiN:
  """The PyTorch NiN of config.model, channels-last."""
  return torch_nin.TorchNiN(
      m.preset, dropout_rate=m.dropout_rate, batch_norm=m.batch_norm,
      weight_init=m.weight_init, final_relu=m.final_relu).to(
          memory_format=torch.channels_last)


def param_groups(model: torch_nin.TorchNiN, optim: ml_collections.ConfigDict
                 ) -> list[dict]:
  """SGD parameter groups with 'mult' (of the base learning rate) and
  'weight_decay', as `optimizer.create_optimizer` labels nin-jax's params."""
  convs = [mod for mod in model.modules() if isinstance(mod, nn.Conv2d)]
  last = convs[-1]
  groups = {name: [] for name in ('weight', 'bias', 'last_weight',
                                  'last_bias', 'norm')}
  for module in model.modules():
    if isinstance(module, nn.Conv2d):
      prefix = 'last_' if module is last else ''
      groups[prefix + 'weight'].append(module.weight)
      if module.bias is not None:
        groups[prefix + 'bias'].append(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
      groups['norm'] += [module.weight, module.bias]
  mults = {'weight': 1.0, 'bias': optim.bias_lr_mult,
           'last_weight': optim.last_layer_lr_mult,
           'last_bias': optim.last_layer_lr_mult * optim.bias_lr_mult,
           'norm': 1.0}
  return [{'params': params, 'mult': mults[name],
           'weight_decay': optim.weight_decay if 'weight' in name else 0.0}
          for name, params in groups.items() if params]


def to_torch(images: np.ndarray) -> torch.Tensor:
  """[batch, h, w, c] float32 as a [batch, c, h, w] channels-last tensor."""
  return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)


@torch.no_grad()
def evaluate(model: nn.Module, split: batching.Split, batch_size: int,
             flip: bool) -> dict[str, float]:
  """Loss, accuracy and error of `model` over every example of `split`."""
  model.eval()
  loss_sum, correct = 0.0, 0
  for start in range(0, len(split), batch_size):
    images = to_torch(split.images[start:start + batch_size])
    labels = torch.from_numpy(split.labels[start:start + batch_size]).long()
    logits = model(images)
    if flip:
      logits = (logits + model(images.flip(3))) / 2
    loss_sum += nn.functional.cross_entropy(logits, labels,
                                            reduction='sum').item()
    correct += (logits.argmax(-1) == labels).sum().item()
  n = len(split)
  return {'loss': loss_sum / n, 'accuracy': correct / n,
          'error': 1 - correct / n, 'examples': n}


@dataclasses.dataclass
class Trainer:
  """The model, optimizer and learning rates of one run of config `c`."""
  c: ml_collections.ConfigDict
  model: nn.Module
  optimizer: torch.optim.Optimizer
  lrs: np.ndarray
  steps_per_epoch: int
  step: int = 0

  def train_step(self, images: np.ndarray, labels: np.ndarray) -> float:
    """One SGD step on a batch [batch, h, w, c] (normalized); the loss."""
    self.model.train()
    for group in self.optimizer.param_groups:
      group['lr'] = self.lrs[self.step] * group['mult']
    self.optimizer.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(
        self.model(to_torch(images)), torch.from_numpy(labels).long(),
        label_smoothing=self.c.train.label_smoothing)
    loss.backward()
    self.optimizer.step()
    self.step += 1
    return loss.item()


def create_trainer(c: ml_collections.ConfigDict, num_train_examples: int,
                   num_steps: int) -> Trainer:
  """A fresh model (seeded by train.seed) and its optimizer for `num_steps`."""
  race_plan.check_supported(c)
  torch.manual_seed(c.train.seed)
  model = build_model(c.model)
  optimizer = torch.optim.SGD(
      param_groups(model, c.optim), lr=c.optim.learning_rate,
      momentum=c.optim.momentum,
      nesterov=c.optim.optimizer == 'nesterov' and c.optim.momentum > 0)
  steps_per_epoch = batching.steps_per_epoch(num_train_examples,
                                                   c.train.batch_size)
  return Trainer(c, model, optimizer,
                 race_plan.learning_rates(c.optim, steps_per_epoch,
                                          num_steps),
                 steps_per_epoch)


def seconds_per_step(c: ml_collections.ConfigDict, steps: int,
                     warmup: int = 3) -> float:
  """Median seconds of a train step on random data (the race's planning)."""
  trainer = create_trainer(c, c.train.batch_size * 100, warmup + steps)
  rng = np.random.default_rng(0)
  num_classes = models.PRESETS[c.model.preset].num_classes
  images = rng.normal(size=(c.train.batch_size, *models.PRESETS[c.model.preset].image_shape)
                      ).astype(np.float32)
  labels = rng.integers(0, num_classes, c.train.batch_size).astype(np.int32)
  times = []
  for i in range(warmup + steps):
    start = time.perf_counter()
    trainer.train_step(images, labels)
    if i >= warmup:
      times.append(time.perf_counter() - start)
  return float(np.median(times))


def train_and_evaluate(c: ml_collections.ConfigDict, num_steps: int,
                       on_eval: Optional[Callable[[dict], None]] = None
                       ) -> list[dict]:
  """Trains `num_steps` steps; evaluates after each epoch and at the end.

  Returns (and passes to `on_eval` as it goes) one record per evaluation:
  epoch, step, train_seconds (making batches and training; evaluation
  excluded),
  test_accuracy, test_loss and train_loss (the mean since the last record).
  """
  race_plan.check_supported(c)
  spec = models.PRESETS[c.model.preset]
  dataset = input_pipeline.load_dataset(
      c.data, datasets.lookup(c.data.dataset), spec.num_classes)
  trainer = create_trainer(c, len(dataset.train), num_steps)
  curve, losses, trained = [], [], 0.0
  for step in range(num_steps):
    start = time.perf_counter()
    images, labels = race_plan.train_batch(c, dataset.train, step)
    losses.append(trainer.train_step(images, labels))
    trained += time.perf_counter() - start
    done = step + 1
    if done % trainer.steps_per_epoch == 0 or done == num_steps:
      metrics = evaluate(trainer.model, dataset.eval,
                         c.train.eval_batch_size, c.train.eval_flip)
      record = {'epoch': done / trainer.steps_per_epoch, 'step': done,
                'train_seconds': trained,
                'test_accuracy': metrics['accuracy'],
                'test_loss': metrics['loss'],
                'train_loss': float(np.mean(losses))}
      losses = []
      curve.append(record)
      if on_eval is not None:
        on_eval(record)
  return curve
