"""Writing an output through Orbax's own save, in the input's layout.

The tree items are saved with the handler the input's were (its recorded
name kept, zarr3 where the input was); every other item, and every file
beside them, is carried: copied byte for byte, never decoded. The input's
custom metadata is kept beside our provenance. StoredArray leaves are
written by copying their stored bytes (`copy_through`). Used where
copy-and-patch does not write (`writers`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from pipeline import checkpoint, storage
from pipeline.checkpoint import HANDLER_CLASSES, TREE_HANDLERS, Layout
from pipeline.storage import files
from pipeline.write import copy_through


def _recorded_as(handler: Any, typestr: str | None) -> Any:
  """`handler`, recorded in _CHECKPOINT_METADATA under `typestr` (the
  input's name for its handler) rather than its own class's name."""
  if typestr:
    handler.typestr = lambda: typestr
  return handler


def _tree_handler(name: str, typestr: str | None = None, use_zarr3: bool = False) -> Any:
  """Orbax's handler for a tree item written as handler `name` wrote it
  (in zarr3 where the input was: Orbax v1 writes it by default)."""
  cls = HANDLER_CLASSES[name]
  handler = cls(use_zarr3=True) if use_zarr3 and cls is ocp.PyTreeCheckpointHandler else cls()
  if name == 'StandardCheckpointHandler':
    # Its type check would refuse the stand-ins it passes on to Orbax's array
    # handler, which copies their stored bytes (see copy_through).
    handler._supported_types = (*handler._supported_types, checkpoint.StoredArray)  # pylint: disable=protected-access
  return _recorded_as(handler, typestr)


class CarriedItemHandler(ocp.CheckpointHandler):
  """Saves an item by copying the input's item byte for byte (server-side
  on GCS): metrics, JSON, a dataset iterator's state, whatever handler wrote
  it. It is never decoded, so any handler's item rides along."""

  def save(self, directory: epath.Path, args: Any) -> None:
    for entry in files.children(args.source):
      storage.copy_entry(entry, directory / entry.name)

  def restore(self, directory: epath.Path, args: Any = None) -> Any:
    raise NotImplementedError('a carried item is copied, not restored')


@ocp.args.register_with_handler(CarriedItemHandler, for_save=True, for_restore=True)
@dataclasses.dataclass
class CarryArgs(ocp.args.CheckpointArgs):
  """The input's item directory, to copy as it is."""
  source: epath.Path


class _StepHandler(ocp.CompositeCheckpointHandler):
  """Orbax's composite handler that also carries the files beside a step's
  items (v1's `orbax.checkpoint` marker, a user's notes) into the step."""

  def __init__(self, source: epath.Path, beside: tuple[str, ...], **handlers: Any):
    super().__init__(**handlers)
    self._beside = [source / name for name in beside]

  def save(self, directory: epath.Path, *args: Any, **kwargs: Any) -> None:
    for entry in self._beside:
      storage.copy_entry(entry, directory / entry.name)
    super().save(directory, *args, **kwargs)


@ocp.args.register_with_handler(_StepHandler, for_save=True, for_restore=True)
class _StepArgs(ocp.args.Composite):
  """Orbax's composite args, for `_StepHandler`."""


def save(path: epath.Path, layout: Layout, items: dict[str, Any],
         provenance: dict[str, Any], source: epath.Path) -> None:
  """Write `items` (the tree items) at `path` with Orbax's atomic commit,
  in `layout`, carrying the rest of `source`: its other items, the files
  beside them, its custom metadata. StoredArray leaves are written by
  copying their stored bytes."""
  if any(isinstance(x, checkpoint.StoredArray) for x in jax.tree_util.tree_leaves(items)):
    copy_through.install()
  recorded = layout.handlers if layout.is_step and layout.handlers else {}

  def tree_handler(name: str, handler_name: str) -> Any:  # zarr3 where the input tree was
    tree = source / name if name else source
    return _tree_handler(handler_name, recorded.get(name),
                         checkpoint.stored_format(tree).use_zarr3)

  if not layout.is_step:
    (name, handler_name), = layout.items
    handler, args = tree_handler(name, handler_name), TREE_HANDLERS[handler_name](items[name])
  else:
    handler = _StepHandler(source, layout.beside, **{
        n: tree_handler(n, h) if h in TREE_HANDLERS
        else _recorded_as(CarriedItemHandler(), recorded.get(n)) for n, h in layout.items})
    args = _StepArgs(**{
        n: TREE_HANDLERS[h](items[n]) if h in TREE_HANDLERS else CarryArgs(source / n)
        for n, h in layout.items})
  custom = checkpoint.custom_metadata(source, provenance)
  if not files.globbed(path) or files.is_gcs(path):
    ocp.Checkpointer(handler).save(path, args=args, custom_metadata=custom)
    return
  # Orbax's save globs its own directory: one whose path holds glob characters
  # is saved under a plain name beside it, reached through a plain link, then renamed.
  stage = staged_at(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with files.unglobbed(path.parent) as parent:
    ocp.Checkpointer(handler).save(parent / stage.name, args=args, custom_metadata=custom)
  os.rename(stage, path)


def staged_at(path: epath.Path) -> epath.Path:
  """Where `save` stages a checkpoint whose path holds glob characters: a
  plain name beside it, the same for every attempt (a dead one's is found)."""
  name = hashlib.sha256(path.name.encode()).hexdigest()[:16]
  return path.parent / f'.ckpt-surgery-stage-{name}'
