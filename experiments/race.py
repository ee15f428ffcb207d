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
config.data.dataset value; '' keeps the config's own dataset. `--set
GROUP.FIELD=VALUE` changes the config for both frameworks.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Any, NoReturn, Optional

import ml_collections
import numpy as np

from experiments import race_plan
from experiments.paper_tables import flag_value  # --config.FIELD=VALUE.
from experiments.provenance import commit, machine
from nin_jax import cli
from nin_jax import config_lib
from nin_jax import metric_writers

REPO = pathlib.Path(__file__).resolve().parents[1]

FRAMEWORKS = ('jax', 'torch')
NAMES = {'jax': 'nin-jax', 'torch': 'PyTorch (eager)'}
DEFAULT_CONFIG = 'configs/cifar10_fast.py'
# The PyTorch peer reached 85.7% after 10 epochs.
DEFAULT_TARGET = 0.857


class UserError(Exception):
  """A mistake in the command line: one line, exit status 2."""


def fail(message: str) -> NoReturn:
  print(f'race: error: {" ".join(message.split())}', file=sys.stderr)
  sys.exit(cli.USER_ERROR_STATUS)


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


def overrides(args: argparse.Namespace) -> dict[str, Any]:
  """Field -> value of --data and every --set, in order."""
  fields = {}
  if args.data:
    fields['data.dataset'] = dataset_value(args.data)
  for item in args.set:
    field, sep, text = item.partition('=')
    if not sep:
      raise UserError(f'--set {item}: write --set GROUP.FIELD=VALUE')
    try:
      fields[field] = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      fields[field] = text  # A bare word such as one_cycle.
  return fields


def build_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
  """--config with --data and --set applied; UserError for a field the
  config lacks (named with its nearest names)."""
  c = cli.load_config_spec(str(REPO / args.config)
                           if not os.path.isabs(args.config) else args.config)
  names = config_lib.field_names(c, groups=False)
  for field, value in overrides(args).items():
    if field not in names:
      raise UserError(cli.unknown_field_message(field, f'--set {field}=...',
                                                names))
    c.update_from_flattened_dict({field: value})
  return c


def jax_command(args: argparse.Namespace, workdir: pathlib.Path,
                steps: int) -> list[str]:
  """The nin_jax.main command line of the nin-jax side."""
  command = [sys.executable, '-m', 'nin_jax.main', f'--config={args.config}',
             f'--workdir={workdir}']
  for field, value in overrides(args).items():
    command.append(f'--config.{field}={flag_value(value)}')
  return command + [f'--config.train.num_train_steps={steps}']


def worker_command(args: argparse.Namespace, worker: str,
                   *extra: str) -> list[str]:
  """This script, as a process of its own doing one job (`worker`); run in
  the repository root, where `experiments` imports."""
  command = [sys.executable, '-m', 'experiments.race', f'--worker={worker}',
             f'--config={args.config}', f'--data={args.data}',
             f'--calibration-steps={args.calibration_steps}',
             f'--out={args.out}']
  for item in args.set:
    command += ['--set', item]
  return command + list(extra)


def run_worker(args: argparse.Namespace) -> None:
  """--worker=calibrate-jax|calibrate-torch|torch: one job, in this process."""
  c = build_config(args)
  if args.worker == 'calibrate-jax':
    from experiments import benchmark  # The trainer's own step.
    from nin_jax import runtime
    runtime.configure_cpu((c.train.batch_size, c.train.eval_batch_size),
                          c.runtime.cpu_devices)
    runner = benchmark.JaxRunner(c)
    benchmark.time_steps(runner.train_step, 3)
    seconds = float(np.median(benchmark.time_steps(runner.train_step,
                                                   args.calibration_steps)))
    print(json.dumps({'seconds_per_step': seconds}))
  elif args.worker == 'calibrate-torch':
    import torch
    from experiments import torch_train
    from nin_jax import models
    spec = models.PRESETS[c.model.preset]
    seconds = torch_train.seconds_per_step(
        c, (spec.image_size, spec.image_size, spec.channels),
        args.calibration_steps)
    print(json.dumps({'seconds_per_step': seconds,
                      'threads': torch.get_num_threads(),
                      'torch': torch.__version__}))
  elif args.worker == 'torch':
    from experiments import torch_train
    out = pathlib.Path(args.out) / 'torch'
    out.mkdir(parents=True, exist_ok=True)
    log = out / 'curve.jsonl'
    log.write_text('')

    def on_eval(record: dict) -> None:
      with log.open('a') as f:
        f.write(json.dumps(record) + '\n')
      print(f'torch: epoch {record["epoch"]:.2f} step {record["step"]} '
            f'{record["train_seconds"]:.0f} s test accuracy '
            f'{record["test_accuracy"]:.4f}', file=sys.stderr, flush=True)

    torch_train.train_and_evaluate(c, args.steps, on_eval)
  else:
    raise UserError(f'--worker={args.worker}: not a worker')


def calibrate(args: argparse.Namespace, framework: str) -> dict[str, Any]:
  """Seconds per train step of `framework`, measured in a process of its own."""
  proc = subprocess.run(worker_command(args, f'calibrate-{framework}'),
                        cwd=REPO, capture_output=True, text=True, check=False)
  lines = proc.stdout.strip().splitlines()
  if proc.returncode != 0 or not lines:
    raise RuntimeError(f'{framework} calibration exited with '
                       f'{proc.returncode}: {proc.stderr.strip()[-800:]}')
  return json.loads(lines[-1])


def plan(minutes: float, seconds_per_step: float) -> int:
  """Train steps that fit in `minutes` at `seconds_per_step` (at least 1)."""
  return max(1, int(minutes * 60 / seconds_per_step))


def jax_curve(workdir: pathlib.Path) -> list[dict[str, Any]]:
  """The race records of a nin-jax workdir: each evaluation, with the
  training seconds and mean train loss logged up to its step."""
  records = metric_writers.read_metrics(str(workdir))
  first = {}
  for r in records:
    first.setdefault((r['split'], int(r['step'])), r)
  train = sorted((r for (s, _), r in first.items() if s == 'train'),
                 key=lambda r: r['step'])
  evals = sorted((r for (s, _), r in first.items() if s != 'train'),
                 key=lambda r: r['step'])
  if not train:
    return []
  steps_per_epoch = train[-1]['step'] / train[-1]['epoch']
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
               'calibration': calibration}
    plan_path.write_text(json.dumps(planned, indent=2) + '\n')
    print(f'race: {framework}: {calibration["seconds_per_step"]:.3f} s per '
          f'step, so {steps} steps for {args.minutes} minutes',
          file=sys.stderr, flush=True)
  steps = planned['steps']
  if framework == 'jax':
    command = jax_command(args, out / 'jax', steps)
  else:
    command = worker_command(args, 'torch', f'--steps={steps}')
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
            'commit': commit(),
            'date': datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec='seconds'), 'machine': machine()}
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


class _Parser(argparse.ArgumentParser):

  def error(self, message: str) -> NoReturn:
    fail(message)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
  parser = _Parser(description=__doc__.split('\n')[0])
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
  parser.add_argument('--set', action='append', default=[],
                      metavar='GROUP.FIELD=VALUE')
  parser.add_argument('--target', type=float, default=DEFAULT_TARGET,
                      help='test accuracy whose training time is reported')
  parser.add_argument('--calibration-steps', type=int, default=10)
  parser.add_argument('--worker', default='', help=argparse.SUPPRESS)
  parser.add_argument('--steps', type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
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
    if args.worker:
      run_worker(args)
      return
    c = build_config(args)
    if args.data is None:
      args.data = default_data(c)
      c = build_config(args)
    from nin_jax import train  # Validates before anything runs.
    train.validate_config(c)
    frameworks = FRAMEWORKS if args.framework == 'both' else (args.framework,)
    if 'torch' in frameworks:
      race_plan.check_supported(c)
      try:
        from experiments import torch_train  # pylint: disable=unused-import
      except ImportError as e:
        raise UserError(f'--framework={args.framework} needs PyTorch '
                        f"(pip install -e '.[bench]'): {e}") from e
  except (UserError, config_lib.ConfigError, ValueError) as e:
    fail(str(e))
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
