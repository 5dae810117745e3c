"""Copy-and-patch, encoding: computed leaves as the bytes the zarr driver
stores (zarr v2 or zarr3, OCDBT or per-array), with the write spec Orbax
itself would use, into memory; a leaf too large to hold is encoded a Slab
of whole chunks of rows at a time. The keys each array's chunk grid makes
are what verification expects."""
from __future__ import annotations

import asyncio
import copy
import functools
import itertools
import math
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import numpy as np
import tensorstore as ts
from etils import epath
from orbax.checkpoint._src.metadata import array_metadata
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
from orbax.checkpoint._src.serialization import types as serialization_types

import transforms
from pipeline import checkpoint
from pipeline.compute.batching import byte_batches

if TYPE_CHECKING:
  from pipeline.write.copy_patch.patches import PatchProgress, TreePatch


def _context(use_ocdbt: bool) -> ts.Context:
  return ts_utils.get_ts_context(use_ocdbt=use_ocdbt)


def write_shape(x: Any) -> tuple[int, ...]:
  """The shape Orbax writes an array in, a chunk each: its shards' (a
  jax.Array spread over devices, or its abstract form), else its own."""
  sharding = getattr(x, 'sharding', None)
  return (tuple(sharding.shard_shape(tuple(x.shape))) if isinstance(sharding, jax.sharding.Sharding)
          else tuple(np.shape(x)))


def array_spec(shape: tuple[int, ...], write_shape: tuple[int, ...], dtype: np.dtype,
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


def spec_chunks(spec: dict[str, Any]) -> list[int]:
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


def chunk_keys(name: str, shape: tuple[int, ...], chunks: tuple[int, ...], use_zarr3: bool,
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


def _check_slab(progress: PatchProgress, name: str, rows: tuple[int, int], x: np.ndarray,
                meta: array_metadata.ArrayMetadata, chunk_rows: int) -> None:
  """A slab must follow the last one of its leaf, in whole chunks of rows,
  with the leaf's trailing shape and dtype: anything else would leave a
  chunk partly written, unseen by the checks that follow."""
  start, stop = rows
  if (start != progress.slabbed.get(name, 0) or start % chunk_rows or
      (stop % chunk_rows and stop != meta.shape[0]) or stop > meta.shape[0] or
      x.shape[1:] != tuple(meta.shape[1:]) or np.dtype(x.dtype) != np.dtype(meta.dtype)):
    raise checkpoint.VerificationError(
        f'{name}: rows [{start}, {stop}) of {x.dtype}{list(x.shape)} do not follow rows '
        f'[0, {progress.slabbed.get(name, 0)}) of {np.dtype(meta.dtype)}{list(meta.shape)} in whole '
        f'chunks of {chunk_rows} rows')
  progress.slabbed[name] = stop


_ENCODE_BYTES = 64 << 20  # arrays encoded at once: each is let go once its bytes are out


def _nbytes(x: Any) -> int:
  return transforms.tree_bytes(x.value if isinstance(x, Slab) else x)


def encode(patch: TreePatch, progress: PatchProgress, arrays: dict[str, Any],
           remote: bool) -> dict[bytes, bytes]:
  """Each of `arrays` (computed leaves of `patch`, or Slabs of them) encoded
  once, into memory, through the zarr driver with Orbax's own write spec
  (for GCS where `remote`), a batch at a time, emptying `arrays` as it
  goes: {its keys, relative to the tree: the bytes to store}. Records in
  `progress.encoded` the checksum of each array as the encoder got it (a
  slabbed one's once its last slab is in); VerificationError where the
  encoder did not make every key of an array's chunk grid (of a slab's
  rows), or an array is not the shape its metadata records."""
  context = ts.Context()
  expected = set()
  meta = {a.param_name: a for a in patch.arrays}

  async def encode_one(name, x):
    slab = x if isinstance(x, Slab) else None
    x = np.asarray(slab.value if slab else x)
    # Chunked as its metadata records (a fresh tree's scalar has none: one chunk).
    shape, write_shape = ((tuple(meta[name].shape), tuple(meta[name].write_shape)) if name in meta
                          else (x.shape, x.shape))
    if not slab and x.shape != shape:
      raise checkpoint.VerificationError(f'{name}: {list(x.shape)} handed to the encoder, '
                                            f'{list(shape)} in its metadata')
    spec = array_spec(shape, write_shape, np.dtype(x.dtype), patch.use_ocdbt, patch.use_zarr3,
                       remote, patch.chunk_bytes)
    rows = (slab.start, slab.start + len(x)) if slab else None
    if slab:
      _check_slab(progress, name, rows, x, meta[name], spec_chunks(spec)[0])
    expected.update(chunk_keys(name, shape, spec_chunks(spec), patch.use_zarr3, rows))
    if name in patch.paths:
      progress.encoding.setdefault(name, transforms.Fingerprinter()).update(x)
      if not slab or rows[1] == shape[0]:
        progress.encoded[name] = progress.encoding.pop(name).result().checksum
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
      await asyncio.gather(*(encode_one(n, arrays.pop(n)) for n in batch))
      keys = await memory.list()
      encoded.update(zip(keys, await asyncio.gather(*(take(k) for k in keys))))
    return encoded

  encoded = asyncio.run(encode_all())
  if set(encoded) != expected:
    raise checkpoint.VerificationError(
        f'the encoder made keys other than the chunk grids\': '
        f"{[k.decode(errors='replace') for k in sorted(set(encoded) ^ expected)[:3]]}")
  return encoded
