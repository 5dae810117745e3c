"""Copy-and-patch, writing: the copy made (`begin`: renames and deletes
done), computed leaves stored a pack at a time (`write_pack`; a state held
whole is one pack), Orbax's metadata written (`finish`),
and the output committed as Orbax commits (`commit`)."""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import time
import zlib
from typing import Any

import tensorstore as ts
from etils import epath
from orbax.checkpoint._src.metadata import array_metadata_store

from pipeline import checkpoint, storage
from pipeline.storage import files
from pipeline.storage.files import COMMIT_FILE, is_gcs
from pipeline.write.copy_patch import encoding
from pipeline.write.copy_patch.patches import PatchProgress, TreePatch


async def _clear_ocdbt(directory: epath.Path, patch: TreePatch) -> None:
  """One transaction: renames (index-only copies, then the old keys'
  deletes: in that order, as TensorStore reads a copy's source through the
  transaction) and deletes of what is removed or recomputed (`cleared`).
  Computed values are written after it, in transactions of their own (a
  write after a delete of its range in one transaction is not read back
  reliably)."""
  if patch.renamed or patch.cleared:
    root = await storage.open_store(directory, True, synced=False)
    txn = ts.Transaction()
    staged = root.with_transaction(txn)
    await asyncio.gather(*((root / f'{old}/').experimental_copy_range_to(staged / f'{new}/')
                           for new, old in patch.renamed.items()))
    await asyncio.gather(*((staged / f'{old}/').delete_range(ts.KvStore.KeyRange())
                           for old in patch.cleared))
    await txn.commit_async()


def _clear_directories(directory: epath.Path, patch: TreePatch) -> None:
  """Per-array directories: move renamed ones (after the removed ones go; a
  target is never a name the input holds)."""
  moved = {old: directory / f'.{i}.moving' for i, old in enumerate(patch.renamed.values())}
  for old, temporary in moved.items():
    files.move_tree(directory / old, temporary)
  for old in patch.cleared:
    if old not in moved and (directory / old).exists():
      files.remove_tree(directory / old)
  for new, old in patch.renamed.items():
    files.move_tree(moved[old], directory / new)


async def _store(directory: epath.Path, patch: TreePatch, encoded: dict[bytes, bytes]) -> None:
  """Write encoded values into the tree (an OCDBT database: in one
  transaction, a new one made on the first write of a fresh patch),
  emptying `encoded` as each is staged: the transaction holds the copy."""
  root = await storage.open_store(directory, patch.use_ocdbt, synced=False, fresh=patch.fresh)
  txn = ts.Transaction() if patch.use_ocdbt else None
  staged = root.with_transaction(txn) if txn else root
  await asyncio.gather(*(staged.write(k, encoded.pop(k)) for k in list(encoded)))
  if txn:
    await txn.commit_async()


def _write_metadata(directory: epath.Path, patch: TreePatch) -> None:
  """Orbax's metadata of one tree item. Plain writes: the directory is not
  visible as a checkpoint until the commit."""
  (directory / '_METADATA').write_text(json.dumps(patch.metadata))
  sharding = {base64.urlsafe_b64encode(n.encode()).decode(): s for n, s in patch.shardings.items()}
  (directory / '_sharding').write_text(json.dumps(sharding))
  for old in files.children(directory / 'array_metadatas'):
    files.remove_file(old)
  asyncio.run(array_metadata_store.Store().write(directory, patch.arrays, process_index=0))


def _checkpoint_metadata(src: epath.Path, layout: checkpoint.Layout,
                         provenance: dict[str, Any]) -> dict[str, Any]:
  """The output's _CHECKPOINT_METADATA: the input's handlers, our provenance
  (as the full writer's Orbax save records them)."""
  now = time.time_ns()
  file = src / '_CHECKPOINT_METADATA'
  handlers = (json.loads(file.read_text()) if file.exists() else {}).get('item_handlers')
  if not handlers:  # a tree saved by a bare handler: one tree item, named ''
    handler = checkpoint.HANDLER_CLASSES[layout.items[0][1]]
    handlers = f'{handler.__module__}.{handler.__name__}'
  return {'item_handlers': handlers,
          'metrics': {}, 'performance_metrics': {}, 'init_timestamp_nsecs': now,
          'commit_timestamp_nsecs': now,
          'custom_metadata': checkpoint.custom_metadata(src, provenance)}


@dataclasses.dataclass
class Work:
  """An output being written: where, what has moved so far, and what
  writing each tree item's patch has done (by item)."""
  path: epath.Path
  remote: bool
  copied: storage.CopyStats
  progress: dict[str, PatchProgress]
  uploaded: int = 0


def begin(src: epath.Path, dst: epath.Path, layout: checkpoint.Layout,
          patches: list[TreePatch]) -> Work:
  """The copy to patch, its renames and deletes done: not yet visible at
  dst (a temporary directory locally; on GCS, dst without its commit file)."""
  remote = is_gcs(dst)
  path = dst if remote else dst.parent / f'{dst.name}.orbax-checkpoint-tmp-{time.time_ns()}'
  work = Work(path, remote, _copy_input(src, path, layout, patches),
              {patch.item: PatchProgress() for patch in patches})
  for patch in patches:
    directory = work.path / patch.item if patch.item else work.path
    if patch.use_ocdbt:
      asyncio.run(_clear_ocdbt(directory, patch))
    else:
      _clear_directories(directory, patch)
  return work


def write_pack(work: Work, patches: list[TreePatch], arrays: dict[str, dict[str, Any]]) -> None:
  """Encode and store computed leaves (`arrays`: {item: {param name: array
  or Slab}}), one transaction per tree item, and drop them: whatever holds
  them may let them go. Each value's CRC32 is kept for `verify`."""
  for patch in patches:
    if not arrays.get(patch.item):
      continue
    progress = work.progress[patch.item]
    encoded = encoding.encode(patch, progress, arrays[patch.item], work.remote)  # empties it: the arrays may go
    progress.crcs.update((k, zlib.crc32(v)) for k, v in encoded.items())
    work.uploaded += sum(len(v) for v in encoded.values())
    asyncio.run(_store(work.path / patch.item if patch.item else work.path, patch, encoded))


def finish(src: epath.Path, work: Work, layout: checkpoint.Layout, patches: list[TreePatch],
           provenance: dict[str, Any]) -> None:
  """Orbax's metadata of every tree item and of the checkpoint written into
  `work`: complete, not yet committed."""
  for patch in patches:
    _write_metadata(work.path / patch.item if patch.item else work.path, patch)
  (work.path / '_CHECKPOINT_METADATA').write_text(
      json.dumps(_checkpoint_metadata(src, layout, provenance)))


def moved(work: Work) -> tuple[int, int]:
  """What writing `work` moved: (bytes copied server-side, bytes uploaded)."""
  return (work.copied.bytes_copied_server_side,
          work.copied.bytes_uploaded + (work.uploaded if work.remote else 0))


def _copy_input(src: epath.Path, work: epath.Path, layout: checkpoint.Layout,
                patches: list[TreePatch]) -> storage.CopyStats:
  """The copy to patch: src's files; for fresh patches, only its carried
  items and the files beside them, each tree item's directory left empty."""
  if not any(p.fresh for p in patches):
    return storage.copy_tree(src, work, skip=frozenset({COMMIT_FILE}))
  work.mkdir(parents=True, exist_ok=True)  # where nothing else makes it: files beside, no item
  stats = [storage.copy_tree(src / name, work / name) for name in layout.carried]
  for name in layout.beside:
    storage.copy_entry(src / name, work / name)
  for patch in patches:
    (work / patch.item).mkdir(parents=True, exist_ok=True)
  return storage.CopyStats(*(sum(s[i] for s in stats) for i in range(len(storage.CopyStats._fields))))


def commit(work: epath.Path, dst: epath.Path) -> None:
  """Make the finished output at `work` the committed checkpoint at dst, as
  Orbax does: the commit file last on GCS (where work is dst); locally,
  everything made durable, then the directory renamed into place."""
  (work / COMMIT_FILE).write_text(f'Checkpoint commit was successful to {dst}')
  if work != dst:
    storage.sync(work)
    work.rename(dst)
    storage.sync_directory(dst.parent)  # the rename itself
