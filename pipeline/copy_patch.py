"""Copy-and-patch: an output made by copying the input's files and patching the copy.

When every output leaf is carried (untouched or only renamed) or computed,
and the surgery provably removes nothing (`transforms.Route.removes`), most
of an output is the input's bytes. Instead of re-saving them through Orbax:
  1. copy  the input's files (`storage.copy_tree`: hard links for the OCDBT
           data files TensorStore never rewrites, a server-side copy on GCS);
  2. patch the copy, one tree item at a time. In an OCDBT database: a
           renamed leaf's keys are copied index-only (the new key points at
           the same file, offset and length) and its old keys deleted, in
           one TensorStore transaction; then computed leaves are written, in
           a second, as the bytes the zarr driver encodes them to with the
           spec Orbax itself would use (below), in the input's zarr format (v2, or
           zarr3 as Orbax v1 writes by default). In per-array directories, a
           renamed leaf's directory is moved;
  3. rewrite Orbax's metadata (`_METADATA`, `_sharding`, `array_metadatas`,
           `_CHECKPOINT_METADATA` with our provenance), built with Orbax's own
           metadata classes;
  4. commit as Orbax does: a temporary directory renamed into place locally;
           on GCS, `commit_success.txt` written last.
`verify_index` then proves what was carried without reading its data: the
output's index maps each carried key to the input's very value (the same
inline bytes, or the same place in a data file identical to the input's),
and holds no key but those and the computed leaves'.

Computed leaves are encoded once, into memory, with Orbax's write spec (one
chunk per shard, as Orbax writes them; where `chunk_bytes` is given, as a
streamed checkpoint's are, chunks of whole rows at most that large, so a
leaf may be written a Slab of rows at a time), and those bytes are what is
written. `write` does it all at once; `begin`, `write_pack` (a pack of
computed leaves, one transaction per tree item) and `finish` a pack at a
time.
Verification links each stored byte to the values computed without decoding
anything a second time (a decode costs as much as the encode): the array
handed to the encoder has the checksum the surgery's result had
(`transforms.fingerprint`, by leaf path); the encoder made every key of the
array's chunk grid; the output stores exactly those keys; and every value
read back raw has the CRC32 of the bytes encoded.

A fresh patch (`plan_patch(fresh=True)`: `--full_decode`, or no leaf
carried) copies no array data at all: every leaf is computed and written
into an empty tree (a new OCDBT database configured as Orbax configures
its own, or a directory per array, as the input had), so it is the full
path's writer too, and a surgery that removes data may take it.

Limits, where `plan_patch` says why and another writer is used: old OCDBT
versions and copied data files keep overwritten values readable, so a
surgery that removes data takes only fresh patches; and neither kind takes
inputs whose format this module does not know (per-process
databases without a merged root, metadata fields or value types Orbax 0.12
does not write), typed PRNG keys computed, or leaves of other types.
"""
from __future__ import annotations

import asyncio
import base64
import collections
import copy
import dataclasses
import functools
import itertools
import json
import math
import mmap
import os
import time
import zlib
from typing import Any, NamedTuple

import jax
import numpy as np
import tensorstore as ts
from etils import epath
from orbax.checkpoint._src.metadata import array_metadata, array_metadata_store, empty_values
from orbax.checkpoint._src.metadata import sharding as sharding_metadata
from orbax.checkpoint._src.metadata import tree as tree_metadata
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
from orbax.checkpoint._src.serialization import types as serialization_types
from orbax.checkpoint._src.tree import utils as tree_utils

import transforms
from pipeline import checkpoint_io, files, storage
from pipeline.batching import byte_batches
from pipeline.files import COMMIT_FILE, is_gcs
from pipeline.copy_through import StoredArray

NOTHING_CARRIED = ('no leaf carried over as stored (every leaf computed, or a Python scalar among '
                   'params or opt_state)')
ZERO_FILLS = ("an optimizer-state entry is filled with zeros without 'optimizer:': the state is "
              'read whole, to check that zero is a value it holds')
_METADATA_FIELDS = {'tree_metadata', 'use_ocdbt', 'use_zarr3',
                    'store_array_data_equal_to_fill_value', 'custom_metadata'}
_VALUE_FIELDS = {'value_type', 'skip_deserialize', 'write_shape'}
_ARRAY_TYPES = {'jax.Array', 'np.ndarray'}
_KEPT_TYPES = {'scalar'}  # stay where they are, as they are (a step count)


class NotPatchable(Exception):
  """Why an output cannot be written by copy-and-patch (another writer is used)."""


@dataclasses.dataclass
class TreePatch:
  """What one tree item's output changes in the copy of its input (a fresh
  patch: writes into an empty directory)."""
  item: str                        # the item's directory name ('' for a single tree)
  use_ocdbt: bool
  use_zarr3: bool                  # the input's zarr format, which the output keeps
  renamed: dict[str, str]          # new param name -> the old one whose keys it takes
  computed: dict[str, Any]         # param name -> array to write (a fresh patch's scalar: 0-d;
                                   # abstract where streamed in packs; None once written:
                                   # verification needs only the names)
  kept: list[str]                  # names the output holds as the input did
  removed: list[str]               # old names the output does not keep (keys deleted)
  metadata: dict[str, Any]         # the output's _METADATA
  shardings: dict[str, str]        # param name -> serialized sharding, every array leaf
  arrays: list[Any]                # the output's ArrayMetadata, every array leaf
  paths: dict[str, str]            # computed param name -> its leaf path in the migrated state
  fresh: bool = False              # nothing of the input copied: every stored value is computed
  chunk_bytes: int | None = None   # computed leaves' chunks at most this large (None: Orbax's default)
  # Filled by `write_pack`: each computed array's checksum as handed to the encoder,
  # and the CRC32 of each value encoded, by key (every key of every chunk grid).
  encoded: dict[str, str] = dataclasses.field(default_factory=dict)
  crcs: dict[bytes, int] = dataclasses.field(default_factory=dict)
  # A leaf written a slab at a time: its checksum so far, and the rows written.
  encoding: dict[str, transforms.Fingerprinter] = dataclasses.field(default_factory=dict)
  slabbed: dict[str, int] = dataclasses.field(default_factory=dict)

  @property
  def cleared(self) -> list[str]:
    """The names whose stored values go before the computed leaves are
    written: those removed or recomputed (none in a fresh tree)."""
    return [] if self.fresh else [*self.removed, *self.computed]


def _read_json(file: epath.Path) -> Any:
  return json.loads(file.read_text())


def _input_entries(directory: epath.Path) -> tuple[dict[str, Any], dict[str, Any]]:
  """(the input's _METADATA, its entries by parameter name); NotPatchable
  where it holds what this module does not know."""
  meta = _read_json(directory / '_METADATA')
  unknown = set(meta) - _METADATA_FIELDS
  if unknown or not meta.get('store_array_data_equal_to_fill_value'):
    raise NotPatchable(f'{directory}: metadata this writer does not know '
                       f'({sorted(unknown) or "fill-value chunks"})')
  entries = {}
  for entry in meta['tree_metadata'].values():
    value = entry['value_metadata']
    kind = value.get('value_type')
    if set(value) - _VALUE_FIELDS or not (kind in _ARRAY_TYPES or kind in _KEPT_TYPES
                                          or empty_values.is_empty_typestr(kind)):
      raise NotPatchable(f'{directory}: a leaf of type {kind!r}')
    entries['.'.join(str(k['key']) for k in entry['key_metadata'])] = entry
  if meta.get('use_ocdbt') and not (directory / 'manifest.ocdbt').exists():
    raise NotPatchable(f'{directory}: per-process OCDBT databases without a merged root')
  return meta, entries


def _serialized(sharding: jax.sharding.Sharding) -> str:
  return sharding_metadata.from_jax_sharding(sharding).to_serialized_string()


def _tree_patch(directory: epath.Path, item: str, tree: Any, fresh: bool, prefix: str,
                remote: bool, chunk_bytes: int | None) -> TreePatch:
  """The patch that turns the copy of the tree at `directory` into `tree`
  (the output as written: StoredArrays for carried leaves, jax.Arrays for
  computed ones, or their abstract form where they are written in packs
  later, the input's other values where they were); `fresh`: that
  writes `tree` whole into an empty directory instead. `prefix`: what
  comes before the tree's leaf paths in the migrated state; `remote`: the
  output is on GCS."""
  meta, entries = _input_entries(directory)
  use_ocdbt, use_zarr3 = bool(meta['use_ocdbt']), bool(meta.get('use_zarr3'))
  recorded = asyncio.run(array_metadata_store.Store().read(directory)) or {}
  ext = {m.param_name: m.ext_metadata for metas in recorded.values() for m in metas}
  renamed, computed, kept, paths, shardings, arrays, out_entries = {}, {}, set(), {}, {}, [], []
  options = tree_metadata.PYTREE_METADATA_OPTIONS
  for path, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=tree_utils.is_empty_or_leaf)[0]:
    name = checkpoint_io.param_name(path)
    if isinstance(x, (StoredArray, jax.Array, jax.ShapeDtypeStruct)):
      if isinstance(x, StoredArray):
        if fresh:
          raise NotPatchable(f'{name} is carried as stored, which a fresh output copies from nothing')
        if epath.Path(x.directory) != directory:
          raise NotPatchable(f'{name} comes from another item ({x.directory})')
        if x.name == name:
          kept.add(name)
        else:
          renamed[name] = x.name
        chunks, extra = x.chunk_shape, ext.get(x.name)
        written = entries.get(x.name, {}).get('value_metadata', {}).get('write_shape')
      else:
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.extended):
          raise NotPatchable(f'{name} is computed with dtype {x.dtype}')
        computed[name], paths[name] = x, prefix + transforms.key_path(path)
        written = _write_shape(x)
        chunks = _chunks(_array_spec(tuple(x.shape), written, np.dtype(x.dtype), use_ocdbt,
                                     use_zarr3, remote, chunk_bytes))
        extra = None
      shape = tuple(x.shape)
      written = tuple(written or shape)
      shardings[name] = _serialized(x.sharding)
      arrays.append(array_metadata.ArrayMetadata(
          param_name=name, shape=shape, dtype=np.dtype(x.dtype), write_shape=written,
          chunk_shape=tuple(chunks), use_ocdbt=use_ocdbt, use_zarr3=use_zarr3, ext_metadata=extra))
      value = tree_metadata.ValueMetadataEntry('jax.Array', False, written)
    elif empty_values.is_supported_empty_value(x, options):
      value = tree_metadata.ValueMetadataEntry(
          empty_values.get_empty_value_typestr(x, options), True)
    elif entries.get(name, {}).get('value_metadata', {}).get('value_type') in _KEPT_TYPES:
      if fresh:  # written as Orbax's scalar handler writes it: a 0-d array
        computed[name] = np.asarray(x)
      else:
        kept.add(name)  # a value beside params and opt_state: the surgery never touches those
      value = tree_metadata.ValueMetadataEntry(**entries[name]['value_metadata'])
    else:
      raise NotPatchable(f'{name}: a {type(x).__name__} that the input does not hold there')
    out_entries.append(tree_metadata.InternalTreeMetadataEntry(
        str(tuple(str(tree_utils.get_key_name(k)) for k in path)),
        tree_metadata.KeyMetadataEntry.build(path), value))
  stored = {n for n, e in entries.items() if not e['value_metadata'].get('skip_deserialize')}
  if set(renamed) & stored:  # a swap or a shift: each copy's target must be a fresh name
    raise NotPatchable(f'renames onto names the input holds ({sorted(set(renamed) & stored)[:3]})')
  metadata = tree_metadata.InternalTreeMetadata(
      tree_metadata_entries=out_entries, use_ocdbt=use_ocdbt, use_zarr3=use_zarr3,
      custom_metadata=meta.get('custom_metadata'),
      store_array_data_equal_to_fill_value=True, pytree_metadata_options=options)
  if fresh and use_ocdbt and not computed:  # no value to write: no database to make
    raise NotPatchable(f'{directory}: a tree with no stored value')
  removed = set() if fresh else stored - kept - set(computed)
  return TreePatch(item, use_ocdbt, use_zarr3, renamed, computed, sorted(kept), sorted(removed),
                   metadata.to_json(), shardings, arrays, paths, fresh, chunk_bytes)


def _check_surgery(src: epath.Path, layout: checkpoint_io.Layout, removes: str | None,
                   dst: epath.Path | None, fresh: bool = False) -> None:
  """NotPatchable where neither the trees' formats nor their patches matter
  (a fresh output copies nothing: it may remove, and go anywhere)."""
  if layout.msgpack:
    raise NotPatchable('a msgpack input has no stored chunks to copy')
  if fresh:
    return
  if dst is not None and is_gcs(src) != is_gcs(dst):
    raise NotPatchable('input and output on different storage: every byte moves either way')
  if removes:
    raise NotPatchable(f'the surgery {removes}: the copied files would keep it readable')


def check_input(src: epath.Path, layout: checkpoint_io.Layout, removes: str | None,
                dst: epath.Path | None = None, fresh: bool = False) -> None:
  """NotPatchable where this writer cannot write outputs of `src` (at `dst`)
  for a surgery that removes data as `removes` says (`Route.removes`), as
  patches of a copy or (`fresh`) as fresh trees."""
  _check_surgery(src, layout, removes, dst, fresh)
  for name in layout.trees:
    _input_entries(src / name if name else src)


def plan_patch(src: epath.Path, dst: epath.Path, layout: checkpoint_io.Layout,
               written: dict[str, Any], removes: str | None, fresh: bool = False,
               chunk_bytes: int | None = None) -> list[TreePatch]:
  """The patches of each tree item of `src` that make `written` (the items
  to save at `dst`), `fresh` ones if so asked, computed leaves in chunks of
  at most `chunk_bytes` where given; NotPatchable where this writer does
  not apply (each tree's format is checked as its patch is made)."""
  _check_surgery(src, layout, removes, dst, fresh)
  several = len(layout.trees) > 1  # the state is then {item: tree}
  return [_tree_patch(src / name if name else src, name, written[name], fresh,
                      transforms.key_path((jax.tree_util.DictKey(name),)) + '/' if several else '',
                      is_gcs(dst), chunk_bytes) for name in layout.trees]


# --- writing -----------------------------------------------------------------

def _context(use_ocdbt: bool) -> ts.Context:
  return ts_utils.get_ts_context(use_ocdbt=use_ocdbt)


def _write_shape(x: Any) -> tuple[int, ...]:
  """The shape Orbax writes an array in, a chunk each: its shards' (a
  jax.Array spread over devices, or its abstract form), else its own."""
  sharding = getattr(x, 'sharding', None)
  return (tuple(sharding.shard_shape(tuple(x.shape))) if isinstance(sharding, jax.sharding.Sharding)
          else tuple(np.shape(x)))


def _array_spec(shape: tuple[int, ...], write_shape: tuple[int, ...], dtype: np.dtype,
                use_ocdbt: bool, use_zarr3: bool, remote: bool,
                chunk_bytes: int | None = None) -> dict[str, Any]:
  """The TensorStore spec Orbax writes an array of this shape, shard shape
  and dtype with (zarr metadata, chunks, compression), but its kvstore: the
  same for every leaf of a kind on one storage (`remote`: GCS, whose OCDBT
  data files, and so the largest chunks, Orbax keeps smaller). A copy of
  one built once: Orbax's builder costs about 0.1 ms a leaf. `chunk_bytes`:
  chunks of whole trailing rows, as many leading rows (a divisor of the
  write shape's) as fit that many bytes, or one: a leaf too large to hold
  is written a slab of rows at a time, whole chunks each."""
  return copy.deepcopy(_cached_array_spec(shape, write_shape, dtype, use_ocdbt, use_zarr3, remote,
                                          chunk_bytes))


@functools.lru_cache(maxsize=256)
def _cached_array_spec(shape: tuple[int, ...], write_shape: tuple[int, ...], dtype: np.dtype,
                       use_ocdbt: bool, use_zarr3: bool, remote: bool,
                       chunk_bytes: int | None) -> dict[str, Any]:
  parent = epath.Path('gs://bucket' if remote else '/directory')  # never opened
  info = serialization_types.ParamInfo(
      name='array', parent_dir=parent, is_ocdbt_checkpoint=use_ocdbt, use_zarr3=use_zarr3,
      use_compression=True, ocdbt_target_data_file_size=None, ts_context=_context(use_ocdbt))
  spec = ts_utils.build_array_write_spec(
      info, None, global_shape=shape, local_shape=write_shape, dtype=dtype, use_ocdbt=use_ocdbt,
      process_index=None).json
  if chunk_bytes and shape:
    most = chunk_bytes // (math.prod(write_shape[1:]) * dtype.itemsize)
    divisors = {d for i in range(1, math.isqrt(write_shape[0]) + 1) if write_shape[0] % i == 0
                for d in (i, write_shape[0] // i)}
    _set_chunks(spec, [max([d for d in divisors if d <= most] or [1]), *write_shape[1:]])
  return {k: v for k, v in spec.items() if k != 'kvstore'}


def _chunks(spec: dict[str, Any]) -> list[int]:
  """The chunk shape of a zarr write spec (zarr3: its shards', which Orbax
  records as the chunk shape)."""
  meta = spec['metadata']
  return meta['chunks'] if 'chunks' in meta else meta['chunk_grid']['configuration']['chunk_shape']


def _set_chunks(spec: dict[str, Any], chunks: list[int]) -> None:
  """Chunks of `chunks` (zarr3: shards of one chunk each, so a slab of
  whole shards is written alone)."""
  meta = spec['metadata']
  if 'chunks' in meta:
    meta['chunks'] = chunks
    return
  meta['chunk_grid']['configuration']['chunk_shape'] = chunks
  for codec in meta['codecs']:
    if codec['name'] == 'sharding_indexed':
      codec['configuration']['chunk_shape'] = chunks


class Slab(NamedTuple):
  """Rows [start, start + len(value)) of a computed leaf too large to hold
  whole, written on their own (in order, whole chunks of its grid)."""
  value: Any
  start: int


def _chunk_keys(name: str, shape: tuple[int, ...], chunks: tuple[int, ...], use_zarr3: bool,
                rows: tuple[int, int] | None = None) -> set[bytes]:
  """Every key zarr stores an array under: its metadata, and each chunk of
  its grid (v2: '.'-separated indices, '0' for a 0-d array; zarr3's default
  encoding: 'c/' then '/'-separated indices, 'c' for a 0-d array); of the
  chunks, only those of leading `rows` [start, stop) where given."""
  ranges = [range(-(-n // c)) for n, c in zip(shape, chunks)]
  if rows:
    ranges[0] = range(rows[0] // chunks[0], -(-rows[1] // chunks[0]))
  grid = itertools.product(*ranges)
  if use_zarr3:
    return {f'{name}/zarr.json'.encode()} | {'/'.join((name, 'c', *map(str, i))).encode() for i in grid}
  return {f'{name}/.zarray'.encode()} | {f'{name}/{".".join(map(str, i)) or "0"}'.encode() for i in grid}


def _check_slab(patch: TreePatch, name: str, rows: tuple[int, int], x: np.ndarray,
                meta: array_metadata.ArrayMetadata, chunk_rows: int) -> None:
  """A slab must follow the last one of its leaf, in whole chunks of rows,
  with the leaf's trailing shape and dtype: anything else would leave a
  chunk partly written, unseen by the checks that follow."""
  start, stop = rows
  if (start != patch.slabbed.get(name, 0) or start % chunk_rows or
      (stop % chunk_rows and stop != meta.shape[0]) or stop > meta.shape[0] or
      x.shape[1:] != tuple(meta.shape[1:]) or np.dtype(x.dtype) != np.dtype(meta.dtype)):
    raise checkpoint_io.VerificationError(
        f'{name}: rows [{start}, {stop}) of {x.dtype}{list(x.shape)} do not follow rows '
        f'[0, {patch.slabbed.get(name, 0)}) of {np.dtype(meta.dtype)}{list(meta.shape)} in whole '
        f'chunks of {chunk_rows} rows')
  patch.slabbed[name] = stop


_ENCODE_BYTES = 64 << 20  # arrays encoded at once: each is let go once its bytes are out


def _nbytes(x: Any) -> int:
  return transforms.tree_bytes(x.value if isinstance(x, Slab) else x)


def _encode(patch: TreePatch, arrays: dict[str, Any], remote: bool) -> dict[bytes, bytes]:
  """Each of `arrays` (computed leaves of `patch`, or Slabs of them) encoded
  once, into memory, through the zarr driver with Orbax's own write spec
  (for GCS where `remote`), a batch at a time, emptying `arrays` as it
  goes: {its keys, relative to the tree: the bytes to store}. Records in
  `patch.encoded` the checksum of each array as the encoder got it (a
  slabbed one's once its last slab is in); VerificationError where the
  encoder did not make every key of an array's chunk grid (of a slab's
  rows), or an array is not the shape its metadata records."""
  context = ts.Context()
  expected = set()
  meta = {a.param_name: a for a in patch.arrays}

  async def encode(name, x):
    slab = x if isinstance(x, Slab) else None
    x = np.asarray(slab.value if slab else x)
    # Chunked as its metadata records (a fresh tree's scalar has none: one chunk).
    shape, write_shape = ((tuple(meta[name].shape), tuple(meta[name].write_shape)) if name in meta
                          else (x.shape, x.shape))
    if not slab and x.shape != shape:
      raise checkpoint_io.VerificationError(f'{name}: {list(x.shape)} handed to the encoder, '
                                            f'{list(shape)} in its metadata')
    spec = _array_spec(shape, write_shape, np.dtype(x.dtype), patch.use_ocdbt, patch.use_zarr3,
                       remote, patch.chunk_bytes)
    rows = (slab.start, slab.start + len(x)) if slab else None
    if slab:
      _check_slab(patch, name, rows, x, meta[name], _chunks(spec)[0])
    expected.update(_chunk_keys(name, shape, _chunks(spec), patch.use_zarr3, rows))
    if name in patch.paths:
      patch.encoding.setdefault(name, transforms.Fingerprinter()).update(x)
      if not slab or rows[1] == shape[0]:
        patch.encoded[name] = patch.encoding.pop(name).result().checksum
    array = await ts.open({**spec, 'kvstore': {'driver': 'memory', 'path': f'{name}/'}},
                          create=True, open=False, context=context)
    await (array[rows[0]:rows[1]] if slab else array).write(x)

  async def encode_all():
    memory = await ts.KvStore.open({'driver': 'memory'}, context=context)

    async def take(key):  # each value leaves the store as it is copied out
      value = (await memory.read(key)).value
      await memory.write(key, None)
      return value

    encoded = {}
    # A batch at a time, each array let go once encoded.
    for batch in byte_batches(list(arrays), lambda n: _nbytes(arrays[n]), _ENCODE_BYTES):
      await asyncio.gather(*(encode(n, arrays.pop(n)) for n in batch))
      keys = await memory.list()
      encoded.update(zip(keys, await asyncio.gather(*(take(k) for k in keys))))
    return encoded

  encoded = asyncio.run(encode_all())
  if set(encoded) != expected:
    raise checkpoint_io.VerificationError(
        f'the encoder made keys other than the chunk grids\': '
        f"{[k.decode(errors='replace') for k in sorted(set(encoded) ^ expected)[:3]]}")
  return encoded


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


def _checkpoint_metadata(src: epath.Path, layout: checkpoint_io.Layout,
                         provenance: dict[str, Any]) -> dict[str, Any]:
  """The output's _CHECKPOINT_METADATA: the input's handlers, our provenance
  (as the full writer's Orbax save records them)."""
  now = time.time_ns()
  file = src / '_CHECKPOINT_METADATA'
  handlers = (_read_json(file) if file.exists() else {}).get('item_handlers')
  if not handlers:  # a tree saved by a bare handler: one tree item, named ''
    handler = checkpoint_io.HANDLER_CLASSES[layout.items[0][1]]
    handlers = f'{handler.__module__}.{handler.__name__}'
  return {'item_handlers': handlers,
          'metrics': {}, 'performance_metrics': {}, 'init_timestamp_nsecs': now,
          'commit_timestamp_nsecs': now,
          'custom_metadata': checkpoint_io.custom_metadata(src, provenance)}


def write(src: epath.Path, dst: epath.Path, layout: checkpoint_io.Layout,
          patches: list[TreePatch], provenance: dict[str, Any]) -> dict[str, int]:
  """Copy src (for fresh patches, its JSON items only), patch the copy,
  commit it at dst (which must not exist); what was moved:
  {'bytes_copied_server_side', 'bytes_uploaded', 'bytes_linked', 'bytes_copied'}.
  The computed leaves are the patches' own; `begin`, `write_pack` and
  `finish` do the same a pack of computed leaves at a time."""
  work = begin(src, dst, layout, patches)
  arrays = {p.item: p.computed for p in patches}
  for patch in patches:
    patch.computed = dict.fromkeys(patch.computed)  # names only from here: `arrays` has them
  write_pack(work, patches, arrays)
  return finish(src, work, dst, layout, patches, provenance)


@dataclasses.dataclass
class Work:
  """An output being written: where, and what has moved so far."""
  path: epath.Path
  remote: bool
  copied: storage.CopyStats
  uploaded: int = 0


def begin(src: epath.Path, dst: epath.Path, layout: checkpoint_io.Layout,
          patches: list[TreePatch]) -> Work:
  """The copy to patch, its renames and deletes done: not yet visible at
  dst (a temporary directory locally; on GCS, dst without its commit file)."""
  remote = is_gcs(dst)
  path = dst if remote else dst.parent / f'{dst.name}.orbax-checkpoint-tmp-{time.time_ns()}'
  work = Work(path, remote, _copy_input(src, path, layout, patches))
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
    encoded = _encode(patch, arrays[patch.item], work.remote)  # empties it: the arrays may go
    patch.crcs.update((k, zlib.crc32(v)) for k, v in encoded.items())
    work.uploaded += sum(len(v) for v in encoded.values())
    asyncio.run(_store(work.path / patch.item if patch.item else work.path, patch, encoded))


def finish(src: epath.Path, work: Work, dst: epath.Path, layout: checkpoint_io.Layout,
           patches: list[TreePatch], provenance: dict[str, Any]) -> dict[str, int]:
  """Orbax's metadata written and the output committed at dst; what was moved."""
  for patch in patches:
    patch.computed = dict.fromkeys(patch.computed)  # verification needs only the names
    _write_metadata(work.path / patch.item if patch.item else work.path, patch)
  (work.path / '_CHECKPOINT_METADATA').write_text(
      json.dumps(_checkpoint_metadata(src, layout, provenance)))
  commit(work.path, dst)
  copied = work.copied
  return {'bytes_copied_server_side': copied.bytes_copied_server_side,
          'bytes_uploaded': copied.bytes_uploaded + (work.uploaded if work.remote else 0),
          'bytes_linked': copied.bytes_linked, 'bytes_copied': copied.bytes_copied}


def _copy_input(src: epath.Path, work: epath.Path, layout: checkpoint_io.Layout,
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


# --- verifying ---------------------------------------------------------------

class IndexMismatch(checkpoint_io.VerificationError):
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
      raise checkpoint_io.CheckpointError(
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


def verify(src: epath.Path, dst: epath.Path, layout: checkpoint_io.Layout,
           patches: list[TreePatch], prints: dict[str, transforms.Fingerprint]) -> None:
  """The committed output at dst is what was computed (`prints`, by leaf
  path) and carried: Orbax reads its metadata as the tree written, every
  array of its shape and dtype; every array computed was written (by one
  patch or another); and `verify_index`."""
  computed = {path for patch in patches for path in patch.paths.values()}
  if set(prints) != computed:
    raise checkpoint_io.VerificationError(
        f'{dst}: arrays computed but not written, or written but not computed: '
        f'{sorted(set(prints) ^ computed)[:3]}')
  for patch, (name, tree) in zip(patches, checkpoint_io.item_metadata(dst, layout).items()):
    got = {m.name: (tuple(m.shape), np.dtype(m.dtype)) for m in jax.tree_util.tree_leaves(tree)
           if checkpoint_io.is_array(m)}
    want = {a.param_name: (tuple(a.shape), np.dtype(a.dtype)) for a in patch.arrays}
    if got != want:
      raise IndexMismatch(f'{dst / name}: Orbax reads its arrays as '
                          f'{sorted(set(got.items()) ^ set(want.items()))[:3]}')
  verify_index(src, dst, patches, prints)


def verify_index(src: epath.Path, dst: epath.Path, patches: list[TreePatch],
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
    _check_computed(after, patch, {k: v for k, v in new.items() if new_owner[k] in patch.computed},
                    prints)
    if patch.use_ocdbt:
      pairs = {(v[0], v[0]) for v in (new[k] for k in got) if isinstance(v, tuple)}
    else:
      pairs = {(expected[k].decode(), k.decode()) for k in got}
    listing = {**storage.listing(before), **storage.listing(after)} if pairs and is_gcs(after) else {}
    bad = sorted(b for a, b in pairs if not _same_file(before / a, after / b, listing))
    if bad:
      raise IndexMismatch(f"{after}: stored files differ from the input's: {bad[:3]}")


def _check_computed(directory: epath.Path, patch: TreePatch, stored: dict[bytes, Any],
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
                  if p not in prints or patch.encoded.get(n) != prints[p].checksum)
  if differ:
    raise checkpoint_io.VerificationError(
        f'{directory}: the arrays encoded differ from those computed at {differ[:3]}')
  meta = {a.param_name: a for a in patch.arrays}
  grids = set().union(*(_chunk_keys(n, meta[n].shape, meta[n].chunk_shape, patch.use_zarr3)
                        if n in meta else _chunk_keys(n, (), (), patch.use_zarr3)
                        for n in patch.computed))
  if set(patch.crcs) != grids:  # what was encoded, slab by slab or whole, is every chunk recorded
    raise checkpoint_io.VerificationError(
        f"{directory}: the values encoded are not every chunk of the computed leaves' grids "
        f"as their metadata records them: {[k.decode(errors='replace') for k in sorted(set(patch.crcs) ^ grids)[:3]]}")
  if set(stored) != set(patch.crcs):
    raise IndexMismatch(f"{directory}: computed leaves' stored keys differ from those written at "
                        f"{[k.decode(errors='replace') for k in sorted(set(stored) ^ set(patch.crcs))[:3]]}")
  got = _stored_crcs(directory, patch, stored)
  bad = [k.decode(errors='replace') for k, crc in patch.crcs.items() if got.get(k) != crc]
  if bad:
    raise checkpoint_io.VerificationError(
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
