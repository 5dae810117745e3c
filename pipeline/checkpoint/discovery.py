"""Find the committed checkpoints a pattern names, and where each one goes.

PATTERN is a local path or gs:// URL with globs. Each match is a checkpoint
directory, a `CheckpointManager` root, whose committed steps are all taken,
or a legacy Flax msgpack file (recognised by its first bytes, whatever its
name). A directory that is neither holds legacy checkpoints when it has
Flax msgpack files: those named `<prefix><step>` (what
`flax.training.checkpoints` writes: `checkpoint_100`) are taken in step
order, as a root's steps are, then any other (`state.msgpack`) by name. Temporary (`*.orbax-checkpoint-tmp-*`, Flax's
`<prefix>tmp`) and uncommitted checkpoints are never taken. Each checkpoint
lands at PREFIX + its path relative to the pattern's fixed prefix: the part
before the first glob character, cut back to its last '/'.
"""
from __future__ import annotations

import os
import re

from etils import epath
import orbax.checkpoint as ocp

from pipeline import checkpoint, storage
from pipeline.storage import files

GLOB_CHARS = '*?['
MSGPACK_STEP = re.compile(r'.*?(\d+)')  # a Flax checkpoint file's name: prefix, step


class DiscoveryError(ValueError):
  """The pattern or output cannot be used; nothing has been touched."""


def absolute(path: str) -> str:
  """gs:// URLs as they are; local paths absolute (`~` is the home
  directory, as a shell would have it), so every worker agrees."""
  path = path.rstrip('/') or '/'
  return path if '://' in path else os.path.abspath(os.path.expanduser(path))


# Characters GCS tools read as wildcards (gsutil, fsspec) or TensorStore's
# gs:// requests do not keep as written (`#`): Google's object naming
# guidelines advise against them, and Orbax's own save to gs:// loses such
# checkpoints (measured against the test server).
GCS_UNSAFE = '[]*?#'
NAME_MAX = 255  # bytes in one local file name
# The most an output's own name grows by (its --overwrite twin's copy-and-patch
# temporary: `.ckpt-surgery-new.orbax-checkpoint-tmp-<19 digits>`).
LONGEST_SUFFIX = len('.ckpt-surgery-new.orbax-checkpoint-tmp-') + 19


def gcs_unsafe(path: str, role: str) -> str | None:
  """Why a gs:// path cannot be used as it is named, or None."""
  bad = sorted(set(path.removeprefix('gs://')) & set(GCS_UNSAFE)) if files.is_gcs(path) else []
  if bad:
    return (f'{role} {path} holds {" ".join(repr(c) for c in bad)}, which GCS tools read as '
            'wildcards or do not keep as written (Google advises against them in object names); '
            'rename it, or migrate it from a local copy')
  return None


def refused_names(src: str, dst: str) -> str | None:
  """Why a checkpoint cannot be migrated as its paths are named, or None: on
  gs://, characters GCS tools do not take as written; locally, an output
  name too long for the temporaries beside it. Decided from the names
  alone, so nothing is touched."""
  if why := gcs_unsafe(src, 'input') or gcs_unsafe(dst, 'output'):
    return why
  name = len(os.path.basename(dst).encode())
  if not files.is_gcs(dst) and name + LONGEST_SUFFIX > NAME_MAX:
    return (f'output {dst}: its name is {name} bytes, and the temporaries beside it add '
            f'{LONGEST_SUFFIX}: names of at most {NAME_MAX - LONGEST_SUFFIX} bytes fit this file '
            f"system's limit of {NAME_MAX}")
  return None


def fixed_prefix(pattern: str) -> str:
  """'gs://a/runs/*/ckpt/*' -> 'gs://a/runs/'; 'ckpts/run7' -> 'ckpts/'."""
  cut = min((i for i, c in enumerate(pattern) if c in GLOB_CHARS), default=len(pattern))
  return pattern[:pattern.rfind('/', 0, cut) + 1]


def expand(pattern: str) -> list[epath.Path]:
  """The directories and files a pattern names: itself where it exists as
  written (a sweep's `run[1]` is that run, not `run1`), else its matches."""
  prefix = fixed_prefix(pattern)
  rest = pattern[len(prefix):]
  path = epath.Path(pattern)
  if not any(c in GLOB_CHARS for c in rest) or path.exists():
    return [path] if path.exists() else []
  base = epath.Path(prefix)
  if not base.is_dir():
    return []
  return sorted(base.glob(rest), key=str)


def _is_msgpack_checkpoint(path: epath.Path) -> bool:
  """A Flax msgpack file, and not the temporary of an unfinished Flax save."""
  return not path.name.endswith('tmp') and checkpoint.is_msgpack(path)


def _msgpack_files(path: epath.Path) -> list[epath.Path]:
  """The Flax msgpack files in directory `path`: those named
  `<prefix><step>` by step, then the others by name."""
  def order(child: epath.Path) -> tuple[bool, int, str]:
    match = MSGPACK_STEP.fullmatch(child.name)
    return (not match, int(match[1]) if match else 0, child.name)
  found = [c for c in path.iterdir() if not c.is_dir() and _is_msgpack_checkpoint(c)]
  return sorted(found, key=order)


def _not_msgpack(file: epath.Path) -> str:
  """Why `file` is not taken as a Flax msgpack checkpoint."""
  if checkpoint.is_msgpack(file):
    return f'{file} is the temporary file of an unfinished Flax save'
  return (f'{file} is a file but not a Flax msgpack checkpoint '
          '(it does not begin with a msgpack map keyed by strings)')


def checkpoints_in(path: epath.Path) -> list[epath.Path]:
  """The committed checkpoint at `path`, or the committed steps under it.

  In a CheckpointManager root (one with at least one checkpoint step), a step
  directory that Orbax counts as finalized but that holds no checkpoint is
  broken, not absent: it is taken, so that the run reports it as failed.
  (`is_checkpoint` refuses temporary directories; a root is not asked, since
  on GCS any directory without a commit file looks temporary.) A directory
  that is neither yields its Flax msgpack checkpoint files.
  """
  if not path.is_dir():
    return [path] if _is_msgpack_checkpoint(path) else []
  if checkpoint.is_checkpoint(path):
    return [path]
  steps = ocp.utils.checkpoint_steps_paths(path)
  if any(checkpoint.is_checkpoint(s) for s in steps):
    return sorted(steps, key=lambda s: ocp.step.step_from_checkpoint_name(s.name))
  return _msgpack_files(path)  # [] for an unfinished checkpoint, or any other directory


def why_nothing(pattern: str) -> str:
  """Why `pattern` names no checkpoint, for the common cases."""
  matched = expand(pattern)
  if not matched:
    missing = pattern if not any(c in GLOB_CHARS for c in pattern) else fixed_prefix(pattern)
    return f'{missing} does not exist' if not epath.Path(missing).exists() else 'nothing matches it'
  if len(matched) > 1:
    return (f'{len(matched)} paths match it, none an Orbax checkpoint, CheckpointManager root '
            'or Flax msgpack file')
  path, = matched
  if not path.is_dir():
    return _not_msgpack(path)
  if (path / '_CHECKPOINT_METADATA').exists() or (path / '_METADATA').exists():
    return f'{path} is an uncommitted (temporary or unfinished) checkpoint'
  why = (f'{path} exists but holds no _CHECKPOINT_METADATA or _METADATA, no committed step '
         'directories and no Flax msgpack checkpoint files')
  others = sorted((c for c in path.iterdir() if not c.is_dir()), key=lambda c: c.name)
  if others:
    why += f' ({len(others)} other file(s): {"; ".join(_not_msgpack(c) for c in others[:3])})'
  return why


def destination(src: str, pattern: str, output: str) -> str:
  """Where `src`, found by `pattern`, lands under `output`."""
  prefix = fixed_prefix(pattern)
  if not src.startswith(prefix):
    raise DiscoveryError(f'{src} is not under the pattern prefix {prefix}')
  return output.rstrip('/') + '/' + src[len(prefix):]


def _inside(path: str, parent: str) -> bool:
  return path == parent or path.startswith(parent.rstrip('/') + '/')


def real_path(path: str) -> str:
  """Where a path really is: local symlinks resolved; a gs:// URL as its
  bucket and object prefix, as gcsfs and epath name the objects (repeated
  slashes and `.` segments gone; GCS has no links)."""
  if files.is_gcs(path):
    return 'gs://' + '/'.join(p for p in path[len('gs://'):].split('/') if p not in ('', '.'))
  return os.path.realpath(path)


def check_output(output: str, inputs: list[str]) -> None:
  """Refuse an output that is a file, that holds glob characters (unless it
  exists as written: it is then a name), on gs:// characters GCS tools do
  not take as written, or that overlaps (by real path) an input checkpoint
  or an input root (a CheckpointManager's directory)."""
  where = epath.Path(output)
  if where.exists() and not where.is_dir():
    raise DiscoveryError(f'output {output} is a file, not a directory')
  if why := gcs_unsafe(output, 'output'):
    raise DiscoveryError(why)
  if files.globbed(output) and not where.exists():
    held = ' '.join(sorted(set(output) & set(files.GLOB_CHARACTERS)))
    raise DiscoveryError(f'output {output} holds glob characters ({held}) and does not exist: '
                         'the output is a name, not a pattern; create it first to use it as '
                         'written, or choose another')
  out = real_path(output)
  for path in inputs:
    if _inside(out, real_path(path)) or _inside(real_path(path), out):
      resolved = f' (it resolves to {out})' if out != output else ''
      raise DiscoveryError(f'output {output}{resolved} overlaps input {path}: inputs are never '
                           'written, so the output must lie outside every input')


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
  try:
    roots = expand(pattern)
    sources = [str(c) for d in roots for c in checkpoints_in(d)]
    if not sources:
      raise DiscoveryError(f'no committed checkpoint matches {pattern}: {why_nothing(pattern)}')
    if output is None:
      return [(s, None) for s in sources]
    output = absolute(output)
    # A step globbed by itself (`run_a/*`) lies in its CheckpointManager's root: that is input too.
    managers = {str(epath.Path(s).parent) for s in sources if epath.Path(s).name.isdigit()}
    check_output(output, [*map(str, roots), *sorted(managers), *sources])
  except OSError as e:  # an unreadable directory, say: name it and the cause
    raise DiscoveryError(f'cannot read {e.filename or pattern}: {e.strerror or e}') from None
  return [(s, destination(s, pattern, output)) for s in sources]
