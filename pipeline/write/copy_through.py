"""Copy-through: a leaf the surgery does not touch keeps its stored bytes.

`Surgery.route` proves which output leaves are input leaves (untouched, or
only renamed). Such a leaf is not restored, not moved through a device and
not re-encoded: it is a `StoredArray`, the place of its chunks in the source
checkpoint, and the output is still written by Orbax, whose handler for
`jax.Array` we extend. For a StoredArray it copies the array's zarr chunks
key by key from the source's store to the output's (OCDBT or one directory
per array, either way round), reading no value, and records the same
sharding and array metadata Orbax records for an array it wrote. So the
output is an ordinary Orbax checkpoint, and Orbax restores it exactly as it
restores the full path's output.

Verification cannot checksum values it never decoded: a StoredArray's
checksum is over its stored chunks (keys and bytes) as copied, compared with
the output's chunks read back after the commit.

This leans on Orbax internals (its tensorstore spec builders, the sharding
and array-metadata writers), so `pyproject.toml` bounds orbax-checkpoint's
version, and tests/test_copy_through.py pins the behaviour.
"""
from __future__ import annotations

import asyncio
import dataclasses
import threading
from typing import Any, Sequence

import jax
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
from orbax.checkpoint import future as ocp_future
from orbax.checkpoint._src.metadata import array_metadata_store
from orbax.checkpoint._src.multihost import multihost
from orbax.checkpoint._src.serialization import jax_array_handlers, ocdbt_utils
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

from pipeline import storage
from pipeline.checkpoint.stored import StoredArray, checksum, read_chunks
from pipeline.compute.batching import byte_batches


_TRANSACTION_BYTES = 64 << 20  # copy in batches: concurrent reads, few commits, bounded memory


class CopyThroughArrayHandler(ocp.type_handlers.ArrayHandler):
  """Orbax's jax.Array handler, which also writes StoredArrays by copying.

  One instance serves both types, so each save hands it its arrays and its
  StoredArrays in one call: the copies then append their array metadata after
  the arrays' own, instead of racing them for the same file.
  """

  def __init__(self):
    super().__init__(array_metadata_store=array_metadata_store.Store())

  async def serialize(self, values: Sequence[Any], infos: Sequence[Any],
                      args: Sequence[ocp.SaveArgs] | None = None) -> list[Any]:
    args = args or [ocp.SaveArgs()] * len(values)
    stored = [isinstance(v, StoredArray) for v in values]
    pick = lambda seq, want: [x for x, s in zip(seq, stored) if s == want]
    futures = []
    if not all(stored):
      futures = list(await super().serialize(pick(values, False), pick(infos, False),
                                             pick(args, False)))
    if any(stored):
      futures.append(ocp_future.CommitFutureAwaitingContractedSignals(
          self._copy(pick(values, True), pick(infos, True), pick(args, True), list(futures)),
          name='copy_through'))
    return futures

  async def _copy(self, values: list[StoredArray], infos: list[Any], args: list[Any],
                  after: list[Any]) -> None:
    for f in after:  # the arrays' writes, and their array metadata, first
      await asyncio.to_thread(f.result)
    sources: dict[tuple[str, bool], ts.KvStore] = {}
    for value in values:
      if (value.directory, value.use_ocdbt) not in sources:
        sources[value.directory, value.use_ocdbt] = await storage.open_store(value.directory,
                                                                             value.use_ocdbt)
    # What makes stored bits more than an array (a typed PRNG key's impl) rides along.
    ext_metadata = {}
    for directory in {v.directory for v in values}:
      recorded = await array_metadata_store.Store().read(epath.Path(directory)) or {}
      ext_metadata.update({(directory, m.param_name): m.ext_metadata
                           for metas in recorded.values() for m in metas if m.ext_metadata})
    await asyncio.gather(*(info.await_path_creation() for info in infos))
    writes = []
    for value, info, arg in zip(values, infos, args):
      if value.use_zarr3 != bool(info.use_zarr3):  # the copied chunks would not be the tree's format
        raise ValueError(f'{info.name}: stored as zarr{3 if value.use_zarr3 else 2}, copied into '
                         f'a zarr{3 if info.use_zarr3 else 2} tree')
      use_ocdbt = bool(info.is_ocdbt_checkpoint)
      writes.append(ts_utils.build_array_write_spec(
          info=info, arg=arg, global_shape=value.shape, local_shape=value.shape,
          dtype=value.dtype, use_ocdbt=use_ocdbt, metadata_key=self._metadata_key,
          process_index=ocdbt_utils.get_process_index_for_subdir(use_ocdbt),
          ext_metadata=ext_metadata.get((value.directory, value.name))))
    # The store Orbax writes this save's arrays to (its process's OCDBT, or files).
    spec = writes[0].json['kvstore']
    target = await ts.KvStore.open({**spec, 'path': spec['path'][:-len(infos[0].name)]},
                                   context=ts_utils.get_ts_context(use_ocdbt=bool(infos[0].is_ocdbt_checkpoint)))

    async def copy(value, info, txn):
      chunks = await read_chunks(sources[value.directory, value.use_ocdbt], value.name)
      store = target.with_transaction(txn) / f'{info.name}/'
      await asyncio.gather(*(store.write(k, v) for k, v in chunks.items()))
      value.checksum = checksum(chunks)

    for batch in byte_batches(list(zip(values, infos)), lambda pair: pair[0].nbytes,
                              _TRANSACTION_BYTES):
      txn = ts.Transaction()
      await asyncio.gather(*(copy(value, info, txn) for value, info in batch))
      await txn.commit_async()
    metadatas = [dataclasses.replace(w.metadata, chunk_shape=v.chunk_shape)
                 for w, v in zip(writes, values)]
    await jax_array_handlers._async_serialize_shardings(  # pylint: disable=protected-access
        [v.sharding for v in values], infos, primary_host=self._primary_host)
    if self._array_metadata_store is not None:
      await self._array_metadata_store.write(
          checkpoint_dir=infos[0].parent_dir, array_metadatas=metadatas,
          process_index=multihost.process_index())


_INSTALLING = threading.Lock()


def install() -> None:
  """Make Orbax write StoredArrays: one handler for them and for jax.Array
  (for arrays it is Orbax's own). Idempotent and thread-safe; affects this
  process only."""
  with _INSTALLING:
    if isinstance(ocp.type_handlers.get_type_handler(jax.Array), CopyThroughArrayHandler):
      return
    handler = CopyThroughArrayHandler()
    ocp.type_handlers.register_type_handler(StoredArray, handler, override=True)
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
