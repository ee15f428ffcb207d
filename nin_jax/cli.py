"""What the command-line entry points share: flag parsing whose every failure
is one line naming the flag and the fix, quiet library logs, and one-line
errors for a user's mistakes, never a traceback.

ml_collections reports a misspelt `--config.FIELD` as an AttributeError or
KeyError traceback, and a config file that fails to load as a multi-line
error; `parse_flags` turns each into `nin_jax: error: ...` and exit status 2
before anything is compiled or written.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator, NoReturn, Optional, Sequence

import ml_collections
from absl import flags
from absl import logging

from nin_jax import checkpoints
from nin_jax import cloud_storage
from nin_jax import config_lib
from nin_jax import errors
from nin_jax import runtime

# A user's mistake (a bad flag, config, workdir or data file): one line,
# exit status 2.
USER_ERRORS = (errors.ConfigError, errors.DataError,
               checkpoints.CheckpointError, cloud_storage.StorageError)
USER_ERROR_STATUS = 2


def error_line(message: str) -> None:
  """Prints `nin_jax: error: MESSAGE` on stderr, on one line."""
  print(f'nin_jax: error: {" ".join(message.split())}', file=sys.stderr)


def fail(message: str, status: int = USER_ERROR_STATUS) -> NoReturn:
  """`error_line(message)`, then exits with `status`."""
  error_line(message)
  sys.exit(status)


def check_no_arguments(argv: Sequence[str]) -> None:
  """Fails on positional arguments: every setting of these commands is a flag."""
  if len(argv) > 1:
    fail(f'unexpected arguments {list(argv[1:])}: every setting is a flag '
         '(--helpshort lists them).')


class _NoItemMetadataWarning(logging.logging.Filter):
  """Drops orbax's warning that a checkpoint's item directory (which
  checkpoints.read_numpy reads with plain orbax) has no step metadata: it
  never has, and nothing is wrong."""

  def filter(self, record):
    return 'Metadata file does not exist' not in record.getMessage()


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
  """Runs a command's body: orbax's chatter dropped, and a USER_ERRORS
  exception reported as one line (no traceback) with exit status 2."""
  handler = logging.get_absl_handler()
  handler.addFilter(runtime.QuietLibraries())
  handler.addFilter(_NoItemMetadataWarning())
  try:
    yield
  except USER_ERRORS as e:
    fail(str(e))


def parse_flags(argv: Sequence[str],
                flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """`flag_values(argv)`, failing with one line instead of a traceback."""
  try:
    remaining = flag_values(list(argv))
    config = flag_values['config'].value if 'config' in flag_values else None
    if config is not None:
      config.keys()  # A config file that failed to load raises only now.
    return remaining
  except (flags.Error, AttributeError, KeyError, OSError, TypeError,
          ValueError) as e:
    fail(describe_flag_error(e, argv))


def _flag_value(argv: Sequence[str], name: str) -> Optional[str]:
  """The value of `--name=V` or `--name V` in `argv` (the last one wins)."""
  value = None
  for i, arg in enumerate(argv):
    if arg.startswith(f'--{name}='):
      value = arg.split('=', 1)[1]
    elif arg == f'--{name}' and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def config_overrides(argv: Sequence[str]) -> list[tuple[str, str]]:
  """[(dotted field, '--config.FIELD=VALUE'), ...] in the order given."""
  found = []
  for arg in argv:
    if arg.startswith('--config.'):
      found.append((arg[len('--config.'):].split('=', 1)[0], arg))
  return found


def load_config_spec(spec: str) -> ml_collections.ConfigDict:
  """The config of a `--config=PATH[:ARG]` value, as config_flags loads it."""
  path, _, arg = spec.partition('.py:')
  path = path if path.endswith('.py') else path + '.py'
  return config_lib.load_config_file(path, *([arg] if arg else []))


def unknown_field_message(field: str, arg: str, fields: Sequence[str]) -> str:
  """One line for `arg` (--config.FIELD=...) naming no field of the config,
  and the nearest names (a subtree's field given without its group: the
  dotted name)."""
  near = config_lib.nearest_names(field, fields)
  hint = (f'did you mean {", ".join("--config." + f for f in near)}?'
          if near else 'the fields are listed in nin_jax/config_lib.py '
          '(default_config).')
  return f'{arg}: the config has no field {field!r}; {hint}'


def _unknown_override(argv: Sequence[str]) -> Optional[str]:
  """The message for the first `--config.FIELD` that names no field."""
  spec = _flag_value(argv, 'config')
  if spec is None:
    return None
  try:
    config = load_config_spec(spec)
  except Exception:  # pylint: disable=broad-except
    return None  # The config flag itself reports why it does not load.
  fields = config_lib.field_names(config)
  for field, arg in config_overrides(argv):
    if field not in fields:
      return unknown_field_message(
          field, arg, config_lib.field_names(config, groups=False))
  return None


def _last_line(text: str) -> str:
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  return lines[-1] if lines else text


def _expected_type(message: str, spec: Optional[str]) -> str:
  """'; config.FIELD takes a TYPE (default: V)' for a bad override value."""
  if not message.startswith('flag --config.') or spec is None:
    return ''
  field = message[len('flag --config.'):].split('=', 1)[0]
  try:
    value = load_config_spec(spec)
    for part in field.split('.'):
      value = value[part]
  except Exception:  # pylint: disable=broad-except
    return ''
  return (f'; config.{field} holds a value of type {type(value).__name__} '
          f'(this config has {value!r})')


def describe_flag_error(error: Exception, argv: Sequence[str]) -> str:
  """One line saying which flag is wrong and how to fix it."""
  if isinstance(error, (AttributeError, KeyError)):
    message = _unknown_override(argv)
    if message:
      return message
  spec = _flag_value(argv, 'config')
  text = str(error)
  if isinstance(error, OSError) or 'Failed loading config file' in text:
    return (f'--config={spec}: cannot load the config file '
            f'({_last_line(text)}); pass a path such as '
            'configs/quickstart.py.')
  if 'Error whilst parsing config file' in text:
    return (f'--config={spec}: its get_config() failed: {_last_line(text)}')
  if isinstance(error, flags.Error):
    first = text.splitlines()[0] if text else type(error).__name__
    return first.removeprefix('flag ') + _expected_type(first, spec)
  return f'{type(error).__name__}: {_last_line(text)}'
