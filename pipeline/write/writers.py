"""Which writer makes an output, and why not a cheaper one: one decision for `run` and `plan`.

Four writers, cheapest first:
- 'patch' (write path `copy_and_patch`, `copy_patch`): the input's files
  copied, the copy patched. Where the surgery removes no data, input and
  output share a storage, and the input's format is one it knows.
- 'copy_through' (`copy_through`): Orbax's save, each leaf the surgery
  leaves untouched copied as stored. Where copy-and-patch declines; never
  a pack at a time.
- 'fresh' (`full`, `copy_patch` with `fresh=True`): every leaf computed and
  encoded once into an empty tree. The full path (`--full_decode`, nothing
  carried, a zero fill to check) where the input's format is one it knows.
- 'orbax_save' (`full`): Orbax's save of the whole state: a Flax msgpack
  input, and what the others do not take.

`choose` takes the first that applies, among the writers a caller allows
(`Settings.writers`: tests ask for one this way), and says why copy-and-patch
did not (`why_not_patched`, in the record and in `plan`).
"""
from __future__ import annotations

from typing import Any, NamedTuple

from etils import epath

from pipeline import checkpoint
from pipeline.write import copy_patch

WRITERS = ('patch', 'copy_through', 'fresh', 'orbax_save')
STREAMING = ('patch', 'fresh')  # the writers that take an output a pack at a time
MSGPACK = 'a Flax msgpack input is read whole'
_WRITE_PATHS = {'patch': 'copy_and_patch', 'copy_through': 'copy_through'}


class Choice(NamedTuple):
  """A writer, why copy-and-patch does not write (None where it does), and,
  where `choose` was given the output's tree and the writer is one of
  copy_patch's, its patches and the values they write ({item: {param
  name: array}}: the one pack of a state held whole)."""
  writer: str
  why_not_patched: str | None
  patches: list[copy_patch.TreePatch] | None = None
  values: dict[str, dict[str, Any]] | None = None

  @property
  def write_path(self) -> str:
    """The record's label: copy_and_patch, copy_through or full."""
    return _WRITE_PATHS.get(self.writer, 'full')


def choose(src: epath.Path, layout: checkpoint.Layout, removes: str | None, *, carried: bool,
           zero_fills: bool = False, full_decode: bool = False, dst: epath.Path | None = None,
           written: dict[str, Any] | None = None, writers: tuple[str, ...] = WRITERS,
           streamed: bool = False) -> Choice:
  """The writer of an output of `src` (at `dst`, where known) for a surgery
  that removes data as `removes` says (`Route.removes`): `carried`, some
  leaf is carried as stored; `zero_fills`, a zero fill must be checked on
  the whole state; `written`, the items to save (their patches are then
  planned, which may decline where the input's format alone did not);
  `streamed`, only a writer that takes packs."""
  if layout.msgpack:
    return Choice('orbax_save', MSGPACK)
  allowed = [w for w in writers if w in STREAMING] if streamed else writers
  why = ('--full_decode' if full_decode else copy_patch.ZERO_FILLS if zero_fills
         else None if carried else copy_patch.NOTHING_CARRIED)
  if why is None:
    planned, why = _patches(src, dst, layout, removes, written, 'patch', allowed)
    if why is None:
      return Choice('patch', None, *planned)
    if 'copy_through' in allowed:
      return Choice('copy_through', why)
  planned, declined = _patches(src, dst, layout, removes, written, 'fresh', allowed)
  if declined is None:
    return Choice('fresh', why, *planned)
  return Choice('orbax_save', f"{why}; by Orbax's save: {declined}")


def _patches(src: epath.Path, dst: epath.Path | None, layout: checkpoint.Layout,
             removes: str | None, written: dict[str, Any] | None, writer: str,
             allowed: tuple[str, ...] | list[str]) -> tuple[tuple[Any, Any], str | None]:
  """((the patches of `written` and their values, or Nones where it is not
  given), why `writer`, one of copy_patch's, declines, or None)."""
  if writer not in allowed:
    return (None, None), f'{writer} is not among the writers asked for ({", ".join(allowed)})'
  fresh = writer == 'fresh'
  try:
    if written is None:
      copy_patch.check_input(src, layout, removes, dst, fresh=fresh)
      return (None, None), None
    return copy_patch.make_patches(src, dst, layout, written, removes, fresh=fresh), None
  except copy_patch.NotPatchable as e:
    return (None, None), str(e)
