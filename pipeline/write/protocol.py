"""The one shape of every writer: begin, write a pack, finish, commit, verify.

As Orbax's checkpoint handlers and Beam's `FileSink` are shaped:
- `begin` makes the output's place, not yet a checkpoint at dst (a
  temporary directory locally; on GCS, dst without its commit file);
- `write_pack` stores a pack of what was computed; a checkpoint held whole
  is one pack, so the whole and the streamed paths are one loop;
- `finish` writes the metadata, our provenance in it;
- `commit` makes the output the checkpoint at dst as Orbax commits (a rename
  locally, the commit file last on GCS) and says what it moved;
- `verify` proves the committed output is what was computed, or raises
  (`checkpoint.VerificationError`); the attempt then removes it.
`migrate` drives every writer through these steps, each one a section of
the checkpoint's deadline. `writers.choose` says which writer; `open_writer`
makes it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Protocol

from etils import epath

import transforms
from pipeline import checkpoint
from pipeline.storage import files
from pipeline.verify import verification
from pipeline.write import copy_patch, orbax_save
from pipeline.write.writers import STREAMING, Choice


class Moved(NamedTuple):
  """What a write moved, for the record."""
  bytes_copied_server_side: int
  bytes_uploaded: int


class Writer(Protocol):
  """One way of writing an output (the module docstring gives the steps)."""

  def begin(self) -> None: ...

  def write_pack(self, pack: dict[str, Any]) -> None: ...

  def finish(self, provenance: dict[str, Any]) -> None: ...

  def commit(self) -> Moved: ...

  def verify(self, prints: dict[str, transforms.Fingerprint]) -> None: ...


@dataclasses.dataclass
class PatchWriter:
  """Copy-and-patch, or a fresh tree (`copy_patch`, as `patches` say). A pack
  is {tree item: {Orbax param name: array, or a Slab of its rows}}."""
  src: epath.Path
  dst: epath.Path
  layout: checkpoint.Layout
  patches: list[copy_patch.TreePatch]
  _work: copy_patch.Work | None = None

  def begin(self) -> None:
    self._work = copy_patch.begin(self.src, self.dst, self.layout, self.patches)

  def write_pack(self, pack: dict[str, Any]) -> None:
    copy_patch.write_pack(self._work, self.patches, pack)

  def finish(self, provenance: dict[str, Any]) -> None:
    copy_patch.finish(self.src, self._work, self.layout, self.patches, provenance)

  def commit(self) -> Moved:
    copy_patch.writing.commit(self._work.path, self.dst)
    return Moved(*copy_patch.moved(self._work))

  def verify(self, prints: dict[str, transforms.Fingerprint]) -> None:
    copy_patch.verify(self.src, self.dst, self.layout, self.patches, self._work.progress, prints)


@dataclasses.dataclass
class OrbaxSaveWriter:
  """Orbax's save of the tree items, stand-ins copied as stored
  (`orbax_save`, `copy_through`). Orbax saves a state whole, so it takes
  one pack, {tree item: its tree}; its commit is Orbax's atomic save, which
  makes its own temporary directory. `bytes_out`: the state's bytes, all
  uploaded where dst is on GCS."""
  src: epath.Path
  dst: epath.Path
  layout: checkpoint.Layout
  bytes_out: int
  _items: dict[str, Any] | None = None
  _provenance: dict[str, Any] | None = None

  def begin(self) -> None:
    pass  # Orbax's save makes its own temporary directory

  def write_pack(self, pack: dict[str, Any]) -> None:
    if self._items is not None:
      raise ValueError("Orbax's save writes a state whole: one pack")
    self._items = pack

  def finish(self, provenance: dict[str, Any]) -> None:
    self._provenance = provenance  # Orbax writes the metadata with the arrays, at the commit

  def commit(self) -> Moved:
    orbax_save.save(self.dst, self.layout, self._items, self._provenance, self.src)
    self._items = checkpoint.abstract(self._items)  # the arrays go; verify reads them back
    return Moved(0, self.bytes_out if files.is_gcs(self.dst) else 0)

  def verify(self, prints: dict[str, transforms.Fingerprint]) -> None:
    verification.verify_saved(self.dst, self._items, prints)


def open_writer(choice: Choice, src: epath.Path, dst: epath.Path, layout: checkpoint.Layout,
                bytes_out: int = 0) -> Writer:
  """The writer `choice` names, writing src's output at dst (its patches,
  planned by `choose` from the items to write, where it is one of
  copy_patch's)."""
  if choice.writer not in STREAMING:  # Orbax's save, copy-through's stand-ins or not
    return OrbaxSaveWriter(src, dst, layout, bytes_out)
  if choice.patches is None:
    raise ValueError(f'writer {choice.writer!r} chosen without its patches: give choose the items')
  return PatchWriter(src, dst, layout, choice.patches)
