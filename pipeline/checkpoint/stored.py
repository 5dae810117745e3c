"""A carried leaf: an array the surgery leaves untouched, named by where its
chunks are stored rather than read.

`Surgery.route` proves which output leaves are input leaves (untouched, or
only renamed). Such a leaf is a `StoredArray`: the place of its chunks in
the source checkpoint. Writers copy those chunks key by key; verification
checksums them (keys and bytes) as copied, since it never decodes them.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import zlib
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

from pipeline.storage import kvstores


@dataclasses.dataclass(eq=False)
class StoredArray:
  """An array to be written by copying its stored chunks from `directory`
  (a checkpoint tree's directory) where Orbax named it `name`."""
  directory: str
  name: str
  use_ocdbt: bool
  use_zarr3: bool
  shape: tuple[int, ...]
  dtype: np.dtype
  chunk_shape: tuple[int, ...]
  sharding: jax.sharding.Sharding  # what the output records, as for a restored array
  checksum: str | None = None      # of the chunks, once copied

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


class StoredFormat(NamedTuple):
  """How a checkpoint tree stores its arrays."""
  use_ocdbt: bool
  use_zarr3: bool


def stored_format(tree: epath.Path) -> StoredFormat:
  """The format of the tree at `tree`, from its files (two small reads)."""
  metadata = tree / '_METADATA'
  zarr3 = metadata.exists() and bool(json.loads(metadata.read_text()).get('use_zarr3'))
  return StoredFormat(ocp.type_handlers.is_ocdbt_checkpoint(tree), zarr3)


def stand_ins(place: Callable[[Any], jax.sharding.Sharding],
              known: dict[str, StoredFormat] | None = None) -> Callable[[Any], StoredArray]:
  """A function from a leaf's Orbax ArrayMetadata to its StoredArray, placed
  as `place` says; each tree's format as `known` says (by its directory:
  `metadata.stored_formats`), else read from its files once."""
  formats = dict(known or {})

  def stand_in(meta: Any) -> StoredArray:
    directory = str(meta.directory)
    if directory not in formats:
      formats[directory] = stored_format(epath.Path(directory))
    chunks = meta.storage.chunk_shape if meta.storage and meta.storage.chunk_shape else meta.shape
    return StoredArray(directory, meta.name, *formats[directory], tuple(meta.shape),
                       np.dtype(meta.dtype), tuple(chunks), place(meta))

  return stand_in


def checksum(chunks: dict[bytes, bytes]) -> str:
  crc = 0
  for key in sorted(chunks):
    crc = zlib.crc32(chunks[key], zlib.crc32(key + len(chunks[key]).to_bytes(8, 'little'), crc))
  return f'stored:{crc:08x}'


async def read_chunks(root: ts.KvStore, name: str) -> dict[bytes, bytes]:
  """Every stored key (relative to the array) and value of array `name`."""
  store = root / f'{name}/'
  keys = await store.list()
  try:
    values = await asyncio.gather(*(store.read(k) for k in keys))
  except ValueError as e:  # TensorStore's message does not name the array
    raise ValueError(f'{e} (reading the stored chunks of {name})') from e
  return {k: v.value for k, v in zip(keys, values)}


def stored_checksums(directory: str, names: Sequence[str]) -> list[str]:
  """The checksums of arrays `names`' stored chunks in the checkpoint tree at `directory`."""
  async def read_all():
    root = await kvstores.open_store(
        directory, ocp.type_handlers.is_ocdbt_checkpoint(epath.Path(directory)))
    return [checksum(await read_chunks(root, n)) for n in names]
  return asyncio.run(read_all())
