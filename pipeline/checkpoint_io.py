"""Read and write one checkpoint, every byte through Orbax (legacy Flax msgpack inputs aside).

A checkpoint is either one tree (a directory Orbax's PyTree/Standard handler
wrote) or a `CheckpointManager` step: a directory of items, each with its own
handler, recorded in `_CHECKPOINT_METADATA`. We keep that layout: the output
of a step is a step with the same items and handlers, so the user's
`CheckpointManager` restores it as it restored the input.

A legacy Flax checkpoint (one file written by `flax.serialization.to_bytes`
or by `flax.training.checkpoints.save_checkpoint` without Orbax) is read
whole with `flax.serialization.msgpack_restore`, and its output is an
ordinary single-tree PyTree checkpoint. It has no metadata apart from its
arrays: what needs shapes (`read_metadata`) reads the whole file.

The state the surgery sees is the tree itself, or, for a step, its one tree
item, or a dict of its tree items by name when there are several (items
`params` and `opt_state` make the usual state). JSON items ride along.

Provenance goes into the output's `_CHECKPOINT_METADATA` custom metadata,
written by the same atomic commit as the arrays.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
from typing import Any, NamedTuple

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
from pipeline import copy_through, files, storage

PROVENANCE_KEY = 'ckpt_surgery'
# Orbax v1's PyTreeHandler stores a tree as v0's PyTree handler does (it
# delegates to it): it is read and written by that handler, under its own name.
TREE_HANDLERS = {
    'PyTreeCheckpointHandler': ocp.args.PyTreeSave,
    'StandardCheckpointHandler': ocp.args.StandardSave,
    'PyTreeHandler': ocp.args.PyTreeSave,
}
HANDLER_CLASSES = {
    'PyTreeCheckpointHandler': ocp.PyTreeCheckpointHandler,
    'StandardCheckpointHandler': ocp.StandardCheckpointHandler,
    'PyTreeHandler': ocp.PyTreeCheckpointHandler,
}
# What Orbax itself writes at a step's top level; any other file there (v1's
# `orbax.checkpoint` marker, a user's notes) is carried as it is.
ORBAX_STEP_FILES = frozenset({'_CHECKPOINT_METADATA', files.COMMIT_FILE})


class CheckpointError(ValueError):
  """A checkpoint cannot be read or written as asked."""


class VerificationError(RuntimeError):
  """What was committed is not what was computed; the output was removed."""


@dataclasses.dataclass(frozen=True)
class Layout:
  """How a checkpoint (a directory, or a Flax msgpack file) stores its state.

  `items` maps item name -> handler class name; a single-tree checkpoint has
  one item named '' (the directory itself). `handlers`: the handler names as
  the input records them, which the output records too. `beside`: the files
  at a step's top level that are not Orbax's own. `msgpack`: the checkpoint
  is a Flax msgpack file, one tree, written out as a PyTree checkpoint.

  Items that are not trees (metrics, JSON, a dataset iterator's state, any
  handler) are carried: copied byte for byte, never decoded.
  """
  items: tuple[tuple[str, str], ...]
  msgpack: bool = False
  handlers: Any = None
  beside: tuple[str, ...] = ()

  @property
  def is_step(self) -> bool:
    return self.items[0][0] != ''

  @property
  def trees(self) -> list[str]:
    return [name for name, handler in self.items if handler in TREE_HANDLERS]

  @property
  def carried(self) -> list[str]:
    return [name for name, handler in self.items if handler not in TREE_HANDLERS]

  def join(self, items: dict[str, Any]) -> Any:
    """The state the surgery sees, from the restored items."""
    trees = self.trees
    return items[trees[0]] if len(trees) == 1 else {n: items[n] for n in trees}

  def split(self, state: Any, items: dict[str, Any]) -> dict[str, Any]:
    """The items to save: `items` with the trees taken from `state`."""
    trees = self.trees
    if len(trees) == 1:
      return {**items, trees[0]: state}
    return {**items, **{n: state[n] for n in trees}}


def _handler_name(qualified: str) -> str:
  return qualified.rsplit('.', 1)[-1]


def is_checkpoint(path: epath.Path) -> bool:
  """A committed checkpoint directory (not temporary, commit marker present)."""
  has_metadata = (path / '_CHECKPOINT_METADATA').exists() or (path / '_METADATA').exists()
  return (has_metadata and not ocp.utils.is_tmp_checkpoint(path)
          and ocp.utils.is_checkpoint_finalized(path))


_MAP_KEY_AT = {0xde: 3, 0xdf: 5}  # map16, map32 -> where the first key starts


def _is_str_header(byte: int) -> bool:
  return 0xa0 <= byte <= 0xbf or byte in (0xd9, 0xda, 0xdb)  # fixstr, str8, str16, str32


def is_msgpack(path: epath.Path) -> bool:
  """A file that begins as `flax.serialization.to_bytes` writes a state: a
  msgpack map (fixmap, map16 or map32) whose first key is a string. Reads
  its first 6 bytes only; the string key tells it from other files that
  begin with a map byte by chance (a TFRecord event file can)."""
  if not path.is_file():
    return False
  with path.open('rb') as f:
    head = f.read(6)
  if not head:
    return False
  key = 1 if 0x81 <= head[0] <= 0x8f else _MAP_KEY_AT.get(head[0])
  return key is not None and len(head) > key and _is_str_header(head[key])


def read_layout(path: epath.Path) -> Layout:
  if not (path / '_CHECKPOINT_METADATA').exists():
    if (path / '_METADATA').exists():  # written by a bare PyTree handler
      return Layout(items=(('', 'PyTreeCheckpointHandler'),))
    if is_msgpack(path):
      return Layout(items=(('', 'PyTreeCheckpointHandler'),), msgpack=True)
    if not path.exists():
      raise CheckpointError(f'{path}: does not exist')
    raise CheckpointError(f'{path}: not an Orbax checkpoint (no _CHECKPOINT_METADATA or _METADATA) '
                          'nor a Flax msgpack file')
  _check_json(path / '_CHECKPOINT_METADATA')
  handlers = ocp_metadata.get_step_metadata(path).item_handlers
  if isinstance(handlers, str) or handlers is None:
    name = _handler_name(handlers or 'PyTreeCheckpointHandler')
    if name not in TREE_HANDLERS:
      raise CheckpointError(f'{path}: handler {name} is not a pytree handler')
    return Layout(items=(('', name),), handlers=handlers)
  items = tuple(sorted((n, _handler_name(h)) for n, h in handlers.items()))
  if not any(h in TREE_HANDLERS for _, h in items):
    raise CheckpointError(f'{path}: no pytree item among {[n for n, _ in items]}')
  beside = tuple(sorted(c.name for c in files.children(path)
                        if c.name not in ORBAX_STEP_FILES and c.name not in handlers))
  return Layout(items=items, handlers=handlers, beside=beside)


def _check_json(file: epath.Path) -> str:
  """A metadata file Orbax will read, its text: refused in one line naming
  it, where Orbax would say only that no metadata was found."""
  try:
    text = file.read_text()
    json.loads(text)
    return text
  except (OSError, ValueError) as e:
    cause = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
    raise CheckpointError(f'{file}: unreadable or not JSON ({cause})') from None


class TreeMetadata(NamedTuple):
  """Orbax's metadata of one tree: its tree of leaf metadata, and its format."""
  tree: Any
  use_zarr3: bool


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
  found = _at(TreeMetadata(metadata.tree, metadata.use_zarr3), path)
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


def trees(meta: dict[str, Any]) -> dict[str, Any]:
  """{tree item name: its tree of leaf metadata}, from `item_metadata`."""
  return {name: m.tree for name, m in meta.items()}


def skipped(x: Any) -> bool:
  """A leaf not to restore: a placeholder, or an array whose bytes are copied."""
  return x is ocp.PLACEHOLDER or isinstance(x, copy_through.StoredArray)


def is_array(x: Any) -> bool:
  """An array leaf of a restored tree, its metadata or its abstract form (not a
  saved Python scalar, nor a skipped leaf)."""
  return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)) or (
      isinstance(x, ocp_metadata.ArrayMetadata) and not isinstance(x, ocp_metadata.ScalarMetadata))


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
  spec = ts_utils.ArrayReadSpec(str(directory), param, use_zarr3=zarr3, use_ocdbt=ocdbt).json
  return spec, context or ts_utils.get_ts_context(use_ocdbt=ocdbt)


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
