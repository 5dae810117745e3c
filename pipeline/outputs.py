"""What lies at an output path, and the only changes an attempt makes there.

An output path may hold nothing, a committed output of ours (its provenance
says so), what a dead attempt of ours left, or something of the user's. Only
what is provably ours is ever removed: Orbax's temporaries of that name, and
whatever the names below mark. Anything else fails the checkpoint by name,
with `--overwrite` or without, and is left as it was.

An attempt marks its work before it starts: `<dst>.ckpt-surgery-attempt`
says whether it writes dst itself (then an uncommitted or unverified dst is
ours to remove) or beside it (`--overwrite`: the new output is written and
verified at `<dst>.ckpt-surgery-new`, then swapped in, the old one passing
through `<dst>.ckpt-surgery-old`). `recover`, under the output's lease, puts
back whatever a killed attempt left half done: the old output is never lost
before the new one is verified.
"""
from __future__ import annotations

from typing import Any

from etils import epath

from pipeline import checkpoint_io

ATTEMPT = '.ckpt-surgery-attempt'
NEW = '.ckpt-surgery-new'
OLD = '.ckpt-surgery-old'
DIRECT, BESIDE = 'direct', 'beside'  # what an attempt marker says


class NotOurs(checkpoint_io.CheckpointError):
  """Something at an output path that ckpt-surgery did not write."""


def sibling(dst: epath.Path, suffix: str) -> epath.Path:
  return dst.parent / (dst.name + suffix)


def provenance(dst: epath.Path) -> dict[str, Any] | None:
  """Our provenance of the committed output at dst; None if none is there.
  NotOurs if something else is."""
  if not dst.exists():
    return None
  if checkpoint_io.is_checkpoint(dst):
    recorded = checkpoint_io.read_provenance(dst)
    if recorded is not None:
      return recorded
    raise NotOurs(f'{dst} holds a checkpoint ckpt-surgery did not write; it is left as it is '
                  '(move it away to migrate there)')
  what = 'a file' if not dst.is_dir() else 'an uncommitted checkpoint' if (
      (dst / '_CHECKPOINT_METADATA').exists() or (dst / '_METADATA').exists()) else 'a directory'
  raise NotOurs(f'{dst} holds {what} that ckpt-surgery did not write; it is left as it is '
                '(move it away to migrate there)')


def _says_ours(dst: epath.Path) -> bool:
  try:
    return checkpoint_io.read_provenance(dst) is not None
  except Exception:  # unreadable metadata proves nothing
    return False


def recover(dst: epath.Path) -> None:
  """Under dst's lease: remove what a dead attempt of ours left, and put back
  an old output a killed swap had moved aside."""
  for leftover in dst.parent.glob(f'{dst.name}.orbax-checkpoint-tmp*'):
    leftover.rmtree()
  old, new, marker = sibling(dst, OLD), sibling(dst, NEW), sibling(dst, ATTEMPT)
  if old.exists():
    if dst.exists():
      old.rmtree()  # the swap had put the new output in place
    else:
      old.rename(dst)  # killed between the two renames: the old output comes back
  if new.exists():
    new.rmtree()
  if marker.exists():
    if marker.read_text().strip() == DIRECT and dst.exists():
      dst.rmtree()  # ours, uncommitted or not yet verified
    marker.unlink()
  if dst.exists() and not checkpoint_io.is_checkpoint(dst) and _says_ours(dst):
    dst.rmtree()  # uncommitted (on GCS, no commit file yet), but its metadata is ours


def begin(dst: epath.Path, beside: bool) -> epath.Path:
  """Mark dst as being written by this attempt; where to save."""
  sibling(dst, ATTEMPT).write_text(BESIDE if beside else DIRECT)
  return sibling(dst, NEW) if beside else dst


def finish(dst: epath.Path, written: epath.Path) -> None:
  """The verified output at `written` becomes dst; the mark goes."""
  if written != dst:
    old = sibling(dst, OLD)
    dst.rename(old)
    written.rename(dst)
    old.rmtree()
  sibling(dst, ATTEMPT).unlink()
