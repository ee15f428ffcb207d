r"""The faithful CIFAR-10 NiN's stall at ln(10), measured against the author's
trained weights.

  python -m experiments.stall_study --workdir=runs/author_cifar10 \
      --out=results/stall_study.json --figure=docs/stall_study.png \
      [--trials=seed0,seed1,seed2,sequential,std0.01] [--steps=200] \
      [--caffemodel=...] [--npz=...]
  python -m experiments.stall_study --out=results/stall_study.json \
      --figure=docs/stall_study.png --plot_only

Reads the zoo file's layer fields (fillers, learning-rate and decay
multipliers, pooling, dropout) from the caffemodel itself, then measures, on
the first 500 GCN + ZCA training images in inference mode, the model of
configs/cifar10.py:faithful in the zoo's layout (experiments/
finetune_author.py's config) at three starts and at the author's weights
(WORKDIR, imported from --caffemodel when it holds no checkpoint):
  N(0, 0.05)  the faithful init, seeds 0-2 (the zoo prototxt's fillers: every
              layer Gaussian std 0.05, biases 0; a per-layer init is added
              only where the file's stds differ)
  N(0, 0.01)  the paper summary's std: the same draws scaled by 0.2
per layer the RMS of the pre-activations and the norms of the kernels and
biases; per block the RMS of its output; the fraction of the class maps'
pre-activations (cccp6, before its ReLU and the global average pool) that are
positive; the mean spread (largest - smallest) of the logits.

Then each of --trials trains --steps steps at the zoo solver's learning rate
0.1 (batch 128, momentum 0.9, weight decay 1e-4, biases x2, cccp6 x0.1,
dropout 0.5) with the trainer's own compiled step:
  seedS       the faithful init and the trainer's shuffled order of seed S
  sequential  seed 0's init, the images in file order as Caffe's data layer
              reads its leveldb (no shuffling); sequentialS: seed S's init
              and dropout keys, the same order
  std0.01     seed 0's init scaled to N(0, 0.01), seed 0's order
recording each step's loss and logit spread and, every 25 steps, the class
maps' positive fraction on the probe images. A trial is stalled at its end
when its last 50 steps meet the trainer's stall test (loss within 1% of ln(10)
and logit spread below 0.1). --out keeps finished trials: a rerun skips them.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from experiments import finetune_author
from experiments import gradient_diagnostic
from experiments import provenance
from nin_jax import batching
from nin_jax import caffe_model
from nin_jax import caffe_zoo
from nin_jax import checkpoints
from nin_jax import config_lib
from nin_jax import datasets
from nin_jax import input_pipeline
from nin_jax import model_factory
from nin_jax import models
from nin_jax import runtime
from nin_jax import train

PROBE_IMAGES = 500
INIT_SEEDS = (0, 1, 2)
PROBE_EVERY = 25
FINAL_WINDOW = 50
LEARNING_RATE = 0.1
TRIALS = ('seed0', 'seed1', 'seed2', 'sequential', 'std0.01')
LAYERS = ('conv1', 'cccp1', 'cccp2', 'conv2', 'cccp3', 'cccp4', 'conv3',
          'cccp5', 'cccp6')


# ----------------------------------------------------- the zoo file's fields --

def _float(fields: dict, number: int) -> Optional[float]:
  values = caffe_model._floats(fields, number, '<f4')  # pylint: disable=protected-access
  return float(values[-1]) if values.size else None


def _filler(data: Any) -> dict[str, Any]:
  """A FillerParameter: its type and, for Caffe's defaults, std 1, value 0."""
  f = caffe_model._message(data)  # pylint: disable=protected-access
  kind = caffe_model._text(f, 1) or 'constant'  # pylint: disable=protected-access
  if kind == 'gaussian':
    return {'type': kind, 'std': round(_float(f, 6) or 1.0, 6),
            'mean': _float(f, 5) or 0.0}
  return {'type': kind, 'value': _float(f, 2) or 0.0}


def zoo_layer_fields(path: str) -> list[dict[str, Any]]:
  """Each V1 layer of the caffemodel at `path` with the prototxt fields its
  NetParameter keeps: type, blobs_lr, weight_decay, convolution settings and
  fillers, pooling, dropout ratio, data batch size, loss weight."""
  # pylint: disable=protected-access
  message, text, ints = (caffe_model._message, caffe_model._text,
                         caffe_model._int)
  net = message(caffe_model._read(path))
  if 2 not in net:
    raise caffe_model.CaffeFormatError(
        f'{path}: not a V1 (2014) Caffe model; its layer fields are not read')
  rows = []
  for raw in net[2]:
    f = message(raw)
    kind = caffe_model.V1_TYPES.get(ints(f, 5, 0), 'unknown')
    row: dict[str, Any] = {'name': text(f, 4), 'type': kind}
    lrs = caffe_model._floats(f, 7, '<f4')
    if lrs.size:
      row['blobs_lr'] = [round(float(x), 6) for x in lrs]
    decays = caffe_model._floats(f, 8, '<f4')
    if decays.size:
      row['weight_decay'] = [round(float(x), 6) for x in decays]
    if 10 in f:
      conv = message(f[10][-1])
      row.update(num_output=ints(conv, 1, 0), kernel=ints(conv, 4, 0),
                 stride=ints(conv, 6, 1), pad=ints(conv, 3, 0))
      if 7 in conv:
        row['weight_filler'] = _filler(conv[7][-1])
      if 8 in conv:
        row['bias_filler'] = _filler(conv[8][-1])
    if 19 in f:
      pool = message(f[19][-1])
      row['pool'] = caffe_model.POOL_METHODS.get(ints(pool, 1, 0), '?')
      row.update(kernel=ints(pool, 2, 0), stride=ints(pool, 3, 1),
                 pad=ints(pool, 4, 0))
    if 12 in f:
      row['dropout_ratio'] = _float(message(f[12][-1]), 1) or 0.5
    if 11 in f:
      data = message(f[11][-1])
      row.update(source=text(data, 1), batch_size=ints(data, 4, 0))
    if 35 in f:
      row['loss_weight'] = _float(f, 35)
    rows.append(row)
  return rows


def zoo_init_stddevs(fields: list[dict[str, Any]]) -> dict[str, float]:
  """Caffe name -> the std of each convolution's Gaussian weight filler."""
  return {row['name']: row['weight_filler']['std'] for row in fields
          if row.get('weight_filler', {}).get('type') == 'gaussian'}


# ---------------------------------------------------------- the measurements --

def scale_kernels(params: Any, factor: float) -> Any:
  """`params` with every kernel times `factor` (biases unchanged)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x * factor if path[-1].key == 'kernel' else x, params)


def profile(model: models.NiN, params: Any, images: np.ndarray
            ) -> dict[str, Any]:
  """Per-layer pre-activation RMS and weight norms, per-block output RMS,
  the class maps' positive fraction and the logit spread (of the GAP of the
  class maps after their ReLU) of `model` (`probe_model`) on `images`
  [n, h, w, c] in inference mode."""
  _, state = model.apply({'params': params}, jnp.asarray(images),
                              capture_intermediates=True,
                              mutable=['intermediates'])
  inter = state['intermediates']
  names = gradient_diagnostic.caffe_layer_names(params)
  layers = {}
  for (block, layer), name in names.items():
    pre = np.asarray(inter[block][layer]['__call__'][0], np.float64)
    layers[name] = {
        'pre_rms': float(np.sqrt(np.mean(pre ** 2))),
        'kernel_norm': float(np.linalg.norm(params[block][layer]['kernel'])),
        'bias_norm': float(np.linalg.norm(params[block][layer]['bias']))}
  blocks = {}
  for block in sorted(k for k in inter if k.startswith('mlpconv')):
    out = np.maximum(np.asarray(inter[block]['__call__'][0], np.float64), 0)
    blocks[block] = float(np.sqrt(np.mean(out ** 2)))
  maps = np.asarray(inter['class_maps'][0])
  logits = np.maximum(maps, 0).mean(axis=(1, 2))
  return {'layers': layers, 'block_out_rms': blocks,
          'class_map_positive': float(np.mean(maps > 0)),
          'logit_spread': float(np.mean(logits.max(-1) - logits.min(-1)))}


def probe_model(c: Any) -> models.NiN:
  """The config's model with the class maps' ReLU off, so that the class
  maps it sows are their pre-activations."""
  return model_factory.build_model(c.model).clone(final_relu=False)


def measure_starts(c: Any, author: Any, images: np.ndarray,
                   zoo_stds: dict[str, float]) -> dict[str, Any]:
  """profile() of the trained weights and of each init and seed."""
  model, probe = model_factory.build_model(c.model), probe_model(c)
  shape = images.shape[1:]
  starts = {'trained': [profile(probe, author, images)]}
  same = all(abs(s - models.FAITHFUL_STDDEV) < 1e-6 for s in zoo_stds.values())
  for seed in INIT_SEEDS:
    params = train.init_variables(model, shape, seed)['params']
    starts.setdefault('N(0, 0.05)', []).append(profile(probe, params, images))
    starts.setdefault('N(0, 0.01)', []).append(
        profile(probe, scale_kernels(params, 0.01 / models.FAITHFUL_STDDEV),
                images))
    if not same:
      names = gradient_diagnostic.caffe_layer_names(params)
      zoo = jax.tree_util.tree_map_with_path(
          lambda path, x: x * zoo_stds[names[(path[0].key, path[1].key)]] /
          models.FAITHFUL_STDDEV if path[-1].key == 'kernel' else x, params)
      starts.setdefault('zoo per-layer', []).append(
          profile(probe, zoo, images))
  return starts


# ------------------------------------------------------------------ training --

def trial_start(name: str) -> tuple[int, float, str]:
  """(seed, kernel scale, order) of a trial name."""
  if name.startswith('seed') and name[4:].isdigit():
    return int(name[4:]), 1.0, 'shuffled'
  if name.startswith('sequential') and (name[10:] or '0').isdigit():
    return int(name[10:] or 0), 1.0, 'sequential'
  if name.startswith('std'):
    try:
      std = float(name[3:])
    except ValueError:
      std = 0.0
    if std > 0:
      return 0, std / models.FAITHFUL_STDDEV, 'shuffled'
  raise ValueError(
      f'unknown trial {name!r}: seedS, sequential, sequentialS or stdX')


def batch_indices(order: str, seed: int, step: int, n: int) -> np.ndarray:
  """The images of batch `step`: the trainer's order for `seed`, or the
  file order wrapping around as Caffe's data layer reads it."""
  batch = finetune_author.BATCH
  if order == 'sequential':
    return (step * batch + np.arange(batch)) % n
  return batching.train_batch_indices(seed, step, batch, n)


def run_trial(name: str, trainer: train.Trainer, c: Any, split: Any,
              probe: models.NiN, images: np.ndarray, steps: int
              ) -> dict[str, Any]:
  """`steps` steps of the trainer's compiled step from trial `name`'s
  start: per-step loss, accuracy and logit spread, and the class maps'
  positive fraction every PROBE_EVERY steps."""
  seed, scale, order = trial_start(name)
  model = model_factory.build_model(c.model)
  params = scale_kernels(
      train.init_variables(model, images.shape[1:], seed)['params'], scale)
  like = trainer.state
  params = jax.device_put(params, jax.tree.map(lambda x: x.sharding,
                                               like.params))
  state = like.replace(
      params=params, opt_state=jax.device_put(
          trainer.tx.init(params),
          jax.tree.map(lambda x: x.sharding, like.opt_state)),
      rng=jax.device_put(jax.random.key_data(jax.random.key(seed)),
                         like.rng.sharding),
      step=jax.device_put(jnp.zeros((), jnp.int32), like.step.sharding))
  record: dict[str, Any] = {'seed': seed, 'kernel_scale': scale,
                            'order': order, 'loss': [], 'accuracy': [],
                            'logit_spread': [], 'probe_steps': [],
                            'class_map_positive': []}
  start = time.perf_counter()
  for step in range(steps + 1):
    if step % PROBE_EVERY == 0 or step == steps:
      host = jax.device_get(state.params)
      record['probe_steps'].append(step)
      record['class_map_positive'].append(
          profile(probe, host, images)['class_map_positive'])
    if step == steps:
      break
    batch = split.read(batch_indices(order, seed, step, len(split)))
    state, metrics = trainer.train_fn(
        state, jax.device_put(batch, trainer.data_sharding))
    for key in ('loss', 'accuracy', 'logit_spread'):
      record[key].append(float(metrics[key]))
  record['seconds'] = time.perf_counter() - start
  window = slice(-min(FINAL_WINDOW, steps), None)
  record['final_loss'] = float(np.mean(record['loss'][window]))
  record['final_spread'] = float(np.mean(record['logit_spread'][window]))
  record['final_accuracy'] = float(np.mean(record['accuracy'][window]))
  record['stalled'] = bool(
      abs(record['final_loss'] - math.log(10)) < 0.01 * math.log(10) and
      record['final_spread'] < 0.1)
  return record


# -------------------------------------------------------------------- figure --

def plot(result: dict[str, Any], path: str) -> None:
  """Four panels: pre-activation RMS and kernel norms per layer, the class
  maps at each start, and the trials' loss and class maps against step."""
  # pylint: disable=g-import-not-at-top
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  from PIL import Image
  starts = result['starts']
  fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
  x = np.arange(len(LAYERS))
  for label, runs in starts.items():
    style = dict(marker='o', label=label) if label != 'trained' else dict(
        marker='s', color='black', lw=2, label='trained (the author\'s)')
    for ax, key in ((axes[0, 0], 'pre_rms'), (axes[0, 1], 'kernel_norm')):
      ax.plot(x, [np.mean([r['layers'][n][key] for r in runs])
                  for n in LAYERS], **style)
  for ax, title in ((axes[0, 0], 'pre-activation RMS (500 train images)'),
                    (axes[0, 1], 'kernel L2 norm')):
    ax.set_yscale('log')
    ax.set_xticks(x, LAYERS, rotation=45)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  ax = axes[1, 0]
  labels = list(starts)
  positive = [np.mean([r['class_map_positive'] for r in starts[k]])
              for k in labels]
  spread = [np.mean([r['logit_spread'] for r in starts[k]]) for k in labels]
  bars = ax.bar(np.arange(len(labels)) - 0.2, positive, 0.4,
                label='class-map pre-activations > 0 (fraction)')
  ax.bar_label(bars, fmt='%.3f', fontsize=8)
  ax2 = ax.twinx()
  ax2.bar(np.arange(len(labels)) + 0.2, spread, 0.4, color='tab:orange',
          label='logit spread (max - min)')
  ax2.set_yscale('log')
  ax.set_xticks(np.arange(len(labels)), labels)
  ax.set_ylim(0, 1.25)
  ax2.set_ylim(top=1e5)
  ax.set_title('the class maps at each start')
  ax.legend(loc='upper left', fontsize=8)
  ax2.legend(loc='upper right', fontsize=8)
  ax = axes[1, 1]
  fraction = ax.twinx()
  for name, trial in result.get('trials', {}).items():
    loss = np.asarray(trial['loss'])
    window = min(10, len(loss))
    smooth = np.convolve(loss, np.ones(window) / window, mode='valid')
    line, = ax.plot(np.arange(window, len(loss) + 1), smooth,
                    label=f'{name}: loss')
    fraction.plot(trial['probe_steps'], trial['class_map_positive'], ':o',
                  ms=3, color=line.get_color(),
                  label=f'{name}: class maps > 0')
  ax.axhline(math.log(10), color='gray', lw=0.8)
  ax.set_xlabel('step (batch 128, learning rate 0.1)')
  ax.set_ylabel('training loss (10-step mean); gray: ln(10)')
  fraction.set_ylabel('class-map pre-activations > 0 (dotted)')
  fraction.set_ylim(0, 1)
  ax.set_title('from N(0, 0.05) at learning rate 0.1')
  ax.grid(alpha=0.3)
  if result.get('trials'):
    ax.legend(fontsize=8, loc='lower left')
    fraction.legend(fontsize=8, loc='upper right')
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  Image.open(path).convert('RGB').quantize(256).save(path, optimize=True)


# ---------------------------------------------------------------------- main --

def main() -> None:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', default='runs/author_cifar10')
  parser.add_argument('--caffemodel', default=str(
      finetune_author.DATA / 'caffe' / 'cifar10_nin.caffemodel'))
  parser.add_argument('--npz', default=str(
      finetune_author.DATA / 'cifar10' / 'cifar10.npz'))
  parser.add_argument('--out', required=True, help='the JSON record')
  parser.add_argument('--figure', default='')
  parser.add_argument('--trials', default='',
                      help=f'comma-separated, from {TRIALS} (seedS, sequentialS, stdX)')
  parser.add_argument('--steps', type=int, default=200)
  parser.add_argument('--plot_only', action='store_true')
  args = parser.parse_args()
  out = pathlib.Path(args.out)
  if args.plot_only:
    if not out.exists() or not args.figure:
      parser.error('--plot_only needs an existing --out and a --figure')
    plot(json.loads(out.read_text()), args.figure)
    return
  trials = [t for t in args.trials.split(',') if t]
  for name in trials:
    try:
      trial_start(name)
    except ValueError as e:
      parser.error(f'--trials: {e}')
  if args.steps < 1:
    parser.error(f'--steps={args.steps}: must be positive')
  for path, flag in ((args.caffemodel, '--caffemodel'), (args.npz, '--npz')):
    if not pathlib.Path(path).exists():
      parser.error(f'{flag}={path}: no such file')
  runtime.configure_cpu((finetune_author.BATCH,))
  logging.set_verbosity(logging.ERROR)
  logging.get_absl_handler().addFilter(runtime.QuietLibraries())
  if not checkpoints.checkpoint_steps(args.workdir):
    caffe_zoo.import_caffemodel(args.caffemodel, 'cifar10', args.workdir,
                                dataset=f'npz:{args.npz}')
  result = json.loads(out.read_text()) if out.exists() else {}
  result.update(provenance.header())
  fields = zoo_layer_fields(args.caffemodel)
  result['zoo_fields'] = fields
  c = finetune_author.run_config(args.npz, '', 1.0,
                                 {'optim.learning_rate': LEARNING_RATE})
  dataset = input_pipeline.load_dataset(
      c.data, datasets.lookup(c.data.dataset), models.PRESETS[c.model.preset].num_classes,
      config_lib.streamed_image_size(c))
  images = dataset.train.images[:PROBE_IMAGES]
  author = checkpoints.read_weights(
      args.workdir, max(checkpoints.checkpoint_steps(args.workdir)))['params']
  result['starts'] = measure_starts(c, author, images,
                                    zoo_init_stddevs(fields))
  print(json.dumps({k: result[k] for k in ('starts',)}), flush=True)
  out.write_text(json.dumps(result, indent=1))
  todo = [t for t in trials if t not in result.get('trials', {})]
  if todo:
    trainer = train.create_trainer(c, dataset.image_shape, len(dataset.train))
    for name in todo:
      record = run_trial(name, trainer, c, dataset.train, probe_model(c),
                         images, args.steps)
      result.setdefault('trials', {})[name] = record
      out.write_text(json.dumps(result, indent=1))
      print(json.dumps({'trial': name, **{k: v for k, v in record.items()
                                          if not isinstance(v, list)}}),
            flush=True)
  if args.figure:
    plot(result, args.figure)


if __name__ == '__main__':
  sys.exit(main())
