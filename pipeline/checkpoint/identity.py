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

from pipeline import storage
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


def _digest(listed: list[tuple]) -> str:
  return hashlib.sha256(json.dumps(sorted(listed)).encode()).hexdigest()[:32]


NOTHING = _digest([])  # the identity of a path where nothing is


def identity(path: epath.Path) -> str:
  """The identity of the checkpoint (directory or file) at `path` (of an
  empty listing where nothing is there: reading it says what is wrong)."""
  return identities([str(path)])[str(path)]


def identities(paths: list[str]) -> dict[str, str]:
  """{path: its identity} of many checkpoints, each as `identity` gives it.
  On gs://, from one listing of what they share (not one per checkpoint):
  the way a run learns, before any worker starts, which outputs are done."""
  local = [p for p in paths if not files.is_gcs(p)]
  found = {p: _local_files(p) for p in local}
  remote = [p.removeprefix('gs://').rstrip('/') for p in paths if files.is_gcs(p)]
  if remote:
    listed = storage.listing(epath.Path('gs://' + os.path.commonpath(remote)))
    found.update(_group(remote, {p.removeprefix('gs://'): info for p, info in listed.items()}))
  return {p: _digest(found[p if not files.is_gcs(p) else p.removeprefix('gs://').rstrip('/')])
          for p in paths}


def _group(bare: list[str], listing: dict[str, dict]) -> dict[str, list[tuple[str, int, str]]]:
  """Each of `bare`'s files in `listing`: (name relative to it, size, CRC32C)."""
  grouped: dict[str, list[tuple[str, int, str]]] = {p: [] for p in bare}
  for name, info in listing.items():
    entry = (int(info['size']), str(info.get('crc32c')))
    if name in grouped:  # a checkpoint that is one file
      grouped[name].append(('', *entry))
    parent = name
    while '/' in parent:
      parent = parent.rsplit('/', 1)[0]
      if parent in grouped:
        grouped[parent].append((name[len(parent) + 1:], *entry))
  return grouped
