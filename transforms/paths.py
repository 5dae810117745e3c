"""Param paths: a leaf's keys joined by '/', as `flax.traverse_util` gives them.

Every op names the leaves it touches by a regex searched in these paths, and
every mirror in the optimizer state is matched to the params by them, so this
module is the one place that decides what a path is.

Keys are escaped so that a path names exactly one leaf and comes back as the
same keys: '%' is written '%25' and '/' is written '%2F' (URL style), every
other character stays as it is. A Haiku name `mlp/~/linear_0` is the path
`mlp%2F~%2Flinear_0`, and `{'a': {'b': x}, 'a/b': y}` has the two paths
`a/b` and `a%2Fb`. An empty sub-dict is kept as a leaf of its own (an empty
mapping), so it comes back where it was.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Iterable

SEP = '/'

Flat = dict[str, Any]


def escape(key: Any) -> str:
  """One key as it appears in a path."""
  return str(key).replace('%', '%25').replace(SEP, '%2F')


def unescape(part: str) -> str:
  return part.replace('%2F', SEP).replace('%25', '%')


def join(*parts: str) -> str:
  """Paths joined with '/', skipping empty ones ('' is the root)."""
  return SEP.join(p for p in parts if p)


def parts(path: str) -> list[str]:
  return path.split(SEP) if path else []


def flatten(tree: Any) -> Flat:
  """Nested mappings -> {'Dense_1/kernel': leaf}, keys escaped. Anything that
  is not a non-empty mapping is a leaf: arrays, None, lists, empty dicts."""
  flat: Flat = {}

  def visit(node: Any, prefix: str) -> None:
    if isinstance(node, Mapping) and node:
      for key, child in node.items():
        visit(child, join(prefix, escape(key)))
    else:
      flat[prefix] = node

  if not isinstance(tree, Mapping):
    raise TypeError(f'expected a mapping of arrays, got {type(tree).__name__}')
  for key, child in tree.items():
    visit(child, escape(key))
  return flat


def unflatten(flat: Flat) -> dict[str, Any]:
  """The inverse of `flatten`: plain nested dicts, keys unescaped."""
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    *inner, last = [unescape(p) for p in parts(path)]
    node = tree
    for key in inner:
      node = node.setdefault(key, {})
    node[last] = value
  return tree


def modules(flat: Iterable[str]) -> set[str]:
  """Every proper prefix of the paths: the sub-trees ('modules') that hold them."""
  found = set()
  for path in flat:
    keys = parts(path)
    found.update(SEP.join(keys[:i]) for i in range(1, len(keys)))
  return found


def under(path: str, prefix: str) -> bool:
  """Whether `path` is `prefix` or lies inside it ('' holds everything)."""
  return not prefix or path == prefix or path.startswith(prefix + SEP)


def matching(pattern: re.Pattern[str], paths: Iterable[str]) -> list[str]:
  """The paths in which `pattern` is found (re.search), in their order."""
  return [p for p in paths if pattern.search(p)]
