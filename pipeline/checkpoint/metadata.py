"""Orbax's metadata of a checkpoint's trees (shapes, dtypes, where each array
is stored), read without reading arrays; and our provenance, recorded in the
output's custom metadata by the same atomic commit as the arrays.

A run's checkpoints mostly share a few tree structures: the metadata Orbax
builds is kept by a digest of what it is built from, and reused.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import metadata as ocp_metadata

import transforms
from pipeline import storage
from pipeline.checkpoint.errors import CheckpointError
from pipeline.checkpoint.layout import Layout, _check_json
from pipeline.checkpoint.stored import StoredArray, StoredFormat
from pipeline.storage import files

PROVENANCE_KEY = 'ckpt_surgery'


class TreeMetadata(NamedTuple):
  """Orbax's metadata of one tree: its tree of leaf metadata, and its format."""
  tree: Any
  use_zarr3: bool
  use_ocdbt: bool


_TREES: dict[str, TreeMetadata] = {}  # by _stored_metadata digest: a run's trees share a few
_TREES_KEPT = 64


def _stored_metadata(path: epath.Path, metadata_text: str) -> str | None:
  """A digest of all Orbax reads a tree's metadata from (_METADATA,
  _sharding, every array's zarr metadata, inline in the OCDBT index), or
  None where that is not one cheap read (per-array directories)."""
  if not (path / 'manifest.ocdbt').exists():
    return None
  zarr = sorted((k, v) for k, v in storage.ocdbt_index(path).items()
                if k.endswith((b'/.zarray', b'/zarr.json')))
  if not all(isinstance(v, bytes) for _, v in zarr):
    return None  # not inline (another writer's database): not one cheap read
  sharding = (path / '_sharding').read_text() if (path / '_sharding').exists() else ''
  return hashlib.sha256(repr((metadata_text, sharding, zarr)).encode()).hexdigest()


def _tree_metadata(path: epath.Path) -> TreeMetadata:
  """Orbax's metadata of one tree. Orbax builds it in tens of milliseconds;
  a tree whose stored metadata another had already is its copy, with its
  own directory."""
  text = _check_json(path / '_METADATA')
  try:
    key = _stored_metadata(path, text)
  except ValueError:  # an index TensorStore cannot read: Orbax says what is wrong below
    key = None
  if key in _TREES:
    return _at(_TREES[key], path)
  with files.unglobbed(path) as reachable:
    metadata = ocp.PyTreeCheckpointer().metadata(reachable).item_metadata
  if metadata is None:
    raise CheckpointError(f'{path}: {_why_no_metadata(path)}')
  use_ocdbt = json.loads(text).get('use_ocdbt')
  if use_ocdbt is None:  # an older Orbax's tree: the files say
    use_ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(path)
  found = _at(TreeMetadata(metadata.tree, metadata.use_zarr3, bool(use_ocdbt)), path)
  if key is not None and len(_TREES) < _TREES_KEPT:
    _TREES[key] = found
  return found


def _why_no_metadata(path: epath.Path) -> str:
  """Why Orbax found no tree metadata at `path` (it says only that)."""
  if not (path / 'manifest.ocdbt').exists() and any(
      p.name.startswith('ocdbt.process_') for p in files.children(path)):
    return 'manifest.ocdbt is missing'
  if not files.is_gcs(path):  # a file Orbax could not open: name it
    for directory, _, names in os.walk(path):
      for name in names:
        file = os.path.join(directory, name)
        try:
          with open(file, 'rb') as f:
            f.read(1)
        except OSError as e:
          return f'{os.path.relpath(file, path)} cannot be read ({e.strerror})'
  try:
    storage.ocdbt_index(path)
  except ValueError as e:  # TensorStore names what it could not read in its index
    return f'its OCDBT index cannot be read ({str(e).splitlines()[0][:300]})'
  return 'Orbax reads no tree metadata there'


def _at(metadata: TreeMetadata, path: epath.Path) -> TreeMetadata:
  """A tree's metadata with each leaf's directory `path` (a tree whose stored
  metadata another's has, or read through another name)."""
  return metadata._replace(tree=jax.tree_util.tree_map(
      lambda m: dataclasses.replace(m, directory=path) if hasattr(m, 'directory') else m,
      metadata.tree))


def item_metadata(path: epath.Path, layout: Layout) -> dict[str, Any]:
  """{tree item name: Orbax's metadata of that tree} (Orbax opens every array for it)."""
  return {name: _tree_metadata(path / name if name else path) for name in layout.trees}


def stored_formats(meta: dict[str, TreeMetadata]) -> dict[str, StoredFormat]:
  """{a tree's directory: how it stores its arrays}, from `item_metadata`:
  what `stand_ins` would otherwise read from each tree's files."""
  return {str(leaf.directory): StoredFormat(m.use_ocdbt, m.use_zarr3)
          for m in meta.values() for leaf in jax.tree_util.tree_leaves(m.tree)
          if hasattr(leaf, 'directory')}


def trees(meta: dict[str, Any]) -> dict[str, Any]:
  """{tree item name: its tree of leaf metadata}, from `item_metadata`."""
  return {name: m.tree for name, m in meta.items()}


def skipped(x: Any) -> bool:
  """A leaf not to restore: a placeholder, or an array whose bytes are copied."""
  return x is ocp.PLACEHOLDER or isinstance(x, StoredArray)


def is_array(x: Any) -> bool:
  """An array leaf of a restored tree, its metadata or its abstract form (not a
  saved Python scalar, nor a skipped leaf)."""
  return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)) or (
      isinstance(x, ocp_metadata.ArrayMetadata) and not isinstance(x, ocp_metadata.ScalarMetadata))


def custom_metadata(source: epath.Path, provenance: dict[str, Any]) -> dict[str, Any]:
  """The output's custom metadata: the input's (a training loop's own), with
  our provenance under PROVENANCE_KEY."""
  custom = {}
  if (source / '_CHECKPOINT_METADATA').exists():
    custom = dict(ocp_metadata.get_step_metadata(source).custom_metadata or {})
  return {**custom, PROVENANCE_KEY: provenance}


def read_provenance(path: epath.Path) -> dict[str, Any] | None:
  """What ckpt-surgery recorded in a checkpoint it wrote; None for others."""
  if not (path / '_CHECKPOINT_METADATA').exists():
    return None
  custom = ocp_metadata.get_step_metadata(path).custom_metadata or {}
  return custom.get(PROVENANCE_KEY)


def array_specs(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  """{leaf path: (shape, dtype)} of the arrays in a restored tree, in its
  Orbax metadata or in its abstract form alike (numbers saved as Python
  scalars are not arrays; skipped leaves are not counted)."""
  return {transforms.key_path(k): (tuple(x.shape), str(x.dtype))
          for k, x in jax.tree_util.tree_flatten_with_path(tree)[0] if is_array(x)}


def abstract(tree: Any) -> Any:
  """`tree` with its arrays replaced by their shape, dtype and sharding."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
      if isinstance(x, jax.Array) else x, tree)
