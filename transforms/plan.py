"""What a surgery would do to a checkpoint, from shapes alone.

`plan` runs the very function `run` compiles, under `jax.eval_shape`: no
array is read or computed, and every error `run` would meet (a rule matching
nothing, a shape that does not fit, an optimizer state that does not match the
optimizer) is met here the same way. The diff follows each param leaf from its
old path to its new one through the renames the ops report; the untouched
bytes are those `run` copies through as stored bytes.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import numpy as np

from transforms import mirrors, paths
from transforms.groups import Group
from transforms.surgery import OpTrace, Surgery, tree_bytes


class Change(NamedTuple):
  kind: str    # renamed | added | dropped | reshaped | retyped | fused | stacked | split |
               # unstacked | merged (into another leaf: detail names the leaves made)
  path: str    # the leaf's path before the surgery (after, for `added`)
  detail: str  # 'Head/kernel', '(256,) -> (300,)', 'float32 -> bfloat16', ...


class Plan(NamedTuple):
  ops: list[OpTrace]
  changes: list[Change]
  bytes_before: dict[str, int]   # params, opt_state, total
  bytes_after: dict[str, int]
  bytes_untouched: int           # of bytes_after['total']: output leaves that are input leaves
  roles: dict[str, str]          # each mirror and collection of the input -> what it follows
  groups: list[Group]            # the computed leaves, in groups that read disjoint inputs
  zero_fills: list[str]          # opt_state entries filled with zeros for want of `optimizer:`


def abstract(tree: Any) -> Any:
  """Array leaves (arrays, Orbax metadata) as jax.ShapeDtypeStruct."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(tuple(x.shape), np.dtype(x.dtype))
      if hasattr(x, 'shape') and hasattr(x, 'dtype') else x, tree)


def _describe(leaf: Any) -> str:
  if not hasattr(leaf, 'shape'):  # a list or an empty sub-tree the ops carry untouched
    return type(leaf).__name__
  return f'{tuple(leaf.shape)} {np.dtype(leaf.dtype)}'


def _bytes(tree: dict[str, Any], rest: dict[str, Any], surgery: Surgery) -> dict[str, int]:
  spec = surgery.spec
  return {'params': tree_bytes(tree.get(spec.params)),
          'opt_state': tree_bytes(tree.get(spec.opt_state)),
          'total': tree_bytes(tree) + tree_bytes(rest)}


def param_changes(before: paths.Flat, after: paths.Flat, trace: list[OpTrace]) -> list[Change]:
  """Each old param leaf followed through the renames to where it ends."""
  now = {p: p for p in before}  # old path -> its path after the ops so far
  went: dict[str, tuple[str, list[str]]] = {}  # old path -> (verb, what it went into)
  for op in trace:
    for old, cur in now.items():
      if cur in op.combined and old not in went:
        went[old] = (op.verb, op.combined[cur])
    now = {old: op.renamed.get(cur, cur) for old, cur in now.items()}
  changes = []
  for old, cur in now.items():
    if old in went and cur not in after:
      verb, made = went[old]
      changes.append(Change(verb.split()[0], old, f"{verb} {', '.join(made)}"))
      continue
    if cur not in after:
      changes.append(Change('dropped', old, _describe(before[old])))
      continue
    if cur != old:
      changes.append(Change('renamed', old, cur))
    if not hasattr(before[old], 'shape'):
      continue
    if tuple(before[old].shape) != tuple(after[cur].shape):
      changes.append(Change('reshaped', cur, f'{tuple(before[old].shape)} -> {tuple(after[cur].shape)}'))
    if np.dtype(before[old].dtype) != np.dtype(after[cur].dtype):
      changes.append(Change('retyped', cur, f'{np.dtype(before[old].dtype)} -> {np.dtype(after[cur].dtype)}'))
  kept = (set(now.values()) | {p for _, made in went.values() for p in made}
          | {p for op in trace for p in op.renamed.values()})  # a relayout moves opt_state too
  changes += [Change('added', p, _describe(x)) for p, x in after.items() if p not in kept]
  return changes


def plan(surgery: Surgery, state: Any) -> Plan:
  """The plan of `surgery` on `state` (arrays or metadata); SurgeryError if it would fail."""
  tree, rest = surgery.split(abstract(state))
  trace: list[OpTrace] = []
  out = jax.eval_shape(functools.partial(surgery.apply, trace=trace), tree)
  key = surgery.spec.params
  changes = param_changes(paths.flatten(tree[key]), paths.flatten(out[key]), trace)
  _, out_shape, carried = surgery.trace(tree)
  outputs = jax.tree_util.tree_leaves(out_shape)
  untouched = tree_bytes([outputs[o] for o in carried]) + tree_bytes(rest)
  return Plan(trace, changes, _bytes(tree, rest, surgery), _bytes(out, rest, surgery), untouched,
              roles(surgery, tree), surgery.groups(tree), surgery.zero_fills(tree))


def roles(surgery: Surgery, tree: dict[str, Any]) -> dict[str, str]:
  """{'opt_state/0/mu': 'mirror of the params', 'batch_stats': 'collection', ...}:
  what the surgery will change beside the params, found as `run` finds it."""
  spec = surgery.spec
  params = paths.flatten(tree[spec.params])
  found = {m.label: 'mirror of ' + (f'{m.base}/' if m.base else 'the params')
           for m in mirrors.find_mirrors(params, tree.get(spec.opt_state), spec.opt_state)}
  return {**found, **{k: 'collection' for k in tree if k not in (spec.params, spec.opt_state)}}
