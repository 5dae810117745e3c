"""Find the sub-trees of an optimizer state that mirror the params.

Optax states hold pytrees that shadow the params (Adam's `mu`/`nu`, momentum
`trace`, EMA, masked and multi-transform inner states). A structural op on the
params must be applied to each of them the same way, or the checkpoint no
longer resumes. We find them by structure, not by knowing optax's classes, so
that every optimizer works, restored typed (NamedTuples) or without a target
(dicts, lists, and None where optax keeps a `MaskedNode` or `EmptyState`).

A mirror is the outermost dict in opt_state whose leaf paths are all param
paths: a subset is fine (masked states), None leaves count as present.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Collection

from transforms import paths

Location = tuple[Any, ...]  # keys from the opt_state root down to a mirror


def _children(node: Any) -> list[tuple[Any, Any]]:
  if isinstance(node, Mapping):
    return list(node.items())
  if isinstance(node, (tuple, list)):
    return list(enumerate(node))
  return []


def _is_mirror(node: Any, param_paths: Collection[str]) -> bool:
  if not isinstance(node, Mapping):
    return False
  leaf_paths = paths.flatten(node)
  return bool(leaf_paths) and all(p in param_paths for p in leaf_paths)


def find_mirrors(param_paths: Collection[str], opt_state: Any) -> list[Location]:
  """Locations of every mirror of the params in `opt_state`, outermost first."""
  found: list[Location] = []

  def visit(node: Any, loc: Location) -> None:
    if _is_mirror(node, param_paths):
      found.append(loc)
      return
    for key, child in _children(node):
      visit(child, loc + (key,))

  visit(opt_state, ())
  return found


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
