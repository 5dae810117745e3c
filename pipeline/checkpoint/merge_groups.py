"""Which checkpoints each merge combines: discovery's checkpoints, grouped.

A checkpoint's run is the directory it lies in (a CheckpointManager root,
or a directory of Flax msgpack files) and its step is the number its name
ends in (`100`, `step_100`, `checkpoint_100`). A merge's `group` says how
they group:
- `run`: each run's steps; `take` chooses among that run's steps;
- `step`: the checkpoints of one step across every run (a soup); `take`
  chooses the steps, each of which is a group;
- `all`: every checkpoint at the steps `take` chooses, as one group.
Inputs are ordered oldest step first, then by path: the order in which the
merge sums them (`transforms.merge`). A group that cannot be formed (fewer
steps than `take` asks for, a weight count that does not fit) fails by
name; the others go on.
"""
from __future__ import annotations

import collections
import re
from typing import NamedTuple

from etils import epath

from transforms import merge as merging

_TRAILING_NUMBER = re.compile(r'(\d+)$')


class MergeGroup(NamedTuple):
  """One merge's inputs (oldest first), their steps and coefficients."""
  name: str                      # the run's directory, 'step N', or 'all'
  inputs: tuple[str, ...]
  steps: tuple[int, ...]
  weights: tuple[float, ...]     # each input's coefficient: see transforms.merge


class Unformed(NamedTuple):
  """A group that cannot be merged, and why."""
  name: str
  error: str


def step_of(src: str) -> int | None:
  """The number a checkpoint's name ends in; None where it ends in none."""
  found = _TRAILING_NUMBER.search(epath.Path(src).name)
  return int(found.group(1)) if found else None


def _candidates(sources: list[str], merge: merging.Merge
                ) -> tuple[dict[str, list[tuple[int, str]]], list[Unformed]]:
  """{group name: [(step, src)]} before `take`; checkpoints with no step."""
  unformed, grouped = [], collections.defaultdict(list)
  for src in sources:
    step = step_of(src)
    if step is None:
      unformed.append(Unformed(src, f'{src}: its name ends in no step number, so no merge can '
                                    'place it'))
      continue
    grouped[str(epath.Path(src).parent) if merge.group == 'run' else 'all'].append((step, src))
  return grouped, unformed


def merge_groups(sources: list[str], merge: merging.Merge
                 ) -> tuple[list[MergeGroup], list[Unformed]]:
  """The groups `merge` makes of `sources`, and those it cannot make."""
  grouped, unformed = _candidates(sources, merge)
  groups = []
  for name, found in sorted(grouped.items()):
    present = [s for s, _ in found]
    if merge.group == 'step':  # a soup per step taken: every run's checkpoint of it
      unformed += [Unformed(f'step {step}', f'step {step}: no checkpoint of this step')
                   for step in merge.take.steps or () if step not in present and not merge.allow_fewer]
      steps = merging.take_steps(present, merge.take, allow_fewer=True)
      parts = [(f'step {step}', [(s, src) for s, src in found if s == step]) for step in steps]
    else:
      try:
        steps = merging.take_steps(present, merge.take, merge.allow_fewer, name)
      except merging.MergeError as e:
        unformed.append(Unformed(name, str(e)))
        continue
      parts = [(name, [(s, src) for s, src in found if s in set(steps)])]
    for part, members in parts:
      try:
        groups.append(_group(part, sorted(members), merge))
      except merging.MergeError as e:
        unformed.append(Unformed(part, f'{part}: {e}'))
  return groups, unformed


def _group(name: str, members: list[tuple[int, str]], merge: merging.Merge) -> MergeGroup:
  if merge.group == 'run' and len({s for s, _ in members}) != len(members):
    raise merging.MergeError('two checkpoints of one step in one run')
  weights = merge.coefficients(len(members))
  return MergeGroup(name, tuple(src for _, src in members), tuple(s for s, _ in members),
                    tuple(float(w) for w in weights))


def merged_name(group: MergeGroup, merge: merging.Merge) -> str:
  """The output's directory name: the method, what was taken and the newest
  step (`merged_mean_last5_5000`); a soup's, `soup_mean_step_5000`. A
  nightly merge over a growing run names each new window apart."""
  if merge.group == 'step':
    return f'soup_{merge.method}_step_{group.steps[-1]}'
  take = merge.take
  taken = (f'last{take.last}' if take.last is not None else
           f'every{take.every}' if take.every is not None else 'steps')
  return f'merged_{merge.method}_{taken}_{group.steps[-1]}'


def merged_dst(group: MergeGroup, merge: merging.Merge, dst_of: dict[str, str],
               output: str) -> str:
  """Where a group's merge goes: a run's, beside where its newest step's
  migration would go; a soup's or `all`'s, at the top of `output`."""
  if merge.group == 'run':
    return str(epath.Path(dst_of[group.inputs[-1]]).parent / merged_name(group, merge))
  return str(epath.Path(output) / merged_name(group, merge))
