"""Copy-and-patch, patches: the patch that turns a copy of each tree item of
the input into the output (`TreePatch`), or why this writer does not apply
(`NotPatchable`). From the input's metadata and the output's tree alone:
no array is read or written here."""
from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

import jax
import numpy as np
from etils import epath
from orbax.checkpoint._src.metadata import array_metadata, array_metadata_store, empty_values
from orbax.checkpoint._src.metadata import sharding as sharding_metadata
from orbax.checkpoint._src.metadata import tree as tree_metadata
from orbax.checkpoint._src.tree import utils as tree_utils

import transforms
from pipeline import checkpoint
from pipeline.checkpoint import StoredArray
from pipeline.storage.files import is_gcs
from pipeline.write.copy_patch import encoding


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


@dataclasses.dataclass(frozen=True)
class TreePatch:
  """What one tree item's output changes in the copy of its input (a fresh
  patch: writes into an empty directory). Fixed once made: nothing writes into it;
  what writing it has done is its `PatchProgress`."""
  item: str                        # the item's directory name ('' for a single tree)
  use_ocdbt: bool
  use_zarr3: bool                  # the input's zarr format, which the output keeps
  renamed: dict[str, str]          # new param name -> the old one whose keys it takes
  computed: tuple[str, ...]        # param names whose values are written (`make_patches` gives them)
  kept: list[str]                  # names the output holds as the input did
  removed: list[str]               # old names the output does not keep (keys deleted)
  metadata: dict[str, Any]         # the output's _METADATA
  shardings: dict[str, str]        # param name -> serialized sharding, every array leaf
  arrays: list[Any]                # the output's ArrayMetadata, every array leaf
  paths: dict[str, str]            # computed param name -> its leaf path in the migrated state
  fresh: bool = False              # nothing of the input copied: every stored value is computed
  chunk_bytes: int | None = None   # computed leaves' chunks at most this large (None: Orbax's default)

  @property
  def cleared(self) -> list[str]:
    """The names whose stored values go before the computed leaves are
    written: those removed or recomputed (none in a fresh tree)."""
    return [] if self.fresh else [*self.removed, *self.computed]


@dataclasses.dataclass
class PatchProgress:
  """What writing one TreePatch has done, filled pack by pack (`write_pack`)
  and read by `verify`."""
  encoded: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> checksum as encoded
  crcs: dict[bytes, int] = dataclasses.field(default_factory=dict)   # key -> CRC32 of its value
  # A leaf written a slab at a time: its checksum so far, and the rows written.
  encoding: dict[str, transforms.Fingerprinter] = dataclasses.field(default_factory=dict)
  slabbed: dict[str, int] = dataclasses.field(default_factory=dict)


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
                remote: bool, chunk_bytes: int | None) -> tuple[TreePatch, dict[str, Any]]:
  """(the patch, the values it writes by param name) that turns the copy of the tree at `directory` into `tree`
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
    name = checkpoint.param_name(path)
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
        written = encoding.write_shape(x)
        chunks = encoding.spec_chunks(encoding.array_spec(
            tuple(x.shape), written, np.dtype(x.dtype), use_ocdbt,
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
  return TreePatch(item, use_ocdbt, use_zarr3, renamed, tuple(computed), sorted(kept),
                   sorted(removed), metadata.to_json(), shardings, arrays, paths, fresh,
                   chunk_bytes), computed


def _check_surgery(src: epath.Path, layout: checkpoint.Layout, removes: str | None,
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


def check_input(src: epath.Path, layout: checkpoint.Layout, removes: str | None,
                dst: epath.Path | None = None, fresh: bool = False) -> None:
  """NotPatchable where this writer cannot write outputs of `src` (at `dst`)
  for a surgery that removes data as `removes` says (`Route.removes`), as
  patches of a copy or (`fresh`) as fresh trees."""
  _check_surgery(src, layout, removes, dst, fresh)
  for name in layout.trees:
    _input_entries(src / name if name else src)


def make_patches(src: epath.Path, dst: epath.Path, layout: checkpoint.Layout,
               written: dict[str, Any], removes: str | None, fresh: bool = False,
               chunk_bytes: int | None = None
               ) -> tuple[list[TreePatch], dict[str, dict[str, Any]]]:
  """(the patches of each tree item of `src` that make `written`, the items
  to save at `dst`; the values they write, {item: {param name: array, or its
  abstract form where it is written in packs later}}): `fresh` ones if so
  asked, computed leaves in chunks of at most `chunk_bytes` where given;
  NotPatchable where this writer does not apply (each tree's format is
  checked as its patch is made)."""
  _check_surgery(src, layout, removes, dst, fresh)
  several = len(layout.trees) > 1  # the state is then {item: tree}
  planned = [_tree_patch(src / name if name else src, name, written[name], fresh,
                         transforms.key_path((jax.tree_util.DictKey(name),)) + '/' if several else '',
                         is_gcs(dst), chunk_bytes) for name in layout.trees]
  return [patch for patch, _ in planned], {patch.item: values for patch, values in planned}
