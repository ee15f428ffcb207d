r"""The paper's tables, rerun: every row trained, then ours beside the paper's.

  python -m experiments.paper_tables --table=heads --workdir=runs/tables \
      --steps=2000 --data=../shared/data
  python -m experiments.paper_tables --table=heads --workdir=/tmp/tables \
      --base=configs/quickstart.py --steps=60

Tables (the paper: Lin, Chen & Yan, Network in Network, ICLR 2014,
arXiv:1312.4400v3): `cifar10` (Table 1: without and with augmentation),
`cifar100` (Table 2), `svhn` (Table 3), `mnist` (Table 4), `heads` (Table 5:
global average pooling against a fully connected head, with and without
dropout, on CIFAR-10) and `dropout` (Figure 3, Section 4.2: dropout between the
mlpconv layers or none, on CIFAR-10).

Each row is its own training, `python -m nin_jax.main --config=...
--workdir=WORKDIR/TABLE/ROW --config.GROUP.FIELD=VALUE ...`, run one after the
other from the repository root; the command is recorded, so a row can be rerun
by hand. A row whose metrics.jsonl holds an evaluation at its final step is
finished and is not run again (nin_jax.main would only evaluate it once
more); an unfinished one is relaunched and resumes from
its newest checkpoint. A row whose config (config.json) is that of a finished
row of another table in the same WORKDIR (`dropout/dropout` and `heads/gap`
are the same run) is not trained again: its folder becomes a link to that row's
and the table says so. The dataset tables run each row's own config; with
`--base=CONFIG[:VARIANT]` they run that config instead (`cifar10` then varies
only data.augment). `heads` varies only model.head and model.head_dropout_rate,
`dropout` only model.dropout_rate, on `configs/cifar10.py:faithful` (the
author's model) at learning rate 0.05 (half the author's: at 0.1 it stalls at
ln(10) here) unless --base names another config.

`--steps=N` trains N steps (evaluating and checkpointing every N/5);
`--epochs=E` trains E epochs; neither: the configs' own lengths. A TFDS
dataset is read from `--data=DIR` (default $NIN_JAX_DATA_DIR) when DIR holds
its Keras-layout npz (`DIR/cifar10.npz` or `DIR/cifar10/cifar10.npz`; likewise
mnist, cifar100, svhn), else from a prepared TFDS copy; a row with neither is
reported in one line and left "not run" (an SVHN npz has no 'extra' split: that
row trains on train alone, and the table says so). Any other `--config.GROUP.FIELD=VALUE`
is passed to every row (e.g. `--config.data.data_dir=DIR`).

Writes WORKDIR/TABLE.json (test errors in percent; the commit, date and
machine of experiments/provenance.py), WORKDIR/TABLE.md (the table) and
WORKDIR/TABLE.png (test error against epoch, one line per row that ran; needs
matplotlib).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import pathlib
import shlex
import subprocess
import sys
import time
from typing import Any, Optional, Sequence

import ml_collections

from absl import logging

from experiments import common
from experiments import paper_table_defs as defs
from experiments import paper_table_report as report
from nin_jax import datasets
from nin_jax import errors
from nin_jax import tfds_source
from nin_jax import train

REPO = common.REPO

WALL_FILE = 'wall_seconds.json'  # In WORKDIR/TABLE: seconds per row, summed.
DATA_ENV = 'NIN_JAX_DATA_DIR'
# Names a dataset's npz may have in --data (datasets.py reads both for SVHN).
NPZ_NAMES = {'svhn_cropped': ('svhn', 'svhn_cropped')}


def config_path(spec: str) -> str:
  """`spec` (PATH[:VARIANT], relative to the working directory) as the row
  commands spell it: relative to the repository root when inside it."""
  path, sep, variant = spec.partition('.py:')
  path = os.path.abspath(path if path.endswith('.py') else path + '.py')
  if pathlib.Path(path).is_relative_to(REPO):
    path = os.path.relpath(path, REPO)
  return path + (f':{variant}' if sep else '')


def find_npz(data_dir: Optional[str], key: str) -> Optional[str]:
  """DIR/NAME.npz or DIR/NAME/NAME.npz for dataset `key`, if one exists."""
  if not data_dir:
    return None
  for name in NPZ_NAMES.get(key, (key,)):
    for path in (pathlib.Path(data_dir) / f'{name}.npz',
                 pathlib.Path(data_dir) / name / f'{name}.npz'):
      if path.is_file():
        return str(path.resolve())
  return None


def budget_overrides(config: ml_collections.ConfigDict, steps: Optional[int],
                     epochs: Optional[float]) -> dict[str, Any]:
  """The length fields --steps or --epochs set (evaluations 5 times a run)."""
  if steps is not None:
    every = max(1, steps // 5)
    return {'train.num_train_steps': steps, 'train.eval_every_steps': every,
            'train.checkpoint_every_steps': every}
  if epochs is not None:
    fields = {'train.num_epochs': float(epochs)}
    if config.train.num_train_steps != -1:
      fields['train.num_train_steps'] = -1  # Else it would win over epochs.
    return fields
  return {}


def tfds_prepared(name: str, data_dir: Optional[str]) -> bool:
  """Whether TFDS holds a prepared copy nin-jax reads (TFDS's logs muted)."""
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    tfds_source.open_builder(name, data_dir)
    return True
  except errors.DataError:
    return False
  finally:
    logging.set_verbosity(verbosity)


def data_overrides(config: ml_collections.ConfigDict, data_dir: Optional[str],
                   prepared: dict[tuple[str, Optional[str]], bool]
                   ) -> tuple[dict[str, Any], Optional[str], Optional[str]]:
  """(fields, skip reason, note) for the row's dataset: a TFDS dataset comes
  from DIR's npz when there is one, else must be a prepared TFDS copy
  (`prepared` caches the answers for the rows of one table)."""
  spec = datasets.lookup(config.data.dataset)
  if spec.source != 'tfds':
    return {}, None, None
  npz = find_npz(data_dir, spec.key)
  if npz is not None:
    fields = {'data.dataset': f'npz:{npz}'}
    note = None
    if config.data.use_extra_split:  # An npz holds train and test only.
      fields['data.use_extra_split'] = False
      note = (f'{os.path.basename(npz)} has no extra split: trained on '
              'train only')
    return fields, None, note
  where = (spec.name, config.data.data_dir or None)
  if where not in prepared:
    prepared[where] = tfds_prepared(*where)
  if not prepared[where]:
    name = NPZ_NAMES.get(spec.key, (spec.key,))[0]
    return {}, (f'{config.data.dataset} is not available: give --data=DIR '
                f'with {name}.npz (or ${DATA_ENV}), or a prepared TFDS copy '
                f'via --config.data.data_dir=DIR'), None
  return {}, None, None


def build_rows(table: defs.Table, base: Optional[str], steps: Optional[int],
               epochs: Optional[float], data_dir: Optional[str],
               extra: Sequence[tuple[str, str]], workdir: str) -> list[defs.Row]:
  """Every row of `table` with its config and --config overrides: the
  fields the table varies (with a base config), the budget's, the data's,
  then `extra` (field, value as typed), which every row gets."""
  own = dict(table.base_fields) if base is None else {}
  base = base or table.base
  rows, prepared = [], {}
  for variant in table.variants:
    config_spec = base or variant.config
    varied = {**own, **dict(variant.fields)} if base else {}
    config = common.load_config(config_spec, {**varied, **dict(extra)})
    fields, skip, note = data_overrides(config, data_dir, prepared)
    row = defs.Row(variant, config_spec,
              {**varied, **budget_overrides(config, steps, epochs), **fields,
               **dict(extra)},
              os.path.join(workdir, table.name, variant.key), skip, note)
    row_config(row)  # Every override names a field of the right type.
    rows.append(row)
  return rows


def row_config(row: defs.Row) -> ml_collections.ConfigDict:
  """The config the row's command trains."""
  return common.load_config(row.config, row.overrides)


def final_step(config: ml_collections.ConfigDict,
               records: list[dict[str, Any]]) -> Optional[int]:
  """The step the run ends at; for a run given in epochs, known once its
  train records give the steps per epoch (None before)."""
  if config.train.num_train_steps > 0:
    return config.train.num_train_steps
  per_epoch = common.steps_per_epoch(records)
  if per_epoch is None:
    return None
  return train.num_train_steps(config,
                               round(per_epoch) * config.train.batch_size)


def read_result(row: defs.Row) -> bool:
  """Fills in the row's error, steps and epochs from its metrics.jsonl if it
  holds an evaluation at the final step; whether it does (the row is done)."""
  train_records, evals = common.read_metrics(row.workdir)
  last = final_step(row_config(row), train_records)
  if last is None:
    return False
  beyond = [int(r['step']) for r in train_records + evals
            if int(r['step']) > last]
  if beyond:
    row.skip = (f'{row.workdir} holds a longer run (step {max(beyond)} > '
                f'{last}); use another --workdir')
    return True
  at_end = [r for r in evals if int(r['step']) == last]
  if not at_end:
    return False
  per_epoch = common.steps_per_epoch(train_records)
  row.error = 100.0 * float(at_end[0]['error'])
  row.steps = last
  row.epochs = last / per_epoch if per_epoch else None
  return True


def run_row(row: defs.Row) -> tuple[int, float, str]:
  """Trains the row (its output streamed through); (exit status, wall
  seconds, the last `nin_jax: error:` line or the last line)."""
  argv = row.command(sys.executable)
  start = time.time()
  tail = collections.deque(maxlen=50)
  with subprocess.Popen(argv, cwd=REPO, stderr=subprocess.PIPE, text=True,
                        bufsize=1) as proc:
    try:
      for line in proc.stderr:
        sys.stderr.write(line)
        tail.append(line.strip())
    finally:
      status = proc.wait()
  lines = [l for l in tail if l]
  errors_ = [l for l in lines if l.startswith('nin_jax: error:')]
  last = errors_[-1] if errors_ else (lines[-1] if lines else '')
  return status, time.time() - start, last


def _wall_times(table_dir: pathlib.Path) -> dict[str, float]:
  path = table_dir / WALL_FILE
  return json.loads(path.read_text()) if path.exists() else {}


def _add_wall_time(table_dir: pathlib.Path, key: str, seconds: float) -> None:
  """Adds a run's seconds to the row's total (a resumed row's runs add up)."""
  times = _wall_times(table_dir)
  times[key] = times.get(key, 0.0) + seconds
  table_dir.mkdir(parents=True, exist_ok=True)
  (table_dir / WALL_FILE).write_text(json.dumps(times, indent=2) + '\n')


def same_run(row: defs.Row, workdir: str) -> Optional[defs.Row]:
  """A finished row of another table under `workdir` that trained the row's
  config (its config.json is the row's), as a Row reading that folder; None
  if there is none."""
  want = json.loads(row_config(row).to_json())
  here = pathlib.Path(row.workdir).absolute()
  for saved in sorted(pathlib.Path(workdir).glob('*/*/config.json')):
    folder = saved.parent
    if (folder.is_symlink() or folder.parent == here.parent
        or json.loads(saved.read_text()) != want):
      continue
    other = dataclasses.replace(row, workdir=str(folder), skip=None)
    if read_result(other) and other.skip is None:
      return other
  return None


def reuse(row: defs.Row, other: defs.Row, table_dir: pathlib.Path) -> None:
  """Makes the row's folder a link to `other`'s, which trained the same
  config, and gives the row that run's results and wall time."""
  source = pathlib.Path(other.workdir)
  table_dir.mkdir(parents=True, exist_ok=True)
  os.symlink(os.path.relpath(source, table_dir), row.workdir,
             target_is_directory=True)
  seconds = _wall_times(source.parent).get(source.name)
  if seconds is not None:
    _add_wall_time(table_dir, row.variant.key, seconds)
  read_result(row)
  _note_reuse(row)


def _note_reuse(row: defs.Row) -> None:
  """Adds to the row's note which row's run it shows."""
  source = pathlib.Path(row.workdir).resolve()
  reused = f'the run of {source.parent.name}/{source.name}, the same config'
  row.note = f'{row.note}; {reused}' if row.note else reused


def run_table(table: defs.Table, rows: list[defs.Row], workdir: str) -> None:
  """Runs every row that is neither skipped nor finished, one at a time."""
  table_dir = pathlib.Path(workdir) / table.name
  for row in rows:
    label = f'{table.name}/{row.variant.key}'
    finished = row.skip is None and read_result(row)
    if row.skip is not None:
      print(f'paper_tables: {label}: not run: {row.skip}', flush=True)
      continue
    if finished:
      if pathlib.Path(row.workdir).is_symlink():
        _note_reuse(row)
      print(f'paper_tables: {label}: finished before, not run again',
            flush=True)
      continue
    other = None if os.path.lexists(row.workdir) else same_run(row, workdir)
    if other is not None:
      reuse(row, other, table_dir)
      print(f'paper_tables: {label}: not run again: {row.note}', flush=True)
      continue
    print(f'paper_tables: {label}: {shlex.join(row.command())}', flush=True)
    status, seconds, last = 0, 0.0, ''
    start = time.time()
    try:
      status, seconds, last = run_row(row)
    finally:
      _add_wall_time(table_dir, row.variant.key, seconds or time.time() - start)
    if status != 0:
      row.skip = f'the training exited with status {status}: {last}'
      print(f'paper_tables: {label}: not run: {row.skip}', flush=True)
    elif not read_result(row):
      row.skip = 'the training ended without an evaluation at its final step'
  times = _wall_times(table_dir)
  for row in rows:
    row.wall_seconds = times.get(row.variant.key)


def _positive_int(text: str) -> int:
  value = int(text)
  if value <= 0:
    raise argparse.ArgumentTypeError(f'must be positive, got {text}')
  return value


def _positive_float(text: str) -> float:
  value = float(text)
  if not (value > 0 and math.isfinite(value)):
    raise argparse.ArgumentTypeError(f'must be positive, got {text}')
  return value


def parse_args(argv: Optional[list[str]]
               ) -> tuple[argparse.Namespace, list[tuple[str, str]]]:
  """The flags, and the --config.FIELD=VALUE overrides for every row."""
  parser = common.ArgumentParser('paper_tables',
                                 description=__doc__.split('\n')[0])
  parser.add_argument('--table', required=True, choices=sorted(defs.TABLES))
  parser.add_argument('--workdir', required=True,
                      help='rows train in WORKDIR/TABLE/ROW; the table is '
                      'written to WORKDIR/TABLE.{json,md,png}')
  length = parser.add_mutually_exclusive_group()
  length.add_argument('--steps', type=_positive_int,
                      help='train every row this many steps')
  length.add_argument('--epochs', type=_positive_float,
                      help='train every row this many epochs')
  parser.add_argument('--base', help='CONFIG[:VARIANT] to run the rows on, '
                      f'changing only what the table varies (heads, dropout: '
                      f'default {defs.AUTHOR_MODEL} with learning rate 0.05)')
  parser.add_argument('--data', default=os.environ.get(DATA_ENV),
                      help='folder with the Keras-layout npz files (NAME.npz '
                      f'or NAME/NAME.npz); default ${DATA_ENV}')
  args, extra = common.parse_args(parser, argv)
  if args.data is not None and not os.path.isdir(args.data):
    parser.error(f'--data={args.data}: not a directory')
  return args, extra


def main(argv: Optional[list[str]] = None) -> None:
  args, extra = parse_args(argv)
  table = defs.TABLES[args.table]
  workdir = os.path.abspath(args.workdir)  # Orbax wants absolute paths.
  base = None
  if args.base is not None:
    base = config_path(args.base)
    try:
      common.load_config(base)
    except common.UserError as e:
      common.fail('paper_tables',
                  f'--base={args.base}: the config does not load ({e})')
  try:
    rows = build_rows(table, base, args.steps, args.epochs, args.data, extra,
                      workdir)
  except (common.UserError, errors.ConfigError) as e:
    common.fail('paper_tables', str(e))
  run_table(table, rows, workdir)
  budget = report.budget_text(args.steps, args.epochs)
  out = pathlib.Path(workdir)
  out.mkdir(parents=True, exist_ok=True)
  (out / f'{table.name}.json').write_text(json.dumps(
      report.summary(table, rows, base, args.steps, args.epochs),
      indent=2) + '\n')
  (out / f'{table.name}.md').write_text(
      report.markdown(table, rows, base, budget))
  wrote_png = report.plot(
      table, rows, report.config_text(table, base) or 'each row its own config',
      budget, str(out / f'{table.name}.png'))
  print(f'paper_tables: wrote {out / table.name}.json, .md'
        f'{", .png" if wrote_png else " (no row has evaluated: no .png)"}',
        flush=True)


if __name__ == '__main__':
  main()
