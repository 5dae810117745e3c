"""A usage error: a command refused before any checkpoint is touched (exit 2).

Its own module, standard library only, so the command line can say it
without importing the pipeline (`--help` and a mistyped flag start fast).
"""

USAGE_ERROR = 2


class UsageError(Exception):
  """Refused before any checkpoint is touched: exit 2."""
