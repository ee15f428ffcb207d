"""The errors a user can fix: each message names the field or file and the fix.

They live here, below every other module, so that data readers, the config
checks and the command-line tools can all raise and catch them without
importing one another.
"""


class ConfigError(ValueError):
  """A config field has a value nin-jax cannot run with."""


class DataError(ValueError):
  """A dataset file or directory cannot be used; the message says why and how."""
