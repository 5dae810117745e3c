"""What a checkpoint is: one tree, a CheckpointManager step of items, or a
Flax msgpack file; and which of its items are trees.

A checkpoint is either one tree (a directory Orbax's PyTree/Standard handler
wrote) or a `CheckpointManager` step: a directory of items, each with its own
handler, recorded in `_CHECKPOINT_METADATA`. We keep that layout: the output
of a step is a step with the same items and handlers, so the user's
`CheckpointManager` restores it as it restored the input. Items that are not
trees (metrics, JSON, a dataset iterator's state) ride along.

A legacy Flax checkpoint (one file written by `flax.serialization.to_bytes`
or by `flax.training.checkpoints.save_checkpoint` without Orbax) is one tree;
its output is an ordinary single-tree PyTree checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import metadata as ocp_metadata

from pipeline.checkpoint.errors import CheckpointError
from pipeline.storage import files

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
