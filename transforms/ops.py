"""The ops a spec can name. Every op has the same shape.

An op selects param paths by `match` (a regex searched in each path; strict:
matching nothing is an error) and `apply`s itself to a flat tree, returning
the new flat tree and the new paths that came from the selected ones. The
surgery applies it to the params, then to each optimizer-state mirror as the
op's `opt_state` mode says:

  follow  apply the op to the mirror too (structural ops' default)
  keep    leave the mirror as it is (value ops' default, as the seed does)
  zero    apply the op, then zero the mirror entries it produced

Structural ops may not `keep`: a mirror whose keys no longer match the params
does not resume training.
"""
from __future__ import annotations

import dataclasses
import re
from typing import ClassVar, Sequence

import jax
import jax.numpy as jnp

from transforms import paths
from transforms.paths import Flat


class SurgeryError(ValueError):
  """The surgery does not fit a checkpoint; the message names the op and path."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Op:
  """Base of every op: a regex to select params and an opt_state mode."""
  name: ClassVar[str]
  structural: ClassVar[bool]

  match: str
  opt_state: str = ''  # '' means the op's default

  def __post_init__(self):
    try:
      re.compile(self.match)
    except re.error as e:
      raise ValueError(f"field 'match': bad regex {self.match!r}: {e}") from None
    allowed = ('follow', 'zero') if self.structural else ('follow', 'keep', 'zero')
    if self.opt_state and self.opt_state not in allowed:
      raise ValueError(
          f"field 'opt_state': {self.opt_state!r} is not one of {allowed}")

  @property
  def pattern(self) -> re.Pattern[str]:
    return re.compile(self.match)  # re caches compiled patterns

  @property
  def mirror_mode(self) -> str:
    return self.opt_state or ('follow' if self.structural else 'keep')

  def select(self, params: Flat) -> list[str]:
    selected = paths.matching(self.pattern, params)
    if not selected:
      raise SurgeryError(f'match {self.match!r} matched no param path')
    return selected

  def apply(self, flat: Flat, selected: Sequence[str]) -> tuple[Flat, list[str]]:
    raise NotImplementedError


@dataclasses.dataclass(frozen=True, kw_only=True)
class ValueOp(Op):
  """An op that changes the values of the selected leaves, not the tree."""
  structural: ClassVar[bool] = False

  def value(self, x: jax.Array) -> jax.Array:
    raise NotImplementedError

  def apply(self, flat, selected):
    chosen = set(selected)
    new = {p: self.value(x) if p in chosen and x is not None else x
           for p, x in flat.items()}
    return new, list(selected)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rename(Op):
  """Replace the matched part of each selected path: `to` may use \\1 groups."""
  name: ClassVar[str] = 'rename'
  structural: ClassVar[bool] = True
  to: str

  def apply(self, flat, selected):
    chosen = set(selected)
    moved = {p: self.pattern.sub(self.to, p, count=1) for p in selected}
    new: Flat = {}
    came_from: dict[str, str] = {}
    for p, x in flat.items():
      q = moved.get(p, p) if p in chosen else p
      if q in new:
        raise SurgeryError(f'{p!r} and {came_from[q]!r} would both be named {q!r}')
      new[q], came_from[q] = x, p
    return new, [moved[p] for p in selected]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Drop(Op):
  """Remove the selected leaves."""
  name: ClassVar[str] = 'drop'
  structural: ClassVar[bool] = True

  def apply(self, flat, selected):
    chosen = set(selected)
    return {p: x for p, x in flat.items() if p not in chosen}, []


@dataclasses.dataclass(frozen=True, kw_only=True)
class Normalize(ValueOp):
  """x / ||x||, the seed's op."""
  name: ClassVar[str] = 'normalize'

  def value(self, x):
    # The barrier keeps the seed's exact arithmetic: without it XLA rewrites
    # x / sqrt(s) as x * rsqrt(s), which differs in the last bit.
    return x / jax.lax.optimization_barrier(jnp.linalg.norm(x))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Scale(ValueOp):
  """x * by, in x's dtype."""
  name: ClassVar[str] = 'scale'
  by: float

  def value(self, x):
    return (x * self.by).astype(x.dtype)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Cast(ValueOp):
  """x.astype(dtype). Moments keep their dtype unless opt_state: follow."""
  name: ClassVar[str] = 'cast'
  dtype: str

  def __post_init__(self):
    super().__post_init__()
    try:
      jnp.dtype(self.dtype)
    except TypeError:
      raise ValueError(f"field 'dtype': unknown dtype {self.dtype!r}") from None

  def value(self, x):
    return x.astype(jnp.dtype(self.dtype))


OPS: dict[str, type[Op]] = {
    op.name: op for op in (Rename, Drop, Normalize, Scale, Cast)}


def zero(flat: Flat, selected: Sequence[str]) -> Flat:
  """`flat` with the selected leaves replaced by zeros of their own shape."""
  chosen = set(selected)
  return {p: jnp.zeros_like(x) if p in chosen and x is not None else x
          for p, x in flat.items()}


def apply_to_mirror(op: Op, mirror: Flat, selected: Sequence[str]) -> Flat:
  """What `op`, applied to the params at `selected`, does to one mirror."""
  mode = op.mirror_mode
  if mode == 'keep':
    return mirror
  present = [p for p in selected if p in mirror]
  if mode == 'follow':
    return op.apply(mirror, present)[0]
  new, produced = op.apply(mirror, present) if op.structural else (mirror, present)
  return zero(new, produced)

