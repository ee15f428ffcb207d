"""What the command-line entry points share: quiet library logs and
one-line errors for a user's mistakes."""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator, NoReturn

from absl import logging

from nin_jax import config_lib
from nin_jax import input_pipeline
from nin_jax import runtime

# A user's mistake (a bad flag, workdir or data file): one line, status 2.
USER_ERRORS = (config_lib.ConfigError, input_pipeline.DataError)
USER_ERROR_STATUS = 2


def error_line(message: str) -> None:
  """Prints `nin_jax: error: MESSAGE` on stderr."""
  print(f'nin_jax: error: {message}', file=sys.stderr)


def fail(message: str) -> NoReturn:
  error_line(message)
  sys.exit(USER_ERROR_STATUS)


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
