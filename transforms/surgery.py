"""A surgery: the spec's ops compiled into one jitted `state -> state`.

The function that `jax.jit` traces works on concrete structure: paths, the
mirrors in opt_state and every rule's matches are plain Python at trace time,
so a rule that fits no checkpoint fails while tracing, before any array
moves. One compilation serves every checkpoint of the same signature (tree
structure, shapes, dtypes); `Surgery` keeps them and counts them. The state is
donated, so the old arrays are not held beside the new ones.

Only the params and opt_state go through the compiled function; everything
else in the state (step, rng, batch stats) passes through untouched.
"""
from __future__ import annotations

import hashlib
from typing import Any, Mapping

import jax

from transforms import mirrors, paths
from transforms.ops import SurgeryError, apply_to_mirror
from transforms.spec import Spec

Signature = tuple[Any, tuple[tuple[tuple[int, ...], str], ...]]


def signature(tree: Any) -> Signature:
  """Tree structure plus every leaf's shape and dtype."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  return treedef, tuple((tuple(x.shape), str(x.dtype)) for x in leaves)


def signature_id(sig: Signature) -> str:
  """A short stable name for a signature, for reports."""
  return hashlib.sha256(repr(sig).encode()).hexdigest()[:12]


def _check_tree(flat: paths.Flat, what: str) -> None:
  """A path may not be both a leaf and a sub-tree (rename into a leaf)."""
  for p in flat:
    parts = p.split(paths.SEP)
    for i in range(1, len(parts)):
      parent = paths.SEP.join(parts[:i])
      if parent in flat:
        raise SurgeryError(f'{what}: {parent!r} would be both a leaf and the parent of {p!r}')


class Surgery:
  """The spec's ops as a compiled function, one compilation per signature."""

  def __init__(self, spec: Spec):
    self.spec = spec
    self._compiled: dict[Signature, Any] = {}

  @property
  def compilations(self) -> int:
    return len(self._compiled)

  def split(self, state: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(what the surgery changes: params and opt_state, the rest of the state)."""
    if not isinstance(state, Mapping) or self.spec.params not in state:
      keys = list(state) if isinstance(state, Mapping) else type(state).__name__
      raise SurgeryError(f'the state has no {self.spec.params!r} key (it has {keys})')
    keys = (self.spec.params, self.spec.opt_state)
    return ({k: state[k] for k in keys if k in state},
            {k: v for k, v in state.items() if k not in keys})

  def apply(self, tree: dict[str, Any]) -> dict[str, Any]:
    """The pure surgery on {params, opt_state}: what gets traced and compiled."""
    params = paths.flatten(tree[self.spec.params])
    opt_state = tree.get(self.spec.opt_state)
    locations = mirrors.find_mirrors(params.keys(), opt_state)
    shadows = [paths.flatten(mirrors.get_at(opt_state, loc)) for loc in locations]
    for index, op in enumerate(self.spec.ops):
      try:
        selected = op.select(params)
        params = op.apply(params, selected)[0]
        shadows = [apply_to_mirror(op, m, selected) for m in shadows]
      except SurgeryError as e:
        raise SurgeryError(f'ops[{index}] ({op.name}): {e}') from None
    _check_tree(params, 'after the surgery')
    out = dict(tree)
    out[self.spec.params] = paths.unflatten(params)
    for loc, m in zip(locations, shadows):
      opt_state = mirrors.replace_at(opt_state, loc, paths.unflatten(m))
    if self.spec.opt_state in tree:
      out[self.spec.opt_state] = opt_state
    return out

  def compiled_for(self, tree: dict[str, Any]) -> tuple[Any, bool]:
    """(the compiled surgery for this tree's signature, whether it was compiled now)."""
    sig = signature(tree)
    if sig in self._compiled:
      return self._compiled[sig], False
    compiled = jax.jit(self.apply, donate_argnums=0).lower(tree).compile()
    self._compiled[sig] = compiled
    return compiled, True

  def __call__(self, state: Any) -> tuple[Any, bool]:
    """(the migrated state, whether this call compiled). Donates `state`'s arrays."""
    tree, rest = self.split(state)
    tree = jax.device_put(tree)
    compiled, fresh = self.compiled_for(tree)
    return {**rest, **compiled(tree)}, fresh
