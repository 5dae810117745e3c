"""The two ways a checkpoint fails by name: it cannot be read or written as
asked, or what was committed is not what was computed."""


class CheckpointError(ValueError):
  """A checkpoint cannot be read or written as asked."""


class VerificationError(RuntimeError):
  """What was committed is not what was computed; the output was removed."""
