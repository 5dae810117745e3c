"""Find the sub-trees of an optimizer state that mirror the params.

Optax states hold pytrees that shadow the params (Adam's `mu`/`nu`, momentum
`trace`, EMA, masked and multi-transform inner states). A structural op on the
params must be applied to each of them the same way, or the checkpoint no
longer resumes. We find them by structure, not by knowing optax's classes, so
that every optimizer works, restored typed (NamedTuples) or without a target
(dicts, lists, and None where optax keeps a `MaskedNode` or `EmptyState`).

A mirror is the outermost mapping in opt_state whose leaf paths are all
param paths of one sub-tree of the params (its `base`: '' for the whole
params, `fast` for lookahead's fast weights, see `find_mirrors`), where a placeholder may also
stand at a module path: optax keeps a masked-out sub-tree (a prefix label or
mask, `{'backbone': 'frozen'}`) as one `MaskedNode` at `backbone`. While ops
run, such a placeholder is expanded into one `Hole` per param beneath it, so
that every op sees leaf paths only; `collapse` puts one placeholder back at
the sub-tree its params ended up in, or fails naming it.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Collection, NamedTuple

from transforms import paths

Location = tuple[Any, ...]  # keys from the opt_state root down to a mirror


class MirrorError(ValueError):
  """A mirror cannot follow the params; the message names it."""


class Mirror(NamedTuple):
  location: Location
  base: str    # the params sub-tree it shadows ('' = all)
  label: str   # 'opt_state/0/mu', for messages


def is_placeholder(x: Any) -> bool:
  """What optax's MaskedNode and EmptyState are stored as: None (restored
  without a target), the empty NamedTuple itself (typed), or an empty dict
  (read from Flax msgpack)."""
  return x is None or (isinstance(x, tuple) and hasattr(x, '_fields') and not x._fields) or (
      isinstance(x, Mapping) and not x)


def _children(node: Any) -> list[tuple[Any, str, Any]]:
  """(key, its name for messages, child) of a container."""
  if isinstance(node, Mapping):
    return [(k, str(k), v) for k, v in node.items()]
  if hasattr(node, '_fields'):  # NamedTuple: a field name reads better than an index
    return [(i, name, v) for i, (name, v) in enumerate(zip(node._fields, node))]
  if isinstance(node, (tuple, list)):
    return [(i, str(i), v) for i, v in enumerate(node)]
  return []


def _fits(flat: paths.Flat, base: str, params: Collection[str], modules: Collection[str]) -> bool:
  for q, v in flat.items():
    full = paths.join(base, q)
    if full not in params and not (is_placeholder(v) and full in modules):
      return False
  return True


def _bases(node: Any, params: Collection[str], modules: Collection[str]) -> list[str]:
  """The params sub-trees `node` mirrors: [''] for all of the params."""
  if not isinstance(node, Mapping) or not node:
    return []
  flat = paths.flatten(node)
  if _fits(flat, '', params, modules):
    return ['']
  held = next((q for q, v in flat.items() if not is_placeholder(v)), None)
  if held is None:
    return []
  suffix = paths.SEP + held
  candidates = [p[:-len(suffix)] for p in params if p.endswith(suffix)]
  # A sub-tree mirror shadows all of its sub-tree, as lookahead's moments do.
  return [b for b in candidates if _fits(flat, b, params, modules) and
          len(expand({paths.join(b, q): x for q, x in flat.items()}, params, '')) ==
          sum(paths.under(p, b) for p in params)]


def nodes(tree: Any) -> dict[str, Any]:
  """Every node of a pytree by its path (NamedTuple fields by name), leaves too."""
  found = {}

  def visit(node: Any, path: str) -> None:
    found[path] = node
    for _, name, child in _children(node):
      visit(child, paths.join(path, paths.escape(name)))

  visit(tree, '')
  return found


def _same_shapes(node: Any, base: str, params: Mapping[str, Any]) -> bool:
  return all(getattr(x, 'shape', None) == getattr(params[paths.join(base, q)], 'shape', ())
             for q, x in paths.flatten(node).items() if not is_placeholder(x))


def find_mirrors(params: Mapping[str, Any] | Collection[str], opt_state: Any,
                 root: str = 'opt_state') -> list[Mirror]:
  """Every mirror of the params (path -> leaf, or just their paths) or of a
  sub-tree of them in `opt_state`, outermost first.

  A mirror of a sub-tree must be named for it in its own keys, and only one
  sub-tree may be so named: lookahead's `fast_state` shadows `fast` (and
  `slow`, which has the same paths, is not named). Unnamed pieces of a larger
  tree are not mirrors of whatever sub-tree has their shape: `mu/Dense_1`,
  left behind by a rename, is stale, not a mirror of `Head`. Where the
  params' shapes are known, a one-leaf mirror must have its param's shape
  (NNX keeps `count` as {'value': ...})."""
  leaves = params if isinstance(params, Mapping) else None
  params = set(params)
  modules = paths.modules(params)
  found: list[Mirror] = []

  def visit(node: Any, loc: Location, names: tuple[str, ...]) -> None:
    bases = _bases(node, params, modules)
    if bases != ['']:
      bases = [b for b in bases if any(paths.parts(b)[-1] in n for n in names)]
      if len(bases) != 1 or (leaves is not None and len(paths.flatten(node)) == 1 and
                             not _same_shapes(node, bases[0], leaves)):
        bases = []
    if bases:
      found.append(Mirror(loc, bases[0], paths.SEP.join((root, *names))))
      return
    for key, name, child in _children(node):
      visit(child, loc + (key,), names + (paths.escape(name),))

  visit(opt_state, (), ())
  return found


@dataclasses.dataclass(frozen=True, eq=False)
class Placeholder:
  """One placeholder of a mirror, while its params are expanded into Holes."""
  value: Any   # as stored (None, MaskedNode, EmptyState, {})
  depth: int   # how many levels it sits above its params' common prefix
  label: str   # where it was, for messages


@dataclasses.dataclass(frozen=True, eq=False)
class Hole:
  """Stands, in an expanded mirror, for one param beneath a placeholder (not a
  pytree: it never reaches JAX)."""
  of: Placeholder
  below: str   # the param's path below the placeholder, as it was


def _common_prefix(keys: list[str]) -> str:
  split = [paths.parts(k) for k in keys]
  common = []
  for level in zip(*split):
    if len(set(level)) != 1:
      break
    common.append(level[0])
  return paths.SEP.join(common)


def expand(flat: paths.Flat, params: Collection[str], label: str) -> paths.Flat:
  """A mirror's entries (full param paths) with each placeholder at a module
  path replaced by a Hole at every param beneath it."""
  out: paths.Flat = {}
  for path, value in flat.items():
    if path in params or not is_placeholder(value):
      out[path] = value
      continue
    members = [p for p in params if paths.under(p, path)]
    depth = len(paths.parts(_common_prefix(members))) - len(paths.parts(path))
    placeholder = Placeholder(value, depth, f'{label}/{path}')
    out.update({p: Hole(placeholder, p[len(path) + 1:]) for p in members})
  return out


def _root(placeholder: Placeholder, members: list[tuple[str, str]], params: Collection[str]
          ) -> str | None:
  """Where a placeholder goes back: the sub-tree holding exactly its params,
  where they are now. Its own module, renamed as they were, while that still
  holds exactly them; else the one as many levels above their common prefix
  as before."""
  paths_now = {p for p, _ in members}
  exact = lambda root: root and {p for p in params if paths.under(p, root)} == paths_now
  moved = {p[:-len(below) - 1] if p.endswith(paths.SEP + below) else None for p, below in members}
  if len(moved) == 1 and exact(root := moved.pop()):
    return root
  common = paths.parts(_common_prefix(list(paths_now)))
  root = paths.SEP.join(common[:len(common) - placeholder.depth])
  return root if len(common) > placeholder.depth and exact(root) else None


def collapse(flat: paths.Flat, params: Collection[str]) -> paths.Flat:
  """The inverse of `expand` after the ops: each placeholder's params (where
  the ops moved them) go back under one placeholder (see `_root`), or the
  mirror fails naming it."""
  groups: dict[int, tuple[Placeholder, list[tuple[str, str]]]] = {}
  out: paths.Flat = {}
  for path, value in flat.items():
    if isinstance(value, Hole):
      groups.setdefault(id(value.of), (value.of, []))[1].append((path, value.below))
    else:
      out[path] = value
  for placeholder, members in groups.values():
    root = _root(placeholder, members, params)
    if root is None:
      raise MirrorError(
          f'the masked-out sub-tree {placeholder.label} no longer maps onto one sub-tree of the '
          f'params: the surgery moved its params to {sorted(p for p, _ in members)[:4]}, which '
          'no sub-tree holds alone; an optimizer state cannot say which of them are masked')
    out[root] = placeholder.value
  return out


def get_at(tree: Any, loc: Location) -> Any:
  for key in loc:
    tree = tree[key]
  return tree


def replace_at(tree: Any, loc: Location, value: Any) -> Any:
  """A copy of `tree` with the node at `loc` replaced; containers keep their type.

  optax.tree_utils finds NamedTuple fields by name, but a target-less restore
  gives lists and dicts, so we walk the containers ourselves.
  """
  if not loc:
    return value
  key, rest = loc[0], loc[1:]
  child = replace_at(tree[key], rest, value)
  if isinstance(tree, Mapping):
    return type(tree)({**tree, key: child})
  if hasattr(tree, '_replace'):  # NamedTuple
    return tree._replace(**{tree._fields[key]: child})
  items = list(tree)
  items[key] = child
  return type(tree)(items)
