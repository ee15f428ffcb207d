"""The errors a user can fix: each message names the field or file and the fix.

They live here, below every other module, so that data readers, the config
checks and the command-line tools can all raise and catch them without
importing one another.
"""


class ConfigError(ValueError):
  """A config field has a value nin-jax cannot run with."""


class DataError(ValueError):
  """A dataset file or directory cannot be used; the message says why and how."""


class NonFiniteError(FloatingPointError):
  """The loss or gradient became NaN or Inf."""


def check(ok: bool, field: str, value: object, expected: str) -> None:
  """Raises ConfigError 'config.FIELD=VALUE: EXPECTED.' unless `ok`; `field`
  is the dotted name (e.g. 'train.batch_size')."""
  if not ok:
    raise ConfigError(f'config.{field}={value!r}: {expected}.')


def check_count(field: str, value: object, zero_means: str = '') -> None:
  """Raises ConfigError unless `value` of `field` is a positive integer (or,
  given `zero_means`, a non-negative one, 0 meaning that)."""
  if zero_means:
    check(isinstance(value, int) and value >= 0, field, value,
          f'must be a non-negative integer (0 = {zero_means})')
  else:
    check(isinstance(value, int) and value > 0, field, value,
          'must be a positive integer')
