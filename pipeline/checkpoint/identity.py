"""What an input checkpoint is, cheaply: a digest of its files' listing.

A rerun skips an output only if it is the migration of the input as the input
is now. The source path and spec say which migration; they do not say that
the input was not re-saved since (a training rollback writes step 100 again,
with new values, at the same path). So each output records its input's
identity, and a skip compares it with the input's identity now.

The identity is a digest over every file of the checkpoint (or the one
msgpack file): its name relative to the checkpoint, its size, and locally its
modification time in nanoseconds; on gs://, its CRC32C, which the listing
carries (no data is read: one listing of the checkpoint's prefix). Orbax
writes a new save's files anew (new data file names, new metadata times), so
any re-save changes it; a copy that keeps every name, size and time (or, on
GCS, every name and checksum) keeps it, and is the same input.
"""
from __future__ import annotations

import hashlib
import json
import os

from etils import epath

from pipeline.storage import files


def _local_files(path: str) -> list[tuple[str, int, int]]:
  if not os.path.isdir(path):
    stat = os.stat(path) if os.path.exists(path) else None
    return [('', stat.st_size, stat.st_mtime_ns)] if stat else []
  found = []
  for directory, _, names in os.walk(path):
    for name in names:
      full = os.path.join(directory, name)
      stat = os.stat(full)
      found.append((os.path.relpath(full, path), stat.st_size, stat.st_mtime_ns))
  return found


def _gcs_objects(path: str) -> list[tuple[str, int, str]]:
  bare = path.removeprefix('gs://').rstrip('/')
  return [(p[len(bare):].lstrip('/'), int(info['size']), str(info.get('crc32c')))
          for p, info in files.gcs().find(bare, detail=True).items()
          if info.get('type') == 'file' and (p == bare or p.startswith(bare + '/'))]


def identity(path: epath.Path) -> str:
  """The identity of the checkpoint (directory or file) at `path` (of an
  empty listing where nothing is there: reading it says what is wrong)."""
  path = str(path)
  listed = _gcs_objects(path) if files.is_gcs(path) else _local_files(path)
  return hashlib.sha256(json.dumps(sorted(listed)).encode()).hexdigest()[:32]
