"""Read a checkpoint's trees: straight through TensorStore where that is a
plain read, through Orbax's restore otherwise, and a Flax msgpack file whole
with `flax.serialization.msgpack_restore`.

The state the surgery sees is the tree itself, or, for a step, its one tree
item, or a dict of its tree items by name when there are several (items
`params` and `opt_state` make the usual state).
"""
from __future__ import annotations

import asyncio
import json
from typing import Any

import jax
import numpy as np
from etils import epath
from flax import serialization
import orbax.checkpoint as ocp
from orbax.checkpoint import metadata as ocp_metadata
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
from orbax.checkpoint._src.tree import utils as ocp_tree_utils
import tensorstore as ts

import transforms
from pipeline.checkpoint.errors import CheckpointError
from pipeline.checkpoint.layout import Layout, read_layout
from pipeline.checkpoint.metadata import is_array, item_metadata, skipped, trees
from pipeline.storage import files, kvstores

def _restore_args(like: Any, devices: list[jax.Device]) -> Any:
  """Arrays placed as transforms.placement says; scalars saved as Python
  numbers stay Python numbers; skipped leaves are not read."""
  return jax.tree_util.tree_map(
      lambda x: ocp.ArrayRestoreArgs(sharding=transforms.placement(x.shape, x.dtype, devices))
      if is_array(x) else ocp.RestoreArgs(), like)


def _sequences(node: Any) -> Any:
  """`node` with every dict keyed '0', '1', ... turned back into a list.

  `to_bytes` writes tuples and lists (optax's chain state, say) as such
  dicts, and NamedTuples as dicts by field name. With
  lists, the state is what Orbax restores without a target from a save of
  the typed state, so the output restores typed too, with the optimizer's
  abstract state as target."""
  if not isinstance(node, dict):
    return node
  children = {k: _sequences(v) for k, v in node.items()}
  if children and list(children) == [str(i) for i in range(len(children))]:
    return list(children.values())
  return children


def read_msgpack(path: epath.Path) -> Any:
  """The state in a Flax msgpack file: nested dicts and lists of numpy arrays
  and Python scalars (see `_sequences`)."""
  try:
    return _sequences(serialization.msgpack_restore(path.read_bytes()))
  except ValueError as e:  # msgpack's errors are ValueErrors
    raise CheckpointError(f'{path}: not a readable Flax msgpack checkpoint: {e}') from None


def restore(path: epath.Path, like: dict[str, Any] | None = None,
            devices: list[jax.Device] | None = None) -> tuple[Layout, dict[str, Any]]:
  """(layout, items by name) of a checkpoint, its arrays on `devices` (default:
  this worker's local devices, large arrays spread over them).

  `like` gives each tree item's metadata (from `item_metadata`) or the items as
  we saved them, sparing Orbax's metadata pass; its `skipped` leaves are
  restored as placeholders. A msgpack file is read whole; `like` is not used."""
  devices = devices or jax.local_devices()
  layout = read_layout(path)
  if layout.msgpack:
    return layout, {'': jax.tree_util.tree_map(
        lambda x: jax.device_put(x, transforms.placement(x.shape, x.dtype, devices))
        if isinstance(x, np.ndarray) else x, read_msgpack(path))}
  like = like if like is not None else trees(item_metadata(path, layout))
  direct = _read_directly(path, layout, like, devices)
  if direct is not None:
    return layout, direct
  args = {}
  for name in layout.trees:
    tree = like[name]
    partial = any(skipped(x) for x in jax.tree_util.tree_leaves(tree))
    item = jax.tree_util.tree_map(
        lambda x: ocp.PLACEHOLDER if skipped(x) else x, tree) if partial else None
    args[name] = ocp.args.PyTreeRestore(item=item, restore_args=_restore_args(tree, devices))
  with files.unglobbed(path) as reachable:
    if not layout.is_step:
      return layout, {'': ocp.PyTreeCheckpointer().restore(reachable, args=args[''])}
    handlers = {n: ocp.PyTreeCheckpointHandler() for n in layout.trees}
    restored = ocp.Checkpointer(ocp.CompositeCheckpointHandler(**handlers)).restore(
        reachable, args=ocp.args.Composite(**args))
  return layout, {n: restored[n] for n in layout.trees}


def param_name(keys: tuple[Any, ...]) -> str:
  """Orbax's name of a leaf, under which it stores it: its keys joined by '.'."""
  return '.'.join(str(ocp_tree_utils.get_key_name(k)) for k in keys)


def _is_plain(x: Any) -> bool:
  """A leaf Orbax restores as its stored numbers, nothing more: an array of
  a numeric dtype (not a typed PRNG key, whose impl rides in Orbax's array
  metadata), or a number."""
  if is_array(x):
    return not jax.dtypes.issubdtype(x.dtype, jax.dtypes.extended)
  return isinstance(x, (int, float, np.number, ocp_metadata.ScalarMetadata)) and not isinstance(x, bool)


def _read_spec(directory: epath.Path, param: str, ocdbt: bool, zarr3: bool,
               context: ts.Context | None) -> tuple[dict[str, Any], ts.Context]:
  spec = kvstores.orbax_spec(_orbax_read_spec, str(directory), param, zarr3, ocdbt)
  return spec, context or ts_utils.get_ts_context(use_ocdbt=ocdbt)


def _orbax_read_spec(directory: str, param: str, zarr3: bool, ocdbt: bool) -> dict[str, Any]:
  return ts_utils.ArrayReadSpec(directory, param, use_zarr3=zarr3, use_ocdbt=ocdbt).json


async def read_stored(directory: epath.Path, param: str, ocdbt: bool, zarr3: bool,
                      context: ts.Context | None = None) -> np.ndarray:
  """The stored array `param` of the tree at `directory`, decoded. Reads of
  one tree share a `context`: its OCDBT manifest and index are read once."""
  spec, context = _read_spec(directory, param, ocdbt, zarr3, context)
  store = await ts.open(spec, open=True, context=context)
  return await store.read()


def open_stored(directory: epath.Path, param: str, ocdbt: bool, zarr3: bool) -> ts.TensorStore:
  """The stored array `param` of the tree at `directory`, opened to read
  parts of it, as Orbax's restore reads it."""
  spec, context = _read_spec(directory, param, ocdbt, zarr3, None)
  return ts.open(spec, open=True, context=context).result()


def _array_metadata_files(directory: epath.Path) -> list[epath.Path]:
  files = directory / 'array_metadatas'
  return list(files.iterdir()) if files.exists() else []


def _read_directly(path: epath.Path, layout: Layout, like: dict[str, Any],
                   devices: list[jax.Device]) -> dict[str, Any] | None:
  """The tree items read straight through TensorStore, with the read spec
  Orbax's restore uses (missing chunks an error), placed as it would place
  them: Orbax's own restore costs tens of milliseconds per call in Python
  alone. None where that is not a plain read: a typed key, a leaf of another type, per-process OCDBT without a merged root, an
  older Orbax's tree that did not store chunks equal to the fill value.
  Carried items are not read."""
  reads = []  # (item, param name, directory, ocdbt, zarr3, leaf)
  for name in layout.trees:
    directory = path / name if name else path
    metadata = json.loads((directory / '_METADATA').read_text())
    ocdbt, zarr3 = bool(metadata.get('use_ocdbt')), bool(metadata.get('use_zarr3'))
    if ('use_ocdbt' not in metadata
        or not metadata.get('store_array_data_equal_to_fill_value')  # Orbax fills missing chunks
        or (ocdbt and not (directory / 'manifest.ocdbt').exists())):
      return None
    if any('"ext_metadata": {' in f.read_text() for f in _array_metadata_files(directory)):
      return None  # a typed key: Orbax rebuilds it from its impl
    for keys, leaf in jax.tree_util.tree_flatten_with_path(like[name])[0]:
      if skipped(leaf):
        continue
      if not _is_plain(leaf):
        return None
      reads.append((name, keys, param_name(keys), directory, ocdbt, zarr3, leaf))

  contexts = {o: ts_utils.get_ts_context(use_ocdbt=o) for o in (False, True)}
  values = {}  # not the tasks' results: finished tasks linger in cycles until a collection

  async def read(item, keys, param, directory, ocdbt, zarr3, leaf):  # placed as it comes: the host copy goes
    v = await read_stored(directory, param, ocdbt, zarr3, contexts[ocdbt])
    values[item, tuple(keys)] = (jax.device_put(v, transforms.placement(v.shape, v.dtype, devices))
                                 if is_array(leaf) else v.item())

  async def read_all():
    await asyncio.gather(*(read(*r) for r in reads))

  asyncio.run(read_all())
  return {name: jax.tree_util.tree_map_with_path(
      lambda keys, x, name=name: ocp.PLACEHOLDER if skipped(x) else values[name, tuple(keys)],
      like[name]) for name in layout.trees}


def read_metadata(path: epath.Path) -> tuple[Layout, Any]:
  """(layout, the state's tree of leaf metadata: shape and dtype, no array
  bytes; for a msgpack file, which holds no metadata, its arrays' abstract
  form, from reading the whole file)."""
  layout = read_layout(path)
  if layout.msgpack:
    return layout, jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if isinstance(x, np.ndarray) else x,
        read_msgpack(path))
  return layout, layout.join(trees(item_metadata(path, layout)))
