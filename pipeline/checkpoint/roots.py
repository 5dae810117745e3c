"""What a checkpoint root holds beside its steps, carried to the output root.

Orbax's `CheckpointManager(root, metadata=...)` and v1's
`training.Checkpointer(root, custom_metadata=...)` keep the run's own
metadata in `root/metadata/` (`_ROOT_METADATA`), not in any step. Migrating a
root's steps carries it to the output root, so that the manager opened there
returns the same `metadata()`. It is copied as it is, never decoded; a root
whose output already holds the same bytes is left alone, and a local file is
written beside and renamed into place, so it is never seen half-written.
"""
from __future__ import annotations

from etils import epath

from pipeline.storage import files

METADATA = 'metadata'  # Orbax's root metadata directory
MARKER = '_ROOT_METADATA'


def root_pairs(pairs: list[tuple[str, str]]) -> list[tuple[epath.Path, epath.Path]]:
  """(input root, output root) of each step in `pairs` whose root has metadata."""
  roots = sorted({(str(epath.Path(s).parent), str(epath.Path(d).parent)) for s, d in pairs})
  return [(epath.Path(s), epath.Path(d)) for s, d in roots
          if (epath.Path(s) / METADATA / MARKER).exists()]


def carry_root_metadata(pairs: list[tuple[str, str]]) -> list[epath.Path]:
  """Copy each input root's metadata files to its output root; the output
  roots written to."""
  written = []
  for src_root, dst_root in root_pairs(pairs):
    for entry in files.children(src_root / METADATA):
      if entry.is_dir():
        continue  # Orbax writes files there only
      target = dst_root / METADATA / entry.name
      data = entry.read_bytes()
      if target.exists() and target.read_bytes() == data:
        continue
      target.parent.mkdir(parents=True, exist_ok=True)
      if files.is_gcs(target):
        target.write_bytes(data)  # one object: whole or absent
      else:
        part = target.parent / f'{target.name}.ckpt-surgery-part'
        part.write_bytes(data)
        part.rename(target)
      written.append(dst_root)
  return sorted(set(written))
