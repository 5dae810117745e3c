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

from collections.abc import Mapping
from typing import Any, Iterable

import jax
import regex

SEP = '/'
# Seconds one regex may take on one path. Patterns run in the `regex` engine,
# which can stop: a pattern that backtracks catastrophically fails by name
# instead of hanging a run or a plan.
REGEX_SECONDS = 2.0

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


def key_path(keys: tuple[Any, ...]) -> str:
  """A jax key path as 'a/0/mu': NamedTuple fields, dict keys and list indices
  alike, so a typed state and its target-less restore give the same paths."""
  return SEP.join(escape(next(getattr(k, a) for a in ('name', 'key', 'idx') if hasattr(k, a)))
                  for k in keys)


def leaf_paths(tree: Any) -> Flat:
  """{key_path: leaf} for every leaf of a pytree (None and empty nodes hold none)."""
  return {key_path(k): x for k, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


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


def _bounded(call: Any, pattern: regex.Pattern, path: str) -> Any:
  try:
    return call(timeout=REGEX_SECONDS)
  except TimeoutError:
    raise TimeoutError(f'regex {pattern.pattern!r} ran over {REGEX_SECONDS:g} s on path {path!r}: '
                       'it backtracks catastrophically; simplify it') from None


def matching(pattern: regex.Pattern, paths: Iterable[str]) -> list[str]:
  """The paths in which `pattern` is found (a search), in their order."""
  return [p for p in paths if _bounded(lambda **t: pattern.search(p, **t), pattern, p)]


def groups(pattern: regex.Pattern, path: str) -> tuple[str | None, ...]:
  """What each of `pattern`'s groups captures in `path` (found in it)."""
  return _bounded(lambda **t: pattern.search(path, **t), pattern, path).groups()


def captured(pattern: regex.Pattern, group: str, path: str) -> str:
  """What `pattern`'s named `group` captures in `path` (found in it)."""
  return _bounded(lambda **t: pattern.search(path, **t), pattern, path).group(group)


def substitute(pattern: regex.Pattern, to: str, path: str) -> str:
  """`path` with the first match of `pattern` replaced by `to` (\\1 groups)."""
  return _bounded(lambda **t: pattern.sub(to, path, count=1, **t), pattern, path)
