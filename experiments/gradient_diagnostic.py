r"""The data gradient at the author's CIFAR-10 NiN, layer by layer: the weight
decay it implies, and how it points.

  python -m experiments.gradient_diagnostic --workdir=runs/author_cifar10 \
      [--also=runs/finetune_author/faithful,runs/finetune_author/summed] \
      [--images=10000] [--caffemodel=...] [--npz=...]

WORKDIR holds the imported zoo model (imported there from --caffemodel when it
has no checkpoint); --also names other workdirs (e.g. the runs of
experiments/finetune_author.py) measured the same way. The gradient is the
trainer's own: `train.train_step` of configs/cifar10.py:faithful in the zoo's
layout (experiments/finetune_author.py's config), the loss the batch mean of
the cross-entropy, dropout on, fed the first batches (128 images) of the
trainer's epoch-0 order until --images are covered, on GCN + ZCA inputs. Its
optimizer is replaced by one that keeps the gradient and changes nothing.

Per layer (Caffe's names), over the batches b with gradients g_b:
  lambda_hat  -<mean g_b, w> / |w|^2, the weight decay under which w would be
              a stationary point of the loss plus decay; with its standard
              error across batches
  cos         the cosine between mean g_b and -w
  noise       eta * mult * mean |g_b|^2 / (2 |w|^2) / (1 - momentum): SGD's
              noise term in the radial balance lambda_hat = lambda - noise,
              at the solver's final rate eta = 0.001 and layer multiplier mult
The loss summed over the batch (a wrong objective) has exactly batch times
this gradient: its lambda_hat, standard error and noise term are the mean
loss's times the batch size (noise: times its square), its cosines the same.
One JSON line per workdir and parameter, after a header line.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from experiments import finetune_author
from experiments import provenance
from nin_jax import augmentation
from nin_jax import batching
from nin_jax import caffe_zoo
from nin_jax import checkpoints
from nin_jax import config_lib
from nin_jax import datasets
from nin_jax import input_pipeline
from nin_jax import model_factory
from nin_jax import models
from nin_jax import optimizer as optimizer_lib
from nin_jax import runtime
from nin_jax import train

FINAL_LR = 0.001


def caffe_layer_names(params: Any) -> dict[tuple[str, str], str]:
  """(block, layer) of each nin-jax conv -> its Caffe name (conv1, cccp1...)."""
  names, cccp = {}, 0
  for block in sorted(params, key=lambda k: int(k[len('mlpconv'):])):
    number = int(block[len('mlpconv'):])
    for layer in sorted(params[block], key=lambda k: (k != 'conv', k)):
      if layer == 'conv':
        names[(block, layer)] = f'conv{number}'
      else:
        cccp += 1
        names[(block, layer)] = f'cccp{cccp}'
  return names


def decay_statistics(grads: np.ndarray, w: np.ndarray) -> dict[str, float]:
  """lambda_hat = -<mean g, w>/|w|^2, its standard error across batches,
  the cosine of mean g with -w, and mean |g_b|^2 / |w|^2, from per-batch
  gradients `grads` [batches, *w.shape] of a parameter `w`."""
  if grads.shape[0] < 2:
    raise ValueError(f'{grads.shape[0]} batch: a standard error needs two')
  if grads.shape[1:] != w.shape:
    raise ValueError(f'gradients of shape {grads.shape[1:]} for a parameter '
                     f'of shape {w.shape}')
  flat = grads.reshape(grads.shape[0], -1).astype(np.float64)
  w = w.reshape(-1).astype(np.float64)
  w2 = float(w @ w)
  if w2 == 0:
    raise ValueError('the parameter is zero: no decay is defined')
  per_batch = -(flat @ w) / w2
  mean_grad = flat.mean(axis=0)
  norm = float(np.linalg.norm(mean_grad))
  return {
      'lambda_hat': float(per_batch.mean()),
      'se': float(per_batch.std(ddof=1) / np.sqrt(len(per_batch))),
      'cos': float(-(mean_grad @ w) / (norm * np.sqrt(w2))) if norm else 0.0,
      'grad_sq_over_w_sq': float(np.mean(np.sum(flat * flat, axis=1)) / w2),
      'w_norm': float(np.sqrt(w2)),
  }


def keep_gradient() -> optax.GradientTransformation:
  """An optimizer whose state is the last gradient and whose updates are 0."""
  return optax.GradientTransformation(
      lambda params: jax.tree.map(jnp.zeros_like, params),
      lambda grads, state, params=None: (
          jax.tree.map(jnp.zeros_like, grads), grads))


def batch_gradients(c: Any, params: Any, batches: Iterable[dict[str, Any]]
                    ) -> Iterable[Any]:
  """The gradient of `train.train_step`'s loss for each batch, dropout keys
  as the trainer draws them at steps 0, 1, ... of seed c.train.seed."""
  model = model_factory.build_model(c.model)
  step = jax.jit(functools.partial(
      train.train_step, model=model, tx=keep_gradient(),
      schedule=optax.constant_schedule(c.optim.learning_rate),
      augment_fn=augmentation.device_augment_fn(
          c.data, datasets.lookup(c.data.dataset)), plateau=False,
      label_smoothing=c.train.label_smoothing))
  rng = jax.random.key_data(jax.random.key(c.train.seed))
  zeros = jax.tree.map(jnp.zeros_like, params)
  for i, batch in enumerate(batches):
    state = train.TrainState(step=jnp.asarray(i, jnp.int32), params=params,
                             batch_stats={}, opt_state=zeros, rng=rng)
    new_state, metrics = step(state, batch)
    if not bool(metrics['finite']):
      raise FloatingPointError(f'batch {i}: the loss or gradient is not finite')
    yield new_state.opt_state


def measure(c: Any, params: Any, split: Any, num_batches: int
            ) -> list[dict[str, Any]]:
  """decay_statistics of every kernel and bias of `params` over the first
  `num_batches` batches of the trainer's epoch-0 order."""
  batch = c.train.batch_size
  batches = (split.read(batching.train_batch_indices(
      c.train.seed, i, batch, len(split))) for i in range(num_batches))
  leaves = {}
  for grads in batch_gradients(c, params, batches):
    for (block, layer, kind), g in _leaves(grads):
      leaves.setdefault((block, layer, kind), []).append(np.asarray(g))
  labels = optimizer_lib.param_labels(params)
  names = caffe_layer_names(params)
  rows = []
  for (block, layer, kind), grads in leaves.items():
    stats = decay_statistics(np.stack(grads), np.asarray(
        params[block][layer][kind]))
    label = labels[block][layer][kind]
    mult = ((c.optim.bias_lr_mult if 'bias' in label else 1.0) *
            (c.optim.last_layer_lr_mult if label.startswith('last') else 1.0))
    noise = (FINAL_LR * mult * stats['grad_sq_over_w_sq'] / 2 /
             (1 - c.optim.momentum))
    rows.append({'layer': names[(block, layer)],
                 'param': 'weight' if kind == 'kernel' else 'bias',
                 **stats, 'lr_mult': mult, 'noise_at_0.001': noise,
                 'summed': {'lambda_hat': stats['lambda_hat'] * batch,
                            'se': stats['se'] * batch, 'cos': stats['cos'],
                            'noise_at_0.001': noise * batch ** 2}})
  return rows


def _leaves(tree: Any) -> list[tuple[tuple[str, str, str], Any]]:
  return [((block, layer, kind), value)
          for block, layers in tree.items()
          for layer, kinds in layers.items()
          for kind, value in kinds.items()]


def main() -> None:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', default='runs/author_cifar10')
  parser.add_argument('--also', default='',
                      help='more workdirs, comma-separated')
  parser.add_argument('--caffemodel', default=str(
      finetune_author.DATA / 'caffe' / 'cifar10_nin.caffemodel'))
  parser.add_argument('--npz', default=str(
      finetune_author.DATA / 'cifar10' / 'cifar10.npz'))
  parser.add_argument('--images', type=int, default=10_000)
  args = parser.parse_args()
  if args.images < 2 * finetune_author.BATCH:
    parser.error(f'--images={args.images}: at least two batches of '
                 f'{finetune_author.BATCH} are needed for a standard error')
  if not pathlib.Path(args.npz).exists():
    parser.error(f'--npz={args.npz}: no such file')
  others = [w for w in args.also.split(',') if w]
  for workdir in others:
    if not checkpoints.checkpoint_steps(workdir):
      parser.error(f'--also: {workdir} holds no checkpoint')
  logging.set_verbosity(logging.ERROR)
  logging.get_absl_handler().addFilter(runtime.QuietLibraries())
  if not checkpoints.checkpoint_steps(args.workdir):
    if not pathlib.Path(args.caffemodel).exists():
      parser.error(f'--caffemodel={args.caffemodel}: no such file')
    caffe_zoo.import_caffemodel(args.caffemodel, 'cifar10', args.workdir,
                                dataset=f'npz:{args.npz}')
  c = finetune_author.run_config(args.npz, args.workdir, 1.0,
                                 finetune_author.RUNS['faithful'])
  dataset = input_pipeline.load_dataset(
      c.data, datasets.lookup(c.data.dataset), models.PRESETS[c.model.preset].num_classes,
      config_lib.streamed_image_size(c))
  num_batches = -(-args.images // c.train.batch_size)
  print(json.dumps({'images': num_batches * c.train.batch_size,
                    'batches': num_batches, 'batch': c.train.batch_size,
                    'dropout': c.model.dropout_rate,
                    'weight_decay': c.optim.weight_decay,
                    'momentum': c.optim.momentum, **provenance.header()}),
        flush=True)
  for workdir in [args.workdir, *others]:
    step = max(checkpoints.checkpoint_steps(workdir))
    params = jax.tree.map(jnp.asarray,
                          checkpoints.read_weights(workdir, step)['params'])
    for row in measure(c, params, dataset.train, num_batches):
      print(json.dumps({'workdir': workdir, 'step': step, **row}), flush=True)


if __name__ == '__main__':
  sys.exit(main())
