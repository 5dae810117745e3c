"""The guard: proof, before anything is written, that a migrated state is consistent.

The surgery changes the params and, through the mirrors it found, the
optimizer state and the collections beside the params. The guard does not
trust that bookkeeping: it looks at the result. After the ops it checks

  - the result holds every part of the state it was given (params, opt_state,
    collections), but the optimizer state where drop_optimizer drops it;
  - every mirror still fits the params it shadows: each entry at a param path
    (or a masked-out placeholder at a module path), with the param's shape
    wherever the param changed shape; one that held an entry for every param
    still does, for the params as they are after the ops (whatever op, a
    `python:` one too, added them);
  - no leaf anywhere in opt_state still sits at a param path that the surgery
    renamed or dropped (a mirror nobody recognised), where no param still
    ends with that path;
  - no mirror entry of a param that `reinit` replaced is an input leaf carried
    over unchanged (a stale moment that would even restore);
  - no leaf of a collection (`batch_stats`) sits under a module the surgery
    renamed or dropped, or keeps the old shape of a param of its module that
    changed shape;
  - with the spec's `optimizer:`, that one update with zero gradients
    type-checks on the result (the state matched the optimizer's init before).

It runs inside the traced surgery on shapes and on the identity of leaves, so
`plan` meets the same failures `run` does, and each names the leaf and what
was expected. Staleness is proven by identity: an output leaf that *is* an
input leaf was carried, whatever its value.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Collection

import jax

from transforms import mirrors, paths


class GuardError(ValueError):
  """The migrated state is not consistent; the message names the leaf."""


@dataclasses.dataclass
class Lineage:
  """What the ops did to the param paths, followed op by op."""
  moved: dict[str, str]   # every input param path -> where it is now (itself if untouched)
  fresh: set[str] = dataclasses.field(default_factory=set)  # params whose mirror entries
                                                            # must not be input leaves

  def follow(self, renamed: dict[str, str]) -> None:
    self.moved = {o: renamed.get(n, n) for o, n in self.moved.items()}
    self.fresh = {renamed.get(p, p) for p in self.fresh}


def _suffixes(path: str) -> list[str]:
  keys = paths.parts(path)
  return [paths.SEP.join(keys[i:]) for i in range(len(keys))]


def _shape(x: Any) -> tuple[int, ...] | None:
  return tuple(x.shape) if hasattr(x, 'shape') else None


def check_opt_state(before: paths.Flat, after: paths.Flat, opt_state_in: Any, opt_state_out: Any,
                    found: list[tuple[mirrors.Mirror, str]], lineage: Lineage, label: str,
                    rebuilt: bool) -> None:
  """The checks on opt_state. `found` pairs each input mirror with the base
  it shadows after the ops; `rebuilt`: the optimizer's init filled and
  checked what could not follow."""
  new_params, new_modules = set(after), paths.modules(after)
  came_from = {n: o for o, n in lineage.moved.items()}
  carried_in = {id(x) for x in paths.leaf_paths(opt_state_in).values()}
  inside = []  # where the found mirrors are, as leaf paths of opt_state begin
  for mirror, base in found:
    try:
      node = mirrors.get_at(opt_state_out, mirror.location)
    except (KeyError, IndexError, TypeError):
      continue  # a whole-state op replaced the optimizer state
    inside.append(mirror.label[len(label) + 1:])
    for q, x in (paths.flatten(node).items() if isinstance(node, Mapping) and node else ()):
      p = paths.join(base, q)
      if p not in new_params:  # a mirror still fits its params
        if mirrors.is_placeholder(x) and p in new_modules:
          continue
        raise GuardError(f'{mirror.label}/{q} is not a param path after the surgery '
                         f'(the params under {base or "the root"!r} are {sorted(new_params)[:3]}...)')
      if mirrors.is_placeholder(x):
        continue
      old = came_from.get(p)
      changed = old is None or _shape(before[old]) != _shape(after[p])
      if not rebuilt and changed and _shape(x) != _shape(after[p]):
        raise GuardError(f'{mirror.label}/{q} has shape {_shape(x)}, but its param {p!r} is now '
                         f'{_shape(after[p])}')
      if p in lineage.fresh and id(x) in carried_in:  # proven by identity in the traced surgery
        raise GuardError(f'{mirror.label}/{q} is the old optimizer state of {p!r}, which the '
                         "surgery re-initialised (it would resume from stale moments); use "
                         "opt_state: zero or follow on the op, or 'keep' to mean it")
  # Outside the mirrors, no leaf ends with a param path that is gone (where no
  # param still ends so): a mirror nobody recognised.
  gone = [o for o in lineage.moved if o not in new_params]
  alive = {s for p in new_params for s in _suffixes(p)}
  stale = {s: o for o in gone for s in _suffixes(o) if s not in alive and
           (len(paths.parts(s)) > 1 or s == o)}
  for path in paths.leaf_paths(opt_state_out):
    if any(paths.under(path, m) for m in inside):
      continue
    for s in _suffixes(path):
      if s in stale:
        o = stale[s]
        now = lineage.moved[o]
        fate = f'renamed to {now!r}' if now in new_params else 'dropped or merged'
        raise GuardError(f'{label}/{path} still sits at param path {o!r}, which the surgery {fate}')


def check_keys(given: Collection[str], returned: Collection[str], dropped: Collection[str]) -> None:
  """What the surgery was given (params, opt_state, collections) it gives
  back, but what an op says it drops (drop_optimizer): an op that returns
  less (a `python:` op) would lose it silently."""
  missing = sorted(set(given) - set(returned) - set(dropped))
  if missing:
    raise GuardError(f"the surgery's result lacks {', '.join(repr(k) for k in missing)}, which its "
                     'input had: an op returned less than it was given (only drop_optimizer '
                     'removes the optimizer state)')


def check_complete(held_every: list[mirrors.Mirror], opt_state_out: Any, after: paths.Flat,
                   found: list[tuple[mirrors.Mirror, str]]) -> None:
  """A mirror that held an entry for every param of its sub-tree still does
  after the surgery, for the params as they are then: a param that an op
  added (a `python:` op, say) has its moments, or the optimizer's first
  update would meet a state that does not fit the params."""
  bases = {m.location: base for m, base in found}  # where the ops moved each mirror's base
  for mirror in held_every:
    try:
      node = mirrors.get_at(opt_state_out, mirror.location)
    except (KeyError, IndexError, TypeError):
      raise GuardError(f'{mirror.label} held the optimizer state of every param and is gone after '
                       'the surgery (an op returned an optimizer state without it); give the '
                       "spec's optimizer: to have it checked against the optimizer's own init, "
                       'or drop_optimizer to mean it') from None
    base = bases.get(mirror.location, mirror.base)
    flat = paths.flatten(node) if isinstance(node, Mapping) else {}
    held = mirrors.expand({paths.join(base, q): x for q, x in flat.items()}, after, mirror.label)
    missing = sorted(p for p in after if paths.under(p, base) and p not in held)
    if missing:
      raise GuardError(f'{mirror.label} holds no entry for param(s) {missing[:3]}'
                       f'{" ..." if len(missing) > 3 else ""}, though it held every param before '
                       'the surgery: an op added params without their optimizer state; give the '
                       "spec's optimizer: to fill them from its init, or add their moments too")


def check_collection(name: str, before: paths.Flat, after: paths.Flat,
                     collection_in: paths.Flat, collection: paths.Flat) -> None:
  """A collection keyed by module paths follows the modules of the params; one
  that held every param (an EMA of the params) still does."""
  if set(before) <= set(collection_in):
    missing = sorted(set(after) - set(collection))
    if missing:
      raise GuardError(f'{name} held every param, but has nothing for {missing[:3]} after the '
                       'surgery (an add creates params only); drop or add it by hand')
  old_modules, new_modules = paths.modules(before), paths.modules(after)
  for path, x in collection.items():
    keys = paths.parts(path)
    module = next((paths.SEP.join(keys[:i]) for i in range(len(keys) - 1, 0, -1)
                   if paths.SEP.join(keys[:i]) in old_modules), None)
    if module is None:
      continue  # not keyed by a module of the params
    if module not in new_modules:
      raise GuardError(f'{name}/{path} sits under module {module!r}, which the surgery renamed or '
                       f'dropped: a rule that renames or drops the module must match {name} too '
                       f'(rules match every collection by the same paths)')
    own = [p for p in before if paths.parts(p)[:-1] == paths.parts(module)]
    resized = {_shape(before[p]) for p in own if p in after and _shape(before[p]) != _shape(after[p])}
    now = {_shape(after[p]) for p in after if paths.parts(p)[:-1] == paths.parts(module)}
    if _shape(x) in resized and _shape(x) not in now:
      raise GuardError(f'{name}/{path} keeps shape {_shape(x)}, but the params of module '
                       f'{module!r} changed shape to {sorted(now)}: widen or narrow it with them '
                       '(a rule matching the module matches the collection too)')


# A leaf is held at least twice while it is computed and written, and
# Dataflow's largest worker has 3.75 TB: a leaf over this can only fail, so
# plan and run refuse it up front.
MAX_LEAF_BYTES = 2 << 40


def check_storable(tree: Any, root: str = '') -> None:
  """Every leaf can be written: Orbax refuses zero-size arrays, and no worker
  holds a leaf over MAX_LEAF_BYTES."""
  for path, x in paths.leaf_paths(tree).items():
    path = paths.join(root, path)
    if not hasattr(x, 'shape'):
      continue
    size = math.prod(x.shape)
    if size == 0:
      raise GuardError(f'{path} would have zero size (shape {tuple(x.shape)}): Orbax cannot '
                       'save zero-size arrays')
    if size * x.dtype.itemsize > MAX_LEAF_BYTES:
      raise GuardError(f'{path} would hold {size * x.dtype.itemsize / 2**40:.1f} TiB (shape '
                       f'{tuple(x.shape)}), more than any worker holds ({MAX_LEAF_BYTES >> 40} TiB)')


def check_update(optimizer: Any, params: Any, opt_state: Any) -> None:
  """One update with zero gradients type-checks on (params, opt_state), the
  latter in the optimizer's own structure."""
  shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  try:
    jax.eval_shape(optimizer.update, shapes, opt_state, shapes)
  except Exception as e:  # whatever optax says is the reason
    raise GuardError(f"one step of the spec's optimizer fails on the migrated state: "
                     f'{type(e).__name__}: {e}') from None


def is_collection(tree: Any, params: Collection[str]) -> bool:
  """A sub-tree beside the params keyed by their module paths (`batch_stats`)."""
  if not isinstance(tree, Mapping) or not tree:
    return False
  modules = paths.modules(params)
  return any(paths.SEP.join(paths.parts(p)[:-1]) in modules for p in paths.flatten(tree))
