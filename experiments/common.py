r"""What the experiment scripts share: their command-line errors, the config
overrides they take and pass on, a run's metrics, and running one of their
functions in a process of its own.

Config overrides have one spelling, the launcher's (`python -m nin_jax.main`):
`--config.GROUP.FIELD=VALUE`. `load_config` parses them with the launcher's own
parser (ml_collections' config_flags on a private set of flags), so a value
means in a script what it means in the training command the script runs, and
a mistake reads as the launcher's one line (`cli.describe_flag_error`).

  UserError, fail, ArgumentParser   one-line errors, exit status 2
  parse_args                        argparse flags, then --config.F=V overrides
  override, flag_value              a field and value as --config.F=V
  load_config                       CONFIG[:ARG] + overrides, as the launcher
  image_shape                       (height, width, channels) of a preset
  read_metrics, steps_per_epoch     a workdir's metrics.jsonl, once per step
  worker_command, call_in_process   a function of these modules as a process
  WorkerError                       such a process failed: status, stderr
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
from typing import Any, Callable, Iterable, Mapping, NoReturn, Optional, Union

from absl import flags
import ml_collections
from ml_collections import config_flags

from nin_jax import cli
from nin_jax import metric_writers

REPO = pathlib.Path(__file__).resolve().parents[1]
OVERRIDE = '--config.'
# Fields with their values: a mapping, or (field, value) pairs in order.
Overrides = Union[Mapping[str, Any], Iterable[tuple[str, Any]]]


class UserError(Exception):
  """A mistake in the command line: one line, exit status 2."""


def fail(script: str, message: str) -> NoReturn:
  """`SCRIPT: error: MESSAGE` on one line of stderr, exit status 2."""
  print(f'{script}: error: {" ".join(message.split())}', file=sys.stderr)
  sys.exit(cli.USER_ERROR_STATUS)


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose every error is `SCRIPT: error: ...`, exit status 2."""

  def __init__(self, script: str, **kwargs: Any):
    super().__init__(**kwargs)
    self.script = script

  def error(self, message: str) -> NoReturn:
    fail(self.script, message)


def parse_args(parser: argparse.ArgumentParser, argv: Optional[list[str]]
               ) -> tuple[argparse.Namespace, list[tuple[str, str]]]:
  """`parser`'s flags, and the --config.GROUP.FIELD=VALUE overrides after or
  among them as (field, value as typed), in order; anything else is
  `parser.error`."""
  args, rest = parser.parse_known_args(argv)
  found = []
  for arg in rest:
    field, sep, value = arg.removeprefix(OVERRIDE).partition('=')
    if not arg.startswith(OVERRIDE) or not sep or not field:
      parser.error(f'unrecognized argument {arg!r} (config fields are set '
                   'with --config.GROUP.FIELD=VALUE)')
    found.append((field, value))
  return args, found


def flag_value(value: Any) -> str:
  """`value` as --config.FIELD=VALUE spells it (ml_collections parses it)."""
  return repr(value) if isinstance(value, float) else str(value)


def _items(fields: Overrides) -> list[tuple[str, Any]]:
  return list(fields.items() if isinstance(fields, Mapping) else fields)


def override(field: str, value: Any) -> str:
  """'--config.FIELD=VALUE'; a string value is passed as typed."""
  return f'{OVERRIDE}{field}={flag_value(value)}'


def config_file(spec: str) -> str:
  """A config `PATH[:ARG]`, relative to the repository root unless absolute,
  as an absolute one."""
  return spec if os.path.isabs(spec) else str(REPO / spec)


def load_config(spec: str, fields: Overrides = ()
                ) -> ml_collections.ConfigDict:
  """The config `python -m nin_jax.main --config=SPEC --config.F=V ...` trains
  (`spec` relative to the repository root); UserError with the launcher's
  line for a field the config lacks, a value of the wrong type or a config
  that does not load."""
  path = config_file(spec)
  argv = ['experiments', f'--config={path}',
          *(override(f, v) for f, v in _items(fields))]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, flag_values=values,
                                  lock_config=True, sys_argv=argv)
  try:
    values(argv)
    config = values['config'].value
    config.keys()  # A config file that failed to load raises only now.
  except (flags.Error, AttributeError, KeyError, OSError, TypeError,
          ValueError) as e:
    message = cli.describe_flag_error(e, argv)
    raise UserError(message.replace(path, spec)) from e  # As given.
  return config


def read_metrics(workdir: str
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  """(train, evaluations) of WORKDIR/metrics.jsonl (`metric_writers`): the
  first record of each split and step, by step (a finished run that is
  resumed evaluates its last step again: the same checkpoint, later)."""
  first = {}
  for r in metric_writers.read_metrics(workdir):
    first.setdefault((r['split'], int(r['step'])), r)
  records = sorted(first.values(), key=lambda r: int(r['step']))
  return ([r for r in records if r['split'] == 'train'],
          [r for r in records if r['split'] != 'train'])


def steps_per_epoch(records: Iterable[dict[str, Any]]) -> Optional[float]:
  """Steps per epoch, as the last train record with an epoch gives it (None
  before one); evaluation records have no epoch: it is step / this."""
  logged = [r for r in records if r['split'] == 'train' and r.get('epoch')]
  if not logged:
    return None
  return int(logged[-1]['step']) / float(logged[-1]['epoch'])


def _module_name(function: Callable[..., Any]) -> str:
  """The importable name of `function`'s module (not '__main__')."""
  name = function.__module__
  if name == '__main__':
    name = sys.modules['__main__'].__spec__.name
  return name


def worker_command(function: Callable[..., Any], **kwargs: Any) -> list[str]:
  """argv of `function(**kwargs)` in a process of its own
  (`python -m experiments.worker MODULE:FUNCTION JSON`), to run in the
  repository root; the arguments must be JSON."""
  return [sys.executable, '-m', 'experiments.worker',
          f'{_module_name(function)}:{function.__qualname__}',
          json.dumps(kwargs)]


class WorkerError(RuntimeError):
  """A function's process failed: its exit status and stderr."""

  def __init__(self, status: int, stderr: str):
    self.status, self.stderr = status, stderr.strip()
    super().__init__(self.describe(800))

  def describe(self, chars: int) -> str:
    """'its process exited with STATUS: ' and the end of its stderr."""
    return f'its process exited with {self.status}: {self.stderr[-chars:]}'


def call_in_process(function: Callable[..., Any], **kwargs: Any) -> Any:
  """What `function(**kwargs)` returns, run in a process of its own in the
  repository root; WorkerError if the process fails."""
  proc = subprocess.run(worker_command(function, **kwargs), cwd=REPO,
                        capture_output=True, text=True, check=False)
  lines = proc.stdout.strip().splitlines()
  if proc.returncode != 0 or not lines:
    raise WorkerError(proc.returncode, proc.stderr)
  return json.loads(lines[-1])
