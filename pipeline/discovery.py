"""Find the committed checkpoints a pattern names, and where each one goes.

PATTERN is a local path or gs:// URL with globs. Each match is a checkpoint
directory or a `CheckpointManager` root, whose committed steps are all taken.
Temporary (`*.orbax-checkpoint-tmp-*`) and uncommitted directories are never
taken. Each checkpoint lands at PREFIX + its path relative to the pattern's
fixed prefix: the part before the first glob character, cut back to its
last '/'.
"""
from __future__ import annotations

import os

from etils import epath
import orbax.checkpoint as ocp

from pipeline import checkpoint_io, storage

GLOB_CHARS = '*?['


class DiscoveryError(ValueError):
  """The pattern or output cannot be used; nothing has been touched."""


def absolute(path: str) -> str:
  """gs:// URLs as they are; local paths absolute, so every worker agrees."""
  path = path.rstrip('/') or '/'
  return path if '://' in path else os.path.abspath(path)


def fixed_prefix(pattern: str) -> str:
  """'gs://a/runs/*/ckpt/*' -> 'gs://a/runs/'; 'ckpts/run7' -> 'ckpts/'."""
  cut = min((i for i, c in enumerate(pattern) if c in GLOB_CHARS), default=len(pattern))
  return pattern[:pattern.rfind('/', 0, cut) + 1]


def expand(pattern: str) -> list[epath.Path]:
  """The directories a pattern names."""
  prefix = fixed_prefix(pattern)
  rest = pattern[len(prefix):]
  if not any(c in GLOB_CHARS for c in rest):
    path = epath.Path(pattern)
    return [path] if path.is_dir() else []
  base = epath.Path(prefix)
  if not base.is_dir():
    return []
  return sorted((p for p in base.glob(rest) if p.is_dir()), key=str)


def checkpoints_in(path: epath.Path) -> list[epath.Path]:
  """The committed checkpoint at `path`, or the committed steps under it.

  In a CheckpointManager root (one with at least one checkpoint step), a step
  directory that Orbax counts as finalized but that holds no checkpoint is
  broken, not absent: it is taken, so that the run reports it as failed.
  (`is_checkpoint` refuses temporary directories; a root is not asked, since
  on GCS any directory without a commit file looks temporary.)
  """
  if checkpoint_io.is_checkpoint(path):
    return [path]
  steps = ocp.utils.checkpoint_steps_paths(path)
  if not any(checkpoint_io.is_checkpoint(s) for s in steps):
    return []  # not a CheckpointManager root (an unfinished checkpoint, say)
  return sorted(steps, key=lambda s: ocp.step.step_from_checkpoint_name(s.name))


def destination(src: str, pattern: str, output: str) -> str:
  """Where `src`, found by `pattern`, lands under `output`."""
  prefix = fixed_prefix(pattern)
  if not src.startswith(prefix):
    raise DiscoveryError(f'{src} is not under the pattern prefix {prefix}')
  return output.rstrip('/') + '/' + src[len(prefix):]


def _inside(path: str, parent: str) -> bool:
  return path == parent or path.startswith(parent.rstrip('/') + '/')


def discover(pattern: str, output: str | None = None) -> list[tuple[str, str | None]]:
  """(src, dst) for every committed checkpoint `pattern` names.

  Raises DiscoveryError when a bucket is missing, nothing matches, or the
  output overlaps an input.
  """
  pattern = absolute(pattern)
  try:
    storage.check_bucket(pattern, 'input')
    if output is not None:
      storage.check_bucket(output, 'output')
  except storage.StorageError as e:
    raise DiscoveryError(str(e)) from None
  sources = [str(c) for d in expand(pattern) for c in checkpoints_in(d)]
  if not sources:
    raise DiscoveryError(f'no committed checkpoint matches {pattern}')
  if output is None:
    return [(s, None) for s in sources]
  output = absolute(output)
  for src in sources:
    if _inside(output, src) or _inside(src, output):
      raise DiscoveryError(f'output {output} overlaps input checkpoint {src}')
  return [(s, destination(s, pattern, output)) for s in sources]
