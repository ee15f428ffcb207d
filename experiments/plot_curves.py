r"""Training curves of one or more workdirs: loss and test error, per epoch
and per second of training.

  python -m experiments.plot_curves runs/quickstart runs/other --out=curves.png

A 2x2 figure: the training loss (left) and the evaluation error (right)
against the epoch (top) and against time (bottom), one line per
workdir, labelled from its config (`label`). Everything comes from
WORKDIR/metrics.jsonl (`common.read_metrics`): the 'train' records
(the means of each log window: step, epoch, loss, ...) and the evaluation
records (split 'test', or 'validation' for a run that held one out: step,
error, ...; they have no epoch, which is step / steps per epoch, the ratio
the train records give). Time is the training time the train records carry
(`train_seconds`: the first, compiling step included, evaluations,
checkpoints and a resumed run's downtime not), interpolated at each
evaluation's step. Workdirs written before `train_seconds` existed fall back
to wall time: each record's `time` minus that of the workdir's first record.
Needs matplotlib (`pip install -e '.[plot]'`).
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import types
from typing import Any, Mapping, NamedTuple, Optional, Sequence

# pylint: disable=g-import-not-at-top,wrong-import-position
import matplotlib
matplotlib.use('Agg')
from matplotlib import figure as mpl_figure
import matplotlib.pyplot as plt
import ml_collections
import numpy as np

from experiments import common
from nin_jax import cli
from nin_jax import inference

DPI = 100
# (seconds per unit, name), the largest unit that keeps 2 or more of them.
TIME_UNITS = ((3600.0, 'h'), (60.0, 'min'), (1.0, 's'))
MAX_LABEL_FIELDS = 3  # Config fields a legend entry names at most.
# Fields that do not change what a run learns, never named in a legend.
BOOKKEEPING = frozenset((
    'data.data_dir', 'data.cache_dir', 'data.data_workers',
    'train.eval_batch_size', 'train.log_every_steps', 'train.eval_every_steps',
    'train.checkpoint_every_steps', 'train.keep_checkpoints',
    'train.profile_steps', 'train.skip_nonfinite_steps', 'runtime.cpu_devices',
    'model.conv_impl'))
GROUP_ORDER = ('model', 'optim', 'data', 'train')  # Legends name these first.


def label(config: ml_collections.ConfigDict) -> str:
  """A run's legend entry from its config: preset, dataset, init, BatchNorm,
  and the head when it is not GAP (e.g. 'quickstart, digits, modern + BN')."""
  dataset = config.data.dataset.split(':', 1)[-1]
  dataset = pathlib.PurePath(dataset).stem if '/' in dataset else dataset
  model = config.model
  text = (f'{model.preset}, {dataset}, {model.weight_init}'
          f'{" + BN" if model.batch_norm else ""}')
  return text if model.head == 'gap' else f'{text}, {model.head} head'


class Run(NamedTuple):
  """One workdir's curves. `train`: {'epoch', 'seconds', 'loss'} arrays, one
  entry per log window; `eval`: {'epoch', 'seconds', 'error'} arrays, one
  per evaluation of split `eval_split`."""
  workdir: str
  label: str
  train: dict[str, np.ndarray]
  eval: dict[str, np.ndarray]
  eval_split: str
  clock: str  # What 'seconds' measures.
  # The config, flat: {'optim.learning_rate': 0.1, ...}.
  fields: Mapping[str, Any] = types.MappingProxyType({})


def read_run(workdir: str) -> Run:
  """The curves of `workdir`; WorkdirError if it is not a workdir or has no
  train records in metrics.jsonl."""
  local = pathlib.Path(workdir) if '://' not in workdir else None
  if local and not local.is_dir():
    raise inference.WorkdirError(f'{workdir} is not a directory, so not a '
                                 f'nin-jax workdir.')
  if local and not (local / 'config.json').exists():
    raise inference.WorkdirError(f'{workdir} holds no config.json: not a '
                                 f'nin-jax workdir.')
  config = inference.read_config(workdir)
  train, evals = common.read_metrics(workdir)
  if not train:
    raise inference.WorkdirError(
        f'{workdir}/metrics.jsonl is missing or has no train records: the '
        f'run has not logged anything yet.')
  steps_per_epoch = common.steps_per_epoch(train)
  column = lambda rs, key: np.array([float(r[key]) for r in rs])
  if all('train_seconds' in r for r in train):
    train_seconds = column(train, 'train_seconds')
    eval_seconds = np.interp(column(evals, 'step'), column(train, 'step'),
                             train_seconds)
    clock = 'training time'
  else:
    start = min(float(r['time']) for r in train + evals)
    train_seconds = column(train, 'time') - start
    eval_seconds = column(evals, 'time') - start
    clock = 'wall time since the first logged record'
  return Run(
      workdir, label(config),
      {'epoch': column(train, 'epoch'), 'seconds': train_seconds,
       'loss': column(train, 'loss')},
      {'epoch': column(evals, 'step') / steps_per_epoch,
       'seconds': eval_seconds, 'error': column(evals, 'error')},
      '/'.join(sorted({r['split'] for r in evals})) or 'test', clock,
      _flat(config.to_dict()))


def _flat(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flat(value, f'{prefix}{key}.'))
    else:
      flat[prefix + key] = value
  return flat


def _time_unit(runs: Sequence[Run]) -> tuple[float, str]:
  longest = max([0.0] + [float(s.max()) for run in runs
                         for s in (run.train['seconds'], run.eval['seconds'])
                         if s.size])
  return next((u for u in TIME_UNITS if longest >= 2 * u[0]), TIME_UNITS[-1])


def _field_order(key: str) -> tuple[int, str]:
  group = key.split('.', 1)[0]
  return (GROUP_ORDER.index(group) if group in GROUP_ORDER
          else len(GROUP_ORDER), key)


def _legend_labels(runs: Sequence[Run]) -> list[str]:
  """Each run's label; where two are equal, the config fields that tell the
  runs with that label apart (`dropout_rate=0.0`), else the workdir's name."""
  groups = collections.defaultdict(list)
  for run in runs:
    groups[run.label].append(run)
  labels = []
  for run in runs:
    group = groups[run.label]
    if len(group) == 1:
      labels.append(run.label)
      continue
    keys = sorted((k for k in {k for r in group for k in r.fields}
                   if k not in BOOKKEEPING
                   and len({repr(r.fields.get(k)) for r in group}) > 1),
                  key=_field_order)
    shown = [f'{k.rsplit(".", 1)[-1]}={run.fields.get(k)}'
             for k in keys[:MAX_LABEL_FIELDS]]
    labels.append(f'{run.label} ({", ".join(shown)})' if shown else
                  f'{run.label} ({pathlib.PurePath(run.workdir).name})')
  return labels


def plot(runs: Sequence[Run]) -> mpl_figure.Figure:
  """The 2x2 figure: rows epoch / time, columns train loss / eval error
  (%); one line per run, one legend below."""
  unit_seconds, unit = _time_unit(runs)
  clock = ' or '.join(sorted({run.clock for run in runs}))
  splits = sorted({run.eval_split for run in runs})
  fig, axes = plt.subplots(2, 2, figsize=(11, 8), layout='constrained')
  for run, text in zip(runs, _legend_labels(runs)):
    color = None
    for row, x in enumerate(('epoch', 'seconds')):
      scale = unit_seconds if x == 'seconds' else 1.0
      line, = axes[row, 0].plot(run.train[x] / scale, run.train['loss'],
                                color=color, label=text)
      color = line.get_color()
      axes[row, 1].plot(run.eval[x] / scale, 100 * run.eval['error'],
                        color=color, marker='.', label=text)
  for row, xlabel in enumerate(
      ('epoch', f'{clock} ({unit})')):
    axes[row, 0].set_ylabel('train loss (log scale)')
    axes[row, 0].set_yscale('log')
    axes[row, 1].set_ylabel(f'{"/".join(splits)} error (%)')
    for ax in axes[row]:
      ax.set_xlabel(xlabel)
      ax.grid(True, alpha=0.3)
  handles, texts = axes[0, 0].get_legend_handles_labels()
  fig.legend(handles, texts, loc='outside lower center',
             ncols=min(len(runs), 2), fontsize=9)
  return fig


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('workdirs', nargs='+', metavar='WORKDIR',
                      help='training workdirs (with metrics.jsonl)')
  parser.add_argument('--out', required=True, help='the PNG to write')
  return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
  args = parse_args(argv)
  with cli.user_errors():  # A user's mistake: one line, exit status 2.
    runs = [read_run(workdir) for workdir in args.workdirs]
  fig = plot(runs)
  fig.savefig(args.out, dpi=DPI)
  plt.close(fig)
  print(f'plot_curves: wrote {args.out}', flush=True)


if __name__ == '__main__':
  main()
