"""What lies at an output path, and the only changes an attempt makes there.

An output path may hold nothing, a committed output of ours (its provenance
says so), what a dead attempt of ours left, or something of the user's. Only
what is provably ours is ever removed: Orbax's temporaries of that name, an
uncommitted output whose metadata is ours, and whatever the mark below
names. Anything else fails the checkpoint by name, with `--overwrite` or
without, and is left as it was.

A merge whose spec has ops first writes the merge at `<dst>.ckpt-surgery-sum`
and migrates that to dst; the sum is removed once dst is verified, and by
`recover` whatever became of the attempt.

An attempt marks its work before it starts, in `<dst>.ckpt-surgery-attempt`:
  direct    it writes dst itself: an uncommitted or unverified dst is ours
  beside    `--overwrite`: the new output is written and verified at
            `<dst>.ckpt-surgery-new`; dst (the old output) is not touched
  swapping  the verified new output replaces dst (`files.replace_tree`:
            the old one goes first, the new one stays whole until dst is)
`recover`, under the output's lease, finishes or undoes what a killed
attempt left, by the mark: a swap is rolled forward, anything else of ours
removed. So the old output is never lost before the new one is verified, and
nothing unverified is ever taken as done.
"""
from __future__ import annotations

from typing import Any

from etils import epath

from pipeline import checkpoint
from pipeline.storage import files
from pipeline.write import orbax_save

ATTEMPT = '.ckpt-surgery-attempt'
NEW = '.ckpt-surgery-new'
SUM = '.ckpt-surgery-sum'  # a merge, before the spec's ops run on it
DIRECT, BESIDE, SWAPPING = 'direct', 'beside', 'swapping'  # what an attempt's mark says


class NotOurs(checkpoint.CheckpointError):
  """Something at an output path that ckpt-surgery did not write."""


def sibling(dst: epath.Path, suffix: str) -> epath.Path:
  return dst.parent / (dst.name + suffix)


def provenance(dst: epath.Path) -> dict[str, Any] | None:
  """Our provenance of the committed output at dst; None if none is there.
  NotOurs if something else is."""
  if not dst.exists():
    return None
  if checkpoint.is_checkpoint(dst):
    recorded = checkpoint.read_provenance(dst)
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
    return checkpoint.read_provenance(dst) is not None
  except Exception:  # unreadable metadata proves nothing
    return False


def _dead_saves(dst: epath.Path, new: epath.Path) -> list[epath.Path]:
  """What a save at dst or its twin left when its process died (local only:
  on GCS Orbax writes in place and commits with a file): Orbax's
  temporaries of either, and the plain-named stages `orbax_save.save`
  writes a path with glob characters at. Found by name in one listing of
  dst's directory, never by a glob of dst."""
  if files.is_gcs(dst):
    return []
  stages = {orbax_save.staged_at(p).name for p in (dst, new)}
  temporaries = tuple(f'{name}.orbax-checkpoint-tmp'
                      for name in (dst.name, new.name, sibling(dst, SUM).name, *stages))
  return [dst.parent / name for name in files.names(dst.parent)
          if name in stages or name.startswith(temporaries)]


def recover(dst: epath.Path) -> None:
  """Under dst's lease: finish or undo what a dead attempt of ours left."""
  new, marker = sibling(dst, NEW), sibling(dst, ATTEMPT)
  for leftover in [*_dead_saves(dst, new), sibling(dst, SUM)]:
    files.remove_tree(leftover)
  said = marker.read_text().strip() if marker.exists() else None
  if said == SWAPPING and new.exists() and checkpoint.is_checkpoint(new):
    files.replace_tree(new, dst)  # the new output was verified: roll the swap forward
  else:
    files.remove_tree(new)  # unverified, or what a finished swap left of it
  if said == DIRECT:
    files.remove_tree(dst)  # ours, uncommitted or not yet verified
  files.remove_file(marker)
  if dst.exists() and not checkpoint.is_checkpoint(dst) and _says_ours(dst):
    files.remove_tree(dst)  # uncommitted (on GCS, no commit file yet), but its metadata is ours


def mark(dst: epath.Path, beside: bool) -> epath.Path:
  """Mark dst as being written by this attempt; where to save."""
  sibling(dst, ATTEMPT).write_text(BESIDE if beside else DIRECT)
  return sibling(dst, NEW) if beside else dst


def publish(dst: epath.Path, written: epath.Path) -> None:
  """The verified output at `written` becomes dst; the mark goes."""
  if written != dst:
    sibling(dst, ATTEMPT).write_text(SWAPPING)
    files.replace_tree(written, dst)
  files.remove_file(sibling(dst, ATTEMPT))
