r"""The time-to-accuracy race: one config, trained by nin-jax and by PyTorch.

  python -m experiments.race --framework=both --minutes=55 --out=runs/race
  python -m experiments.race --framework=jax --minutes=1 --out=/tmp/race \
      --config=configs/quickstart.py --data=''

Each framework trains `--config` (default configs/cifar10_fast.py) for a
budget of `--minutes` of training, in processes of its own, one framework
after the other (never both at once):
  1. calibration: a process times train steps on random data (nin-jax: the
     trainer's compiled step, as experiments/benchmark.py; PyTorch: the peer's
     step, experiments/torch_train.py) and the step count is planned as
     minutes x 60 / seconds per step, so the schedule (one-cycle in the fast
     config) ends with the budget;
  2. training: nin-jax as a user runs it (`python -m nin_jax.main`, workdir
     OUT/jax) and the PyTorch peer (experiments/torch_train.py, the same
     data, batches, augmentation, model, loss, optimizer and schedule), each
     evaluating the whole test set after every epoch and at the end.
Training seconds count the train steps (nin-jax's first, compiling one
included) and the making of batches; evaluations and checkpoints are not
counted. The plan of each framework is kept in OUT/plan_<framework>.json, so an
interrupted run resumes with the same step count; OUT/race_<framework>.json
({"config", "plan", "curve": [{"epoch", "step", "train_seconds",
"test_accuracy", "train_loss"}, ...], ...}) marks a framework as done (delete
it to race again). OUT/race.png draws test accuracy against training seconds
for every race_*.json in OUT (needs matplotlib), and a table is printed with
each framework's time to `--target` accuracy.

`--data` (default: $NIN_JAX_DATA_DIR/cifar10/cifar10.npz, else
../shared/data/cifar10/cifar10.npz beside the repository, when the config
trains CIFAR-10 and that file exists): an .npz path or any
config.data.dataset value; '' keeps the config's own dataset.
`--config.GROUP.FIELD=VALUE` changes the config for both frameworks.

The calibrations and the PyTorch training run as functions of this module in
processes of their own (`python -m experiments.worker`, common.py).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Any, Optional

import ml_collections
import numpy as np

from experiments import common
from experiments import provenance
from experiments import race_plan
from nin_jax import config_lib

REPO = common.REPO

FRAMEWORKS = ('jax', 'torch')
NAMES = {'jax': 'nin-jax', 'torch': 'PyTorch (eager)'}
DEFAULT_CONFIG = 'configs/cifar10_fast.py'
# The PyTorch peer reached 85.7% after 10 epochs.
DEFAULT_TARGET = 0.857


def default_data(c: ml_collections.ConfigDict) -> str:
  """The shared CIFAR-10 npz when the config trains CIFAR-10 and it exists."""
  if c.data.dataset != 'tfds:cifar10':
    return ''
  root = os.environ.get('NIN_JAX_DATA_DIR', str(REPO.parent / 'shared' /
                                                'data'))
  path = pathlib.Path(root) / 'cifar10' / 'cifar10.npz'
  return str(path.resolve()) if path.is_file() else ''


def dataset_value(data: str) -> str:
  """--data as a config.data.dataset value ('' = keep the config's)."""
  if data.endswith('.npz') and ':' not in data:
    return f'npz:{os.path.abspath(data)}'
  return data


def overrides(args: argparse.Namespace) -> list[tuple[str, str]]:
  """(field, value) of --data and every --config.GROUP.FIELD=VALUE, in order."""
  data = [('data.dataset', dataset_value(args.data))] if args.data else []
  return data + args.overrides


def build_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
  """--config with --data and the overrides applied; UserError for a field
  the config lacks (named with its nearest names) or a wrong value."""
  return common.load_config(args.config, overrides(args))


def jax_command(args: argparse.Namespace, workdir: pathlib.Path,
                steps: int) -> list[str]:
  """The nin_jax.main command line of the nin-jax side."""
  return [sys.executable, '-m', 'nin_jax.main', f'--config={args.config}',
          f'--workdir={workdir}',
          *(common.override(f, v) for f, v in overrides(args)),
          common.override('train.num_train_steps', steps)]


def calibrate_jax(config: str, fields: list[tuple[str, str]],
                  steps: int) -> dict[str, Any]:
  """{'seconds_per_step'}: the median of `steps` of the trainer's own train
  step (as experiments/benchmark.py) on random data, after 3 untimed."""
  from experiments import benchmark
  from nin_jax import runtime
  c = common.load_config(config, fields)
  runtime.configure_cpu_for(c)
  runner = benchmark.JaxRunner(c)
  benchmark.time_steps(runner.train_step, 3)
  return {'seconds_per_step': float(np.median(
      benchmark.time_steps(runner.train_step, steps)))}


def calibrate_torch(config: str, fields: list[tuple[str, str]],
                    steps: int) -> dict[str, Any]:
  """{'seconds_per_step', 'threads', 'torch'}: the PyTorch peer's step."""
  import torch
  from experiments import torch_train
  c = common.load_config(config, fields)
  return {'seconds_per_step': torch_train.seconds_per_step(c, steps),
          'threads': torch.get_num_threads(), 'torch': torch.__version__}


def train_torch(config: str, fields: list[tuple[str, str]], steps: int,
                out: str) -> None:
  """Trains the PyTorch peer `steps` steps, each evaluation appended to
  OUT/torch/curve.jsonl and reported on stderr."""
  from experiments import torch_train
  c = common.load_config(config, fields)
  folder = pathlib.Path(out) / 'torch'
  folder.mkdir(parents=True, exist_ok=True)
  log = folder / 'curve.jsonl'
  log.write_text('')

  def on_eval(record: dict) -> None:
    with log.open('a') as f:
      f.write(json.dumps(record) + '\n')
    print(f'torch: epoch {record["epoch"]:.2f} step {record["step"]} '
          f'{record["train_seconds"]:.0f} s test accuracy '
          f'{record["test_accuracy"]:.4f}', file=sys.stderr, flush=True)

  torch_train.train_and_evaluate(c, steps, on_eval)


CALIBRATIONS = {'jax': calibrate_jax, 'torch': calibrate_torch}


def calibrate(args: argparse.Namespace, framework: str) -> dict[str, Any]:
  """Seconds per train step of `framework`, measured in a process of its own."""
  try:
    return common.call_in_process(
        CALIBRATIONS[framework], config=args.config, fields=overrides(args),
        steps=args.calibration_steps)
  except common.WorkerError as e:
    raise RuntimeError(f'{framework} calibration exited with {e.status}: '
                       f'{e.stderr[-800:]}') from e


def plan(minutes: float, seconds_per_step: float) -> int:
  """Train steps that fit in `minutes` at `seconds_per_step` (at least 1)."""
  return max(1, int(minutes * 60 / seconds_per_step))


def jax_curve(workdir: pathlib.Path) -> list[dict[str, Any]]:
  """The race records of a nin-jax workdir: each evaluation, with the
  training seconds and mean train loss logged up to its step."""
  train, evals = common.read_metrics(str(workdir))
  if not train:
    return []
  steps_per_epoch = common.steps_per_epoch(train)
  t_steps = np.array([r['step'] for r in train], float)
  seconds = np.array([r.get('train_seconds', np.nan) for r in train])
  curve, last_step = [], 0
  for e in evals:
    window = [r for r in train if last_step < r['step'] <= e['step']]
    curve.append({
        'epoch': e['step'] / steps_per_epoch, 'step': int(e['step']),
        'train_seconds': float(np.interp(e['step'], t_steps, seconds)),
        'test_accuracy': float(e['accuracy']), 'test_loss': float(e['loss']),
        'train_loss': float(np.mean([r['loss'] for r in window]))
                      if window else None})
    last_step = e['step']
  return curve


def race(args: argparse.Namespace, framework: str,
         c: ml_collections.ConfigDict) -> dict[str, Any]:
  """Calibrates (or reuses the saved plan), trains, writes race_<fw>.json."""
  out = pathlib.Path(args.out)
  plan_path = out / f'plan_{framework}.json'
  if plan_path.exists():
    planned = json.loads(plan_path.read_text())
    print(f'race: {framework}: resuming the plan in {plan_path} '
          f'({planned["steps"]} steps)', file=sys.stderr)
  else:
    calibration = calibrate(args, framework)
    steps = plan(args.minutes, calibration['seconds_per_step'])
    planned = {'minutes': args.minutes, 'steps': steps,
               'calibration': calibration, **provenance.header()}
    plan_path.write_text(json.dumps(planned, indent=2) + '\n')
    print(f'race: {framework}: {calibration["seconds_per_step"]:.3f} s per '
          f'step, so {steps} steps for {args.minutes} minutes',
          file=sys.stderr, flush=True)
  steps = planned['steps']
  if framework == 'jax':
    command = jax_command(args, out / 'jax', steps)
  else:
    command = common.worker_command(train_torch, config=args.config,
                                    fields=overrides(args), steps=steps,
                                    out=args.out)
  start = time.time()
  status = subprocess.run(command, cwd=REPO, check=False).returncode
  wall = time.time() - start
  if status != 0:
    raise RuntimeError(f'{framework} training exited with {status}: '
                       f'{" ".join(command)}')
  if framework == 'jax':
    curve = jax_curve(out / 'jax')
  else:
    curve = [json.loads(l) for l in
             (out / 'torch' / 'curve.jsonl').read_text().splitlines() if l]
  result = {'framework': framework, 'name': NAMES[framework],
            'config': json.loads(c.to_json()), 'config_file': args.config,
            'plan': planned, 'command': command, 'wall_seconds': wall,
            'curve': curve, 'race_command': [sys.executable, *sys.argv],
            **provenance.header()}
  (out / f'race_{framework}.json').write_text(
      json.dumps(result, indent=2) + '\n')
  return result


def time_to(curve: list[dict[str, Any]], accuracy: float) -> Optional[float]:
  """Training seconds of the first evaluation at or above `accuracy`."""
  for point in curve:
    if point['test_accuracy'] >= accuracy:
      return point['train_seconds']
  return None


def read_results(out: pathlib.Path) -> list[dict[str, Any]]:
  """Every race_<framework>.json in `out`, in FRAMEWORKS order."""
  results = []
  for framework in FRAMEWORKS:
    path = out / f'race_{framework}.json'
    if path.exists():
      results.append(json.loads(path.read_text()))
  return results


def summary(results: list[dict[str, Any]], target: float) -> str:
  """One line per framework: steps, final accuracy, time to the target."""
  lines = [f'{"framework":<16} {"steps":>6} {"epochs":>6} {"train s":>8} '
           f'{"accuracy":>8}  time to {100 * target:.1f}%']
  for r in results:
    last = r['curve'][-1] if r['curve'] else None
    reached = time_to(r['curve'], target)
    lines.append(
        f'{r["name"]:<16} {r["plan"]["steps"]:>6} '
        f'{(last["epoch"] if last else 0):>6.2f} '
        f'{(last["train_seconds"] if last else 0):>8.0f} '
        f'{(100 * last["test_accuracy"] if last else 0):>7.2f}%  '
        + (f'{reached:.0f} s' if reached is not None else
           f'not reached (best '
           f'{100 * max((p["test_accuracy"] for p in r["curve"]), default=0):.2f}%)'))
  return '\n'.join(lines)


def plot(results: list[dict[str, Any]], target: float, path: str) -> None:
  """Test accuracy against training seconds, one line per framework."""
  import matplotlib  # The 'plot' extra, imported only to draw.
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5), layout='constrained')
  for r in results:
    ax.plot([p['train_seconds'] for p in r['curve']],
            [100 * p['test_accuracy'] for p in r['curve']], marker='o',
            label=f'{r["name"]}: {r["plan"]["steps"]} steps planned for '
            f'{r["plan"]["minutes"]:g} min')
  ax.axhline(100 * target, color='gray', linestyle='--', linewidth=1,
             label=f'target {100 * target:.1f}%')
  config = results[0]['config_file'] if results else ''
  ax.set_xlabel('training seconds (evaluation excluded)')
  ax.set_ylabel('test accuracy (%)')
  ax.set_title(f'Time to accuracy: {config}')
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=9, loc='lower right')
  fig.savefig(path, dpi=100)
  plt.close(fig)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
  """The flags; `overrides`: the --config.GROUP.FIELD=VALUE (field, value)."""
  parser = common.ArgumentParser('race', description=__doc__.split('\n')[0])
  parser.add_argument('--framework', default='both',
                      choices=('jax', 'torch', 'both'))
  parser.add_argument('--minutes', type=float, default=55.0,
                      help='training minutes per framework (planned by '
                      'calibration)')
  parser.add_argument('--out', required=True, help='output directory')
  parser.add_argument('--config', default=DEFAULT_CONFIG,
                      help='config file, relative to the repository root')
  parser.add_argument('--data', default=None,
                      help='an .npz path or a config.data.dataset value '
                      "('' = the config's dataset)")
  parser.add_argument('--target', type=float, default=DEFAULT_TARGET,
                      help='test accuracy whose training time is reported')
  parser.add_argument('--calibration-steps', type=int, default=10)
  args, args.overrides = common.parse_args(parser, argv)
  if not args.minutes > 0:
    parser.error(f'--minutes must be positive, got {args.minutes}')
  if not 0 < args.target <= 1:
    parser.error(f'--target is an accuracy in (0, 1], got {args.target}')
  if args.calibration_steps < 1:
    parser.error('--calibration-steps must be at least 1')
  return args


def main(argv: Optional[list[str]] = None) -> None:
  args = parse_args(argv)
  try:
    c = build_config(args)
    if args.data is None:
      args.data = default_data(c)
      c = build_config(args)
    from nin_jax import validation  # Checks before anything runs.
    validation.validate_config(c)
    frameworks = FRAMEWORKS if args.framework == 'both' else (args.framework,)
    if 'torch' in frameworks:
      race_plan.check_supported(c)
      try:
        importlib.import_module('experiments.torch_train')
      except ImportError as e:
        raise common.UserError(f'--framework={args.framework} needs PyTorch '
                               f"(pip install -e '.[bench]'): {e}") from e
  except (common.UserError, config_lib.ConfigError, ValueError) as e:
    common.fail('race', str(e))
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  for framework in frameworks:
    if (out / f'race_{framework}.json').exists():
      print(f'race: {framework}: done already ({out}/race_{framework}.json; '
            'delete it to race again)', file=sys.stderr)
      continue
    race(args, framework, c)
  results = read_results(out)
  print(summary(results, args.target))
  try:
    plot(results, args.target, str(out / 'race.png'))
    print(f'race: wrote {out / "race.png"}', file=sys.stderr)
  except ImportError:
    print("race: no figure (pip install -e '.[plot]')", file=sys.stderr)


if __name__ == '__main__':
  main()
