"""Read and write one checkpoint, every byte through Orbax.

A checkpoint is either one tree (a directory Orbax's PyTree/Standard handler
wrote) or a `CheckpointManager` step: a directory of items, each with its own
handler, recorded in `_CHECKPOINT_METADATA`. We keep that layout: the output
of a step is a step with the same items and handlers, so the user's
`CheckpointManager` restores it as it restored the input.

The state the surgery sees is the tree itself, or, for a step, its one tree
item, or a dict of its tree items by name when there are several (items
`params` and `opt_state` make the usual state). JSON items ride along.

Provenance goes into the output's `_CHECKPOINT_METADATA` custom metadata,
written by the same atomic commit as the arrays.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from etils import epath
import orbax.checkpoint as ocp
from orbax.checkpoint import metadata as ocp_metadata

import transforms

PROVENANCE_KEY = 'ckpt_surgery'
TREE_HANDLERS = {
    'PyTreeCheckpointHandler': ocp.args.PyTreeSave,
    'StandardCheckpointHandler': ocp.args.StandardSave,
}
JSON_HANDLER = 'JsonCheckpointHandler'
_HANDLERS = {
    'PyTreeCheckpointHandler': ocp.PyTreeCheckpointHandler,
    'StandardCheckpointHandler': ocp.StandardCheckpointHandler,
}


class CheckpointError(ValueError):
  """A checkpoint cannot be read or written as asked."""


@dataclasses.dataclass(frozen=True)
class Layout:
  """How a checkpoint directory stores its state.

  `items` maps item name -> handler class name; a single-tree checkpoint has
  one item named '' (the directory itself).
  """
  items: tuple[tuple[str, str], ...]

  @property
  def is_step(self) -> bool:
    return self.items[0][0] != ''

  @property
  def trees(self) -> list[str]:
    return [name for name, handler in self.items if handler in TREE_HANDLERS]

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


def read_layout(path: epath.Path) -> Layout:
  if not (path / '_CHECKPOINT_METADATA').exists():
    if (path / '_METADATA').exists():  # written by a bare PyTree handler
      return Layout(items=(('', 'PyTreeCheckpointHandler'),))
    raise CheckpointError(f'{path}: not an Orbax checkpoint (no _CHECKPOINT_METADATA or _METADATA)')
  handlers = ocp_metadata.get_step_metadata(path).item_handlers
  if isinstance(handlers, str) or handlers is None:
    name = _handler_name(handlers or 'PyTreeCheckpointHandler')
    if name not in TREE_HANDLERS:
      raise CheckpointError(f'{path}: handler {name} is not a pytree handler')
    return Layout(items=(('', name),))
  items = tuple(sorted((n, _handler_name(h)) for n, h in handlers.items()))
  for name, handler in items:
    if handler not in TREE_HANDLERS and handler != JSON_HANDLER:
      raise CheckpointError(f'{path}: item {name!r} uses {handler}, which ckpt-surgery cannot carry')
  if not any(h in TREE_HANDLERS for _, h in items):
    raise CheckpointError(f'{path}: no pytree item among {[n for n, _ in items]}')
  return Layout(items=items)


def _tree_metadata(path: epath.Path) -> Any:
  return ocp.PyTreeCheckpointer().metadata(path).item_metadata.tree


def _restore_args(like: Any, device: jax.Device) -> Any:
  """Arrays onto `device`; scalars saved as Python numbers stay Python numbers.

  `like` is the tree's Orbax metadata, or the tree itself when we wrote it."""
  sharding = jax.sharding.SingleDeviceSharding(device)
  is_array = lambda x: (isinstance(x, (jax.Array, np.ndarray)) or (
      isinstance(x, ocp_metadata.ArrayMetadata) and not isinstance(x, ocp_metadata.ScalarMetadata)))
  return jax.tree_util.tree_map(
      lambda x: ocp.ArrayRestoreArgs(sharding=sharding) if is_array(x) else ocp.RestoreArgs(), like)


def restore(path: epath.Path, device: jax.Device | None = None, written: dict[str, Any] | None = None
            ) -> tuple[Layout, dict[str, Any]]:
  """(layout, items by name) of a checkpoint, arrays on `device` (default: the first).

  `written`, the items as we saved them, spares reading the metadata of a
  checkpoint we just wrote (Orbax opens every array for it)."""
  device = device or jax.devices()[0]
  layout = read_layout(path)
  args = {}
  for name, handler in layout.items:
    if handler in TREE_HANDLERS:
      like = written[name] if written is not None else _tree_metadata(path / name if name else path)
      args[name] = ocp.args.PyTreeRestore(restore_args=_restore_args(like, device))
    else:
      args[name] = ocp.args.JsonRestore()
  if not layout.is_step:
    return layout, {'': ocp.PyTreeCheckpointer().restore(path, args=args[''])}
  restored = ocp.Checkpointer(ocp.CompositeCheckpointHandler()).restore(
      path, args=ocp.args.Composite(**args))
  return layout, dict(restored.items())


def save(path: epath.Path, layout: Layout, items: dict[str, Any],
         provenance: dict[str, Any]) -> None:
  """Write `items` at `path` with Orbax's atomic commit, in `layout`."""
  custom = {PROVENANCE_KEY: provenance}
  if not layout.is_step:
    (name, handler), = layout.items
    checkpointer = ocp.Checkpointer(_HANDLERS[handler]())
    checkpointer.save(path, args=TREE_HANDLERS[handler](items[name]), custom_metadata=custom)
    return
  args = {n: TREE_HANDLERS[h](items[n]) if h in TREE_HANDLERS else ocp.args.JsonSave(items[n])
          for n, h in layout.items}
  ocp.Checkpointer(ocp.CompositeCheckpointHandler()).save(
      path, args=ocp.args.Composite(**args), custom_metadata=custom)


def read_provenance(path: epath.Path) -> dict[str, Any] | None:
  """What ckpt-surgery recorded in a checkpoint it wrote; None for others."""
  if not (path / '_CHECKPOINT_METADATA').exists():
    return None
  custom = ocp_metadata.get_step_metadata(path).custom_metadata or {}
  return custom.get(PROVENANCE_KEY)


def read_metadata(path: epath.Path) -> tuple[Layout, Any]:
  """(layout, the state's tree of leaf metadata: shape and dtype, no array bytes)."""
  layout = read_layout(path)
  trees = {name: _tree_metadata(path / name if name else path) for name in layout.trees}
  return layout, layout.join(trees)


def array_specs(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  """{leaf path: (shape, dtype)} of the arrays in a restored tree or in its
  Orbax metadata alike (numbers saved as Python scalars are not arrays)."""
  return {transforms.key_path(k): (tuple(x.shape), np.dtype(x.dtype).name)
          for k, x in jax.tree_util.tree_flatten_with_path(tree)[0]
          if isinstance(x, jax.Array) or (isinstance(x, ocp_metadata.ArrayMetadata)
                                          and not isinstance(x, ocp_metadata.ScalarMetadata))}
