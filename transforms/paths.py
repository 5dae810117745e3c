"""Param paths: a leaf's keys joined by '/', as `flax.traverse_util` gives them.

Every op names the leaves it touches by a regex searched in these paths, and
every mirror in the optimizer state is matched to the params by them, so this
module is the one place that decides what a path is.
"""
from __future__ import annotations

import re
from typing import Any, Iterable

from flax import traverse_util

SEP = '/'

Flat = dict[str, Any]


def flatten(tree: Any) -> Flat:
  """Nested dicts -> {'Dense_1/kernel': leaf}. Non-dict values are leaves."""
  return traverse_util.flatten_dict(tree, sep=SEP)


def unflatten(flat: Flat) -> dict[str, Any]:
  return traverse_util.unflatten_dict(flat, sep=SEP)


def matching(pattern: re.Pattern[str], paths: Iterable[str]) -> list[str]:
  """The paths in which `pattern` is found (re.search), in their order."""
  return [p for p in paths if pattern.search(p)]
