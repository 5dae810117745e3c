"""Packs: a checkpoint's computed leaves in portions that fit a memory budget.

A surgery's computed outputs fall into dependency groups that read disjoint
inputs (`groups.dependency_groups`): restored, computed and written on
their own, they give what the whole surgery gives. `pack` fills packs with
consecutive groups while their bytes (inputs and outputs: what a worker
holds while a pack is computed) stay within the budget, so a checkpoint of
any size is migrated holding one pack at a time. A group over the budget
is a pack of its own, `over` the budget: it streams a slab at a time
(`chunkwise`) or fails by name.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

from transforms.groups import Group


class Pack(NamedTuple):
  groups: tuple[Group, ...]
  nbytes: int   # what a worker holds while it is computed: its groups' inputs and outputs
  over: bool    # one group alone, over the budget


def pack(groups: Sequence[Group], budget: int) -> list[Pack]:
  """`groups` in packs of at most `budget` bytes, in order (by first output)."""
  packs: list[Pack] = []
  current: list[Group] = []
  size = 0
  for group in sorted(groups, key=lambda g: g.outputs):
    if group.nbytes > budget:
      packs.append(Pack((group,), group.nbytes, True))
      continue
    if current and size + group.nbytes > budget:
      packs.append(Pack(tuple(current), size, False))
      current, size = [], 0
    current.append(group)
    size += group.nbytes
  if current:
    packs.append(Pack(tuple(current), size, False))
  return packs


def largest(packs: Sequence[Pack]) -> int:
  """The bytes of the largest pack that is held whole (a pack over the
  budget streams a slab at a time)."""
  return max((p.nbytes for p in packs if not p.over), default=0)
