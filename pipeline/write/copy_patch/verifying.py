"""Copy-and-patch, verifying: the committed output is what was computed and
carried, proven from its index and stored bytes (CRC32s of what was
encoded; carried keys the input's very entries), without decoding."""
from __future__ import annotations

import asyncio
import collections
import mmap
import os
import zlib
from typing import Any

import jax
import numpy as np
from etils import epath

import transforms
from pipeline import checkpoint, storage
from pipeline.storage.files import COMMIT_FILE, is_gcs
from pipeline.write.copy_patch import encoding
from pipeline.write.copy_patch.patches import PatchProgress, TreePatch


class IndexMismatch(checkpoint.VerificationError):
  """The output's index is not the input's where it must be."""


def _owners(keys: dict[bytes, Any], names: set[str]) -> dict[bytes, str | None]:
  """{key: the parameter name whose array it belongs to (the longest name
  it starts with, then '/'), or None}."""
  prefixes = sorted(((f'{n}/'.encode(), n) for n in names), key=lambda p: -len(p[0]))
  return {k: next((n for p, n in prefixes if k.startswith(p)), None) for k in keys}


def _same_file(a: epath.Path, b: epath.Path, listing: dict[str, Any]) -> bool:
  """Whether two data files hold the same bytes: the same inode, or the same
  size and checksum (on GCS, from the listing; no data read)."""
  if is_gcs(a):
    left, right = listing.get(str(a)), listing.get(str(b))
    return bool(left and right and left['size'] == right['size'] and
                left.get('crc32c') == right.get('crc32c') and left.get('crc32c'))
  sa, sb = os.stat(a), os.stat(b)
  if (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino):
    return True
  return sa.st_size == sb.st_size and _crc(a) == _crc(b)


def _crc(file: epath.Path) -> int:
  crc = 0
  with open(file, 'rb') as f:
    while block := f.read(1 << 22):
      crc = zlib.crc32(block, crc)
  return crc


def _check_bounds(directory: epath.Path, index: dict[bytes, Any]) -> None:
  """Every value the index places in a data file lies within that file (a
  truncated input is caught without reading it)."""
  ends: dict[str, int] = {}
  for value in index.values():
    if isinstance(value, tuple):
      ends[value[0]] = max(ends.get(value[0], 0), int(value[1]) + int(value[2]))
  sizes = ({p[len(str(directory)) + 1:]: int(i['size']) for p, i in storage.listing(directory).items()}
           if is_gcs(directory) else
           {f: os.stat(directory / f).st_size for f in ends if (directory / f).exists()})
  for file, end in sorted(ends.items()):
    if sizes.get(file, -1) < end:
      raise checkpoint.CheckpointError(
          f'{directory / file}: OUT_OF_RANGE: {sizes.get(file, "no")} bytes where the index '
          f'reads up to {end}')


def _files(directory: epath.Path) -> dict[bytes, Any]:
  """Per-array directories: {relative path: None} of every file but Orbax's metadata."""
  root = str(directory).rstrip('/')
  if is_gcs(directory):
    found = [p for p in storage.listing(directory)]
  else:
    found = [os.path.join(d, f) for d, _, names in os.walk(root) for f in names]
  keys = {p[len(root) + 1:] for p in found}
  return {k.encode(): None for k in keys
          if k not in _METADATA_FILES and not k.startswith('array_metadatas/')}


_METADATA_FILES = {'_METADATA', '_sharding', '_CHECKPOINT_METADATA', COMMIT_FILE}


def verify(src: epath.Path, dst: epath.Path, layout: checkpoint.Layout, patches: list[TreePatch],
           progress: dict[str, PatchProgress], prints: dict[str, transforms.Fingerprint]) -> None:
  """The committed output at dst is what was computed (`prints`, by leaf
  path) and carried: Orbax reads its metadata as the tree written, every
  array of its shape and dtype; every array computed was written (by one
  patch or another); and `verify_index`. `progress`: what writing each
  patch did, by item."""
  computed = {path for patch in patches for path in patch.paths.values()}
  if set(prints) != computed:
    raise checkpoint.VerificationError(
        f'{dst}: arrays computed but not written, or written but not computed: '
        f'{sorted(set(prints) ^ computed)[:3]}')
  for patch, (name, tree) in zip(patches, checkpoint.item_metadata(dst, layout).items()):
    got = {m.name: (tuple(m.shape), np.dtype(m.dtype)) for m in jax.tree_util.tree_leaves(tree)
           if checkpoint.is_array(m)}
    want = {a.param_name: (tuple(a.shape), np.dtype(a.dtype)) for a in patch.arrays}
    if got != want:
      raise IndexMismatch(f'{dst / name}: Orbax reads its arrays as '
                          f'{sorted(set(got.items()) ^ set(want.items()))[:3]}')
  verify_index(src, dst, patches, progress, prints)


def verify_index(src: epath.Path, dst: epath.Path, patches: list[TreePatch],
                 progress: dict[str, PatchProgress],
                 prints: dict[str, transforms.Fingerprint]) -> None:
  """The committed output at dst holds each carried leaf as the input's very
  stored value (the same index entry, and data files identical to the
  input's), each computed leaf as the very bytes encoded from the values
  computed (`_check_computed`), and no other key."""
  for patch in patches:
    before = src / patch.item if patch.item else src
    after = dst / patch.item if patch.item else dst
    read = storage.ocdbt_index if patch.use_ocdbt else _files
    old, new = ({} if patch.fresh else read(before)), read(after)
    if patch.use_ocdbt and not patch.fresh:
      _check_bounds(before, old)
    old_owner = _owners(old, set(patch.kept) | set(patch.removed) | set(patch.computed))
    new_owner = _owners(new, set(patch.kept) | set(patch.renamed) | set(patch.computed))
    renamed_to = {o: n for n, o in patch.renamed.items()}
    expected = {}  # output key -> the input key it must be
    for key, owner in old_owner.items():
      if owner in patch.kept or owner is None:  # None: no leaf's (a file of the user's), copied as is
        expected[key] = key
      elif owner in renamed_to:
        expected[f'{renamed_to[owner]}/'.encode() + key[len(owner) + 1:]] = key
    got = {k for k, owner in new_owner.items() if owner not in patch.computed}
    differ = sorted(got ^ set(expected)) or sorted(k for k in got if new[k] != old[expected[k]])
    if differ:
      raise IndexMismatch(f"{after}: its stored keys differ from the input's at "
                          f"{[k.decode(errors='replace') for k in differ[:3]]}")
    _check_computed(after, patch, progress[patch.item],
                    {k: v for k, v in new.items() if new_owner[k] in patch.computed}, prints)
    if patch.use_ocdbt:
      pairs = {(v[0], v[0]) for v in (new[k] for k in got) if isinstance(v, tuple)}
    else:
      pairs = {(expected[k].decode(), k.decode()) for k in got}
    listing = {**storage.listing(before), **storage.listing(after)} if pairs and is_gcs(after) else {}
    bad = sorted(b for a, b in pairs if not _same_file(before / a, after / b, listing))
    if bad:
      raise IndexMismatch(f"{after}: stored files differ from the input's: {bad[:3]}")


def _check_computed(directory: epath.Path, patch: TreePatch, progress: PatchProgress,
                    stored: dict[bytes, Any],
                    prints: dict[str, transforms.Fingerprint]) -> None:
  """What is stored for the computed leaves in the committed tree at
  `directory` (`stored`: their keys in its index) is what TensorStore
  encoded from the values computed, with no second decode: each array
  handed to the encoder had the checksum of the surgery's result (`prints`)
  at its path (`_encode` saw it make each whole chunk grid); the keys
  encoded are every chunk of each grid the output's metadata records (a
  leaf written in slabs: all of them); the stored keys are the keys encoded;
  and each value read back raw has the CRC32 of the bytes encoded."""
  differ = sorted(p for n, p in patch.paths.items()
                  if p not in prints or progress.encoded.get(n) != prints[p].checksum)
  if differ:
    raise checkpoint.VerificationError(
        f'{directory}: the arrays encoded differ from those computed at {differ[:3]}')
  meta = {a.param_name: a for a in patch.arrays}
  grids = set().union(*(encoding.chunk_keys(n, meta[n].shape, meta[n].chunk_shape, patch.use_zarr3)
                        if n in meta else encoding.chunk_keys(n, (), (), patch.use_zarr3)
                        for n in patch.computed))
  if set(progress.crcs) != grids:  # what was encoded, slab by slab or whole, is every chunk recorded
    raise checkpoint.VerificationError(
        f"{directory}: the values encoded are not every chunk of the computed leaves' grids "
        f"as their metadata records them: {[k.decode(errors='replace') for k in sorted(set(progress.crcs) ^ grids)[:3]]}")
  if set(stored) != set(progress.crcs):
    raise IndexMismatch(f"{directory}: computed leaves' stored keys differ from those written at "
                        f"{[k.decode(errors='replace') for k in sorted(set(stored) ^ set(progress.crcs))[:3]]}")
  got = _stored_crcs(directory, patch, stored)
  bad = [k.decode(errors='replace') for k, crc in progress.crcs.items() if got.get(k) != crc]
  if bad:
    raise checkpoint.VerificationError(
        f'{directory}: computed values read back differ from those written (or are unreadable) '
        f'at {bad[:3]}')


_READS = 16  # values read back at once, where they come through TensorStore
_READ_BYTES = 256 << 20  # and no more than about this many bytes of them


def _stored_crcs(directory: epath.Path, patch: TreePatch, stored: dict[bytes, Any]
                 ) -> dict[bytes, int | None]:
  """The CRC32 of each value `stored` names (None: unreadable), read back
  raw: a local OCDBT database's from its index (inline values) and its data
  files, mapped, each once; others through TensorStore, _READS at a time."""
  if patch.use_ocdbt and not is_gcs(directory):
    crcs = {k: zlib.crc32(v) for k, v in stored.items() if isinstance(v, bytes)}
    by_file = collections.defaultdict(dict)  # data file -> {key: (start, end)}
    for k, v in stored.items():
      if isinstance(v, tuple):
        by_file[v[0]][k] = (int(v[1]), int(v[1]) + int(v[2]))
    for file, values in by_file.items():
      crcs.update(_file_crcs(directory / file, values))
    return crcs

  async def read_back():
    root = await storage.open_store(directory, patch.use_ocdbt)
    at_once = asyncio.Semaphore(max(1, min(_READS, _READ_BYTES // patch.chunk_bytes))
                                if patch.chunk_bytes else _READS)

    async def crc(key):
      async with at_once:
        read = await root.read(key)
        return zlib.crc32(read.value) if read.state == 'value' else None

    return await asyncio.gather(*(crc(k) for k in stored))

  return dict(zip(stored, asyncio.run(read_back())))


def _file_crcs(file: epath.Path, values: dict[bytes, tuple[int, int]]) -> dict[bytes, int | None]:
  """{key: the CRC32 of bytes [start, end) of `file`}, each value mapped on
  its own, not copied (so no more than one value is resident at once); None
  for what the file does not hold (missing, shorter, unreadable)."""
  crcs: dict[bytes, int | None] = dict.fromkeys(values)
  try:
    with open(file, 'rb') as f:
      size = os.fstat(f.fileno()).st_size
      for k, (start, end) in values.items():
        if end > size:
          continue
        if end == start:
          crcs[k] = zlib.crc32(b'')
          continue
        offset = start - start % mmap.ALLOCATIONGRANULARITY
        with mmap.mmap(f.fileno(), end - offset, access=mmap.ACCESS_READ, offset=offset) as data:
          with memoryview(data) as view:
            crcs[k] = zlib.crc32(view[start - offset:])
  except OSError:
    pass
  return crcs
