"""The ops a spec can name. Every op has the same shape.

An op `select`s the param paths it works on (most by `match`, a regex searched
in each path; strict: matching nothing is an error) and `apply`s itself to a
flat tree, returning the new flat tree and the new paths that came from the
selected ones. The surgery applies it to the params, then to each
optimizer-state mirror as the op's `opt_state` mode says:

  follow  apply the op to the mirror too (structural ops' default); new
          entries in a mirror are zeros
  keep    leave the mirror as it is (value ops' default, as the seed does)
  zero    apply the op, then zero the mirror entries it produced (reinit's
          default)

Structural ops may not `keep`: a mirror whose keys or shapes no longer match
the params does not resume training.
"""
from __future__ import annotations

import dataclasses
import importlib
import re
import zlib
from collections.abc import Mapping
from typing import Any, Callable, ClassVar, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import regex

from transforms import paths
from transforms.mirrors import Hole, is_placeholder
from transforms.paths import Flat


class SurgeryError(ValueError):
  """The surgery does not fit a checkpoint; the message names the op and path."""


def _check_regex(field: str, value: str) -> None:
  try:
    regex.compile(value)
  except regex.error as e:
    raise ValueError(f'field {field!r}: bad regex {value!r}: {e}') from None


def _check_template(match: str, to: str) -> None:
  """A replacement template that every match of `match` can fill: no group
  it does not have, no bad escape; not empty (a path cannot be '')."""
  if not to:
    raise ValueError("field 'to': must not be empty (to strip a prefix, capture the rest: "
                     "match: '^model/(.*)$', to: '\\1')")
  try:  # an optional copy of the pattern matches '' with the same groups
    empty = regex.compile(f'(?:{match})?').match('')
  except regex.error:  # a pattern that cannot be wrapped so: checked as it runs
    return
  try:
    empty.expand(to)
  except (IndexError, regex.error) as e:
    raise ValueError(f"field 'to': {to!r} cannot be filled from match {match!r} ({e}; the "
                     f'match has {regex.compile(match).groups} group(s))') from None


def initializer(name: str) -> Callable[..., jax.Array]:
  """A `jax.nn.initializers` function by name: zeros, ones, normal, lecun_normal, ..."""
  factory = getattr(jax.nn.initializers, name, None)
  if name in ('zeros', 'ones'):
    return factory
  if factory is None or name.startswith('_') or not callable(factory):
    raise ValueError(f"field 'init': unknown initializer {name!r} (jax.nn.initializers)")
  try:
    return factory()
  except TypeError as e:  # variance_scaling, orthogonal(scale=...) and the like need arguments
    raise ValueError(f"field 'init': {name} needs arguments the spec cannot give ({e}); "
                     'use one that takes none, such as lecun_normal or glorot_uniform') from None


def path_key(seed: int, path: str) -> jax.Array:
  """The same key for the same seed and path on any worker."""
  return jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(path.encode()) & 0x7FFFFFFF)


def initialize(init: str, seed: int, path: str, shape, dtype) -> jax.Array:
  try:
    return initializer(init)(path_key(seed, path), tuple(shape), jnp.dtype(dtype))
  except (ValueError, TypeError) as e:
    raise SurgeryError(f'{init} cannot initialise {path!r} of shape {tuple(shape)}: {e}') from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Op:
  """Base of every op: how it treats the optimizer-state mirrors."""
  name: ClassVar[str]
  structural: ClassVar[bool]     # changes keys or shapes: mirrors and collections must follow
  moves_only: ClassVar[bool] = False      # only moves or removes leaves (rename, drop)
  changes_shapes: ClassVar[bool] = False  # mirror leaves must then be param-shaped
  creates_leaves: ClassVar[bool] = False  # with an optimizer, its init fills their entries
  default_mode: ClassVar[str] = ''

  opt_state: str = ''  # '' means the op's default

  def __post_init__(self):
    allowed = ('follow', 'zero') if self.structural else ('follow', 'keep', 'zero')
    if self.opt_state and self.opt_state not in allowed:
      raise ValueError(
          f"field 'opt_state': {self.opt_state!r} is not one of {allowed}")

  @property
  def mirror_mode(self) -> str:
    return self.opt_state or self.default_mode or ('follow' if self.structural else 'keep')

  def select(self, params: Flat) -> list[str]:
    raise NotImplementedError

  def apply(self, flat: Flat, selected: Sequence[str], mirror: bool = False
            ) -> tuple[Flat, list[str]]:
    raise NotImplementedError

  def renamed(self, selected: Sequence[str], produced: Sequence[str]) -> dict[str, str]:
    """old path -> new path for leaves this op only moved (for `plan`)."""
    return {}

  verb: ClassVar[str] = ''  # what `combined` says of a leaf: 'fused into', 'split into', ...

  def combined(self, selected: Sequence[str], produced: Sequence[str]) -> dict[str, list[str]]:
    """old path -> the new paths it went into, for leaves this op combined
    with others or cut up (for `plan`)."""
    return {}


@dataclasses.dataclass(frozen=True, kw_only=True)
class MatchOp(Op):
  """An op on the params whose path `match` (a regex) is found in."""
  match: str

  def __post_init__(self):
    super().__post_init__()
    _check_regex('match', self.match)

  @property
  def pattern(self) -> regex.Pattern:
    return regex.compile(self.match)  # the engine caches compiled patterns

  def select(self, params):
    selected = paths.matching(self.pattern, params)
    if not selected:
      raise SurgeryError(f'match {self.match!r} matched no param path')
    return selected


@dataclasses.dataclass(frozen=True, kw_only=True)
class LeafOp(MatchOp):
  """An op that maps each selected leaf to a new leaf at the same path."""
  structural: ClassVar[bool] = False

  def leaf(self, x: jax.Array, path: str, mirror: bool) -> jax.Array:
    raise NotImplementedError

  def apply(self, flat, selected, mirror=False):
    chosen = set(selected)
    if not mirror:
      for p in chosen:
        if not is_array(flat[p]) and not is_empty(flat[p]):
          raise SurgeryError(f'{p!r} is a {type(flat[p]).__name__}, not an array, so {self.name} '
                             'cannot change it (narrow the match to leave it out)')
    new = {p: self.leaf(x, p, mirror) if p in chosen and is_array(x) else x
           for p, x in flat.items()}
    return new, list(selected)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rename(MatchOp):
  """Replace the matched part of each selected path: `to` may use \\1 groups."""
  name: ClassVar[str] = 'rename'
  structural: ClassVar[bool] = True
  moves_only: ClassVar[bool] = True
  to: str

  def __post_init__(self):
    super().__post_init__()
    _check_template(self.match, self.to)

  def apply(self, flat, selected, mirror=False):
    return move(flat, {p: paths.substitute(self.pattern, self.to, p) for p in selected})

  def renamed(self, selected, produced):
    return dict(zip(selected, produced))


def move(flat: Flat, moved: dict[str, str]) -> tuple[Flat, list[str]]:
  """`flat` with the keys in `moved` renamed, refusing two leaves on one name."""
  new: Flat = {}
  came_from: dict[str, str] = {}
  for p, x in flat.items():
    q = moved.get(p, p)
    if q in new:
      raise SurgeryError(f'{p!r} and {came_from[q]!r} would both be named {q!r}')
    new[q], came_from[q] = x, p
  return new, list(moved.values())


@dataclasses.dataclass(frozen=True, kw_only=True)
class Drop(MatchOp):
  """Remove the selected leaves."""
  name: ClassVar[str] = 'drop'
  structural: ClassVar[bool] = True
  moves_only: ClassVar[bool] = True

  def apply(self, flat, selected, mirror=False):
    chosen = set(selected)
    return {p: x for p, x in flat.items() if p not in chosen}, []


@dataclasses.dataclass(frozen=True, kw_only=True)
class Add(Op):
  """A new leaf at `path`, from an initializer; zeros in every mirror (with
  `optimizer:`, whatever its init gives: a factored dummy, or nothing if masked)."""
  name: ClassVar[str] = 'add'
  structural: ClassVar[bool] = True
  creates_leaves: ClassVar[bool] = True
  path: str
  shape: list
  dtype: str = 'float32'
  init: str = 'zeros'
  seed: int = 0

  def __post_init__(self):
    super().__post_init__()
    initializer(self.init)
    _check_dtype(self.dtype)
    if not all(isinstance(n, int) and n >= 0 for n in self.shape):
      raise ValueError(f"field 'shape': expected a list of sizes, got {self.shape!r}")

  def select(self, params):
    if self.path in params:
      raise SurgeryError(f'{self.path!r} already exists')
    return [self.path]

  def apply(self, flat, selected, mirror=False):
    value = (jnp.zeros(self.shape, self.dtype) if mirror
             else initialize(self.init, self.seed, self.path, self.shape, self.dtype))
    return {**flat, self.path: value}, [self.path]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Normalize(LeafOp):
  """x / ||x||, the seed's op."""
  name: ClassVar[str] = 'normalize'

  def leaf(self, x, path, mirror):
    # The barrier keeps the seed's exact arithmetic: without it XLA rewrites
    # x / sqrt(s) as x * rsqrt(s), which differs in the last bit.
    return x / jax.lax.optimization_barrier(jnp.linalg.norm(x))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Scale(LeafOp):
  """x * by, in x's dtype."""
  name: ClassVar[str] = 'scale'
  by: float

  def leaf(self, x, path, mirror):
    return (x * self.by).astype(x.dtype)


def _check_dtype(dtype: str) -> None:
  try:
    jnp.dtype(dtype)
  except TypeError:
    raise ValueError(f"field 'dtype': unknown dtype {dtype!r}") from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Cast(LeafOp):
  """x.astype(dtype). Moments keep their dtype unless opt_state: follow."""
  name: ClassVar[str] = 'cast'
  dtype: str

  def __post_init__(self):
    super().__post_init__()
    _check_dtype(self.dtype)

  def leaf(self, x, path, mirror):
    return x.astype(jnp.dtype(self.dtype))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Reinit(LeafOp):
  """A fresh value from an initializer; the mirrors of what it re-initialises are zeroed."""
  name: ClassVar[str] = 'reinit'
  default_mode: ClassVar[str] = 'zero'
  init: str
  seed: int = 0

  def __post_init__(self):
    super().__post_init__()
    initializer(self.init)

  def leaf(self, x, path, mirror):
    return initialize(self.init, self.seed, path, x.shape, x.dtype)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShapeOp(LeafOp):
  """A leaf op that changes shapes: mirrors follow (they must keep the params' shapes)."""
  structural: ClassVar[bool] = True
  changes_shapes: ClassVar[bool] = True


def check_axis(x: jax.Array, axis: int, path: str) -> int:
  """`axis` of `x` as a non-negative index, or an error naming the leaf."""
  if not -x.ndim <= axis < x.ndim:
    raise SurgeryError(f'{path!r} of shape {tuple(x.shape)} has no axis {axis}')
  return axis % x.ndim


@dataclasses.dataclass(frozen=True, kw_only=True)
class Pad(ShapeOp):
  """Grow `axis` to `to` at the end; params' new entries from `init`.

  Mirrors' new slots: with `optimizer:`, what its init gives; without, zeros,
  where zero is proven a value of that state (a stored zero, or the spec's
  `mirror_init: zeros`, the user's word that zeros are their optimizer's
  init, as Adam's moments' are); otherwise the checkpoint fails by name.
  """
  name: ClassVar[str] = 'pad'
  axis: int
  to: int
  init: str = 'zeros'
  seed: int = 0
  mirror_init: str = ''  # '' (prove it) or 'zeros' (the user says so)

  def __post_init__(self):
    super().__post_init__()
    initializer(self.init)
    if self.mirror_init not in ('', 'zeros'):
      raise ValueError(f"field 'mirror_init': {self.mirror_init!r} is not 'zeros' (with an "
                       "optimizer whose init is not zeros, give the spec 'optimizer:' instead)")

  def leaf(self, x, path, mirror):
    axis = check_axis(x, self.axis, path)
    if self.to < x.shape[axis]:
      raise SurgeryError(f'{path!r} axis {axis} is {x.shape[axis]}, more than to={self.to}')
    shape = list(x.shape)
    shape[axis] = self.to
    base = (jnp.zeros(shape, x.dtype) if mirror or self.init == 'zeros'
            else initialize(self.init, self.seed, path, shape, x.dtype))
    return jax.lax.dynamic_update_slice_in_dim(base, x, 0, axis)

  def grow(self, x, path):
    """A mirror entry whose new slots the optimizer's init fills (its init
    need not be zeros: COCOB starts at 1e-8, schedule-free at the params)."""
    return Grown(x, check_axis(x, self.axis, path))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Slice(ShapeOp):
  """Keep [start, stop) of `axis`."""
  name: ClassVar[str] = 'slice'
  axis: int
  start: int = 0
  stop: int

  def leaf(self, x, path, mirror):
    axis = check_axis(x, self.axis, path)
    if not 0 <= self.start < self.stop <= x.shape[axis]:
      raise SurgeryError(f'{path!r} axis {axis} of size {x.shape[axis]} has no [{self.start}, {self.stop})')
    return jax.lax.slice_in_dim(x, self.start, self.stop, axis=axis)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Repeat(ShapeOp):
  """Grow `axis` to `to` by repeating its slices: each slice `to / n` times
  in a row (KV heads for multi-head attention: head j serves the query
  heads of its group, j*g to j*g+g-1), or with `tile`, the whole axis
  `to / n` times over. Mirrors are repeated as their param is: each new
  slice's Adam moments are those of the slice it copies."""
  name: ClassVar[str] = 'repeat'
  axis: int
  to: int
  tile: bool = False

  def leaf(self, x, path, mirror):
    axis = check_axis(x, self.axis, path)
    size = x.shape[axis]
    if self.to % size or self.to < size:
      raise SurgeryError(f'cannot repeat {path!r} of shape {tuple(x.shape)} to {self.to} along '
                         f'axis {self.axis}: {self.to} is not a multiple of its {size}')
    times = self.to // size
    if self.tile:
      return jnp.concatenate([x] * times, axis=axis)
    return jnp.repeat(x, times, axis=axis)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Transpose(ShapeOp):
  """Permute the axes."""
  name: ClassVar[str] = 'transpose'
  axes: list

  def leaf(self, x, path, mirror):
    if sorted(self.axes) != list(range(x.ndim)):
      raise SurgeryError(f'axes {self.axes} do not permute the {x.ndim} axes of {path!r}')
    return jnp.transpose(x, self.axes)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Reshape(ShapeOp):
  """A new shape with the same number of entries."""
  name: ClassVar[str] = 'reshape'
  shape: list

  def leaf(self, x, path, mirror):
    try:
      return jnp.reshape(x, self.shape)
    except (TypeError, ValueError) as e:
      raise SurgeryError(f'{path!r} of shape {tuple(x.shape)}: {e}') from None


def layer_order(path: str) -> tuple[int, ...]:
  """The integers in a path, so that layer_10 sorts after layer_9."""
  return tuple(int(n) for n in re.findall(r'\d+', path))


@dataclasses.dataclass(frozen=True, kw_only=True)
class CombineOp(MatchOp):
  """An op that combines the leaves that rename to one `to` path into one
  leaf there (stack, fuse); where a mirror holds none of them as arrays
  (masked or stale), the target holds what the first did."""
  structural: ClassVar[bool] = True
  changes_shapes: ClassVar[bool] = True
  to: str

  def __post_init__(self):
    super().__post_init__()
    _check_template(self.match, self.to)

  def gather(self, target: str, members: list[str], flat: Flat,
             mirror: bool) -> list[tuple[str, Any]]:
    """(path, value) of what combines into `target`, in order."""
    raise NotImplementedError

  def combine(self, target: str, members: list[str], values: list[jax.Array]) -> jax.Array:
    raise NotImplementedError

  def combined(self, selected, produced):
    return {p: [paths.substitute(self.pattern, self.to, p)] for p in selected}

  def apply(self, flat, selected, mirror=False):
    groups: dict[str, list[str]] = {}
    for p in sorted(selected, key=layer_order):
      groups.setdefault(paths.substitute(self.pattern, self.to, p), []).append(p)
    new = {p: x for p, x in flat.items() if p not in set(selected)}
    for target, found in groups.items():
      members, values = map(list, zip(*self.gather(target, found, flat, mirror)))
      if target in new:
        raise SurgeryError(f'{target!r} already exists')
      if not any(is_array(v) for v in values):  # masked or stale in this mirror
        new[target] = values[0]
        continue
      if not all(is_array(v) for v in values):
        raise SurgeryError(f'cannot {self.name} {members} into {target!r}: some are masked or '
                           'stale in this optimizer state and some are not')
      new[target] = self.combine(target, members, values)
    return new, list(groups)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Stack(CombineOp):
  """Stack the leaves that rename to the same `to` path along a new `axis`.

  With `expected: N`, each stack must hold layers 0 to N-1, the layer index
  being the first capture group of digits. A missing layer fails by name,
  unless `fill` (zeros, or an initializer, seeded by `seed` and the
  stack's path) gives its params; its optimizer-state entries are then
  zeros, where the spec says `mirror_init: zeros` (Adam's moments start
  there), and the stack fails by name otherwise."""
  name: ClassVar[str] = 'stack'
  verb: ClassVar[str] = 'stacked into'
  axis: int = 0
  expected: int = 0
  fill: str = ''
  seed: int = 0
  mirror_init: str = ''

  def __post_init__(self):
    super().__post_init__()
    if self.fill:
      initializer(self.fill)
      if not self.expected:
        raise ValueError("field 'fill': fills the layers `expected` counts: give expected too")
    if self.mirror_init not in ('', 'zeros'):
      raise ValueError(f"field 'mirror_init': {self.mirror_init!r} is not 'zeros'")

  def index(self, path: str) -> int:
    """A member's layer index: its first capture group of digits."""
    found = next((g for g in paths.groups(self.pattern, path) if g and g.isdigit()), None)
    if found is None:
      raise SurgeryError(f"{path!r}: expected: needs each layer's index captured by a group of "
                         f'digits in {self.match!r}')
    return int(found)

  def gather(self, target, members, flat, mirror):
    """In layer order; missing layers filled, or an error."""
    if not self.expected:
      return [(p, flat[p]) for p in members]
    by_index = {self.index(p): p for p in members}
    outside = sorted(i for i in by_index if i >= self.expected)
    if outside:
      raise SurgeryError(f'cannot stack into {target!r}: layer(s) {outside} beyond the '
                         f'{self.expected} expected')
    missing = [i for i in range(self.expected) if i not in by_index]
    if missing and not self.fill:
      raise SurgeryError(f'cannot stack into {target!r}: layer(s) {missing} of the '
                         f'{self.expected} expected are missing (fill: zeros or an initializer '
                         'fills them)')
    if missing and mirror and self.mirror_init != 'zeros':
      raise SurgeryError(f'cannot stack into {target!r} in the optimizer state: the entries of '
                         f'filled layer(s) {missing} are unknown; say mirror_init: zeros where '
                         "zeros are the optimizer's init (Adam's moments)")
    like = flat[by_index[min(by_index)]]
    fill = lambda i: (like if not is_array(like)  # masked or stale in this mirror: all alike
                      else jnp.zeros(like.shape, like.dtype) if mirror or self.fill == 'zeros'
                      else initialize(self.fill, self.seed, f'{target}[{i}]', like.shape,
                                      like.dtype))
    return [(by_index[i], flat[by_index[i]]) if i in by_index else (f'{target}[{i}]', fill(i))
            for i in range(self.expected)]

  def combine(self, target, members, values):
    shapes = {(tuple(v.shape), str(v.dtype)) for v in values}
    if len(shapes) != 1:
      raise SurgeryError(f'cannot stack {members} into {target!r}: shapes/dtypes {sorted(shapes)}')
    if not -values[0].ndim - 1 <= self.axis <= values[0].ndim:
      raise SurgeryError(f'cannot stack {members} of shape {tuple(values[0].shape)} along axis '
                         f'{self.axis}')
    return jnp.stack(values, axis=self.axis)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CutOp(MatchOp):
  """An op that cuts each selected leaf into pieces (unstack, split), which
  `to` names by `PIECE`, standing for each piece's key."""
  PIECE: ClassVar[str]
  structural: ClassVar[bool] = True
  changes_shapes: ClassVar[bool] = True
  to: str

  def __post_init__(self):
    super().__post_init__()
    if self.PIECE not in self.to:
      raise ValueError(f"field 'to': must contain {self.PIECE}, each piece's key")

  def pieces(self, x: jax.Array, path: str) -> list[tuple[str, jax.Array]]:
    """(key, piece) of a leaf, in order."""
    raise NotImplementedError

  def combined(self, selected, produced):
    cut = {}
    for p in selected:  # each piece's path is `to` filled in on p, with its key for PIECE
      before, _, after = paths.substitute(self.pattern, self.to.replace(self.PIECE, '\0'),
                                          p).partition('\0')
      cut[p] = [q for q in produced if q.startswith(before) and q.endswith(after)]
    return cut

  def apply(self, flat, selected, mirror=False):
    chosen = set(selected)
    new, produced = {}, []
    for p, x in flat.items():
      if p not in chosen:
        new[p] = x
        continue
      if not is_array(x):
        raise SurgeryError(f'cannot {self.name} {p!r}: it is masked or stale in this optimizer '
                           'state')
      for key, piece in self.pieces(x, p):
        q = paths.substitute(self.pattern, self.to.replace(self.PIECE, key), p)
        if q in flat or q in new:
          raise SurgeryError(f'cutting {p!r} ({self.name}) would overwrite {q!r}')
        new[q] = piece
        produced.append(q)
    return new, produced


@dataclasses.dataclass(frozen=True, kw_only=True)
class Unstack(CutOp):
  """Split each selected leaf along `axis`; `to` names piece {i}. With
  `expected: N`, the axis must hold N layers."""
  name: ClassVar[str] = 'unstack'
  PIECE: ClassVar[str] = '{i}'
  verb: ClassVar[str] = 'unstacked into'
  axis: int = 0
  expected: int = 0

  def __post_init__(self):
    super().__post_init__()
    _check_template(self.match, self.to.replace('{i}', '0'))

  def pieces(self, x, path):
    count = x.shape[check_axis(x, self.axis, path)]
    if self.expected and count != self.expected:
      raise SurgeryError(f'cannot unstack {path!r} of shape {tuple(x.shape)}: axis {self.axis} '
                         f'holds {count} layer(s), not the {self.expected} expected')
    return [(str(i), jnp.take(x, i, axis=self.axis)) for i in range(count)]


def _check_parts(parts: list[str]) -> None:
  if len(parts) < 2 or len(set(parts)) != len(parts):
    raise ValueError(f"field 'parts': two or more distinct names, got {parts}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Fuse(CombineOp):
  """Concatenate, along `axis`, the leaves that rename to one `to` path, in
  the order `parts` gives: `match` captures each leaf's part name as
  (?P<part>...). Query, key and value kernels into one qkv kernel; every
  mirror is fused the same way."""
  name: ClassVar[str] = 'fuse'
  verb: ClassVar[str] = 'fused into'
  parts: list[str]
  axis: int = -1

  def __post_init__(self):
    super().__post_init__()
    if 'part' not in regex.compile(self.match).groupindex:
      raise ValueError("field 'match': must capture each leaf's part name as (?P<part>...), "
                       "e.g. '^(.*)/(?P<part>query|key|value)/kernel$'")
    _check_parts(self.parts)

  def gather(self, target, members, flat, mirror):
    """In the order of `parts`, each there once."""
    by_part = {}
    for p in members:
      part = paths.captured(self.pattern, 'part', p)
      if part not in self.parts:
        raise SurgeryError(f'{p!r}: its part {part!r} is not one of the parts {self.parts}')
      by_part[part] = p
    missing = [part for part in self.parts if part not in by_part]
    if missing:
      raise SurgeryError(f'cannot fuse {members} into {target!r}: no {", ".join(missing)} part')
    return [(by_part[part], flat[by_part[part]]) for part in self.parts]

  def combine(self, target, members, values):
    axis = check_axis(values[0], self.axis, members[0])
    off_axis = {(tuple(v.shape[:axis]) + tuple(v.shape[axis + 1:]), str(v.dtype), v.ndim)
                for v in values}
    if len(off_axis) != 1:
      shapes = ', '.join(f'{p} {tuple(v.shape)} {v.dtype}' for p, v in zip(members, values))
      raise SurgeryError(f'cannot fuse into {target!r} along axis {self.axis}: the parts '
                         f'differ off that axis ({shapes})')
    return jnp.concatenate(values, axis=axis)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Split(CutOp):
  """Split each selected leaf along `axis` into `parts` of `sizes`; `to`
  names each piece, {part} standing for its name. Fuse's inverse; every
  mirror is split the same way."""
  name: ClassVar[str] = 'split'
  PIECE: ClassVar[str] = '{part}'
  verb: ClassVar[str] = 'split into'
  parts: list[str]
  sizes: list[int]
  axis: int = -1

  def __post_init__(self):
    super().__post_init__()
    _check_template(self.match, self.to.replace('{part}', self.parts[0] if self.parts else 'x'))
    _check_parts(self.parts)
    if len(self.sizes) != len(self.parts) or any(n < 1 for n in self.sizes):
      raise ValueError(f"field 'sizes': a positive size for each of the {len(self.parts)} parts, "
                       f'got {self.sizes}')

  def pieces(self, x, path):
    axis = check_axis(x, self.axis, path)
    if sum(self.sizes) != x.shape[axis]:
      raise SurgeryError(f'cannot split {path!r} of shape {tuple(x.shape)}: the sizes '
                         f'{self.sizes} add up to {sum(self.sizes)}, and axis {self.axis} '
                         f'has {x.shape[axis]}')
    starts = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
    return [(part, jax.lax.slice_in_dim(x, start, start + size, axis=axis))
            for part, start, size in zip(self.parts, starts, self.sizes)]


@dataclasses.dataclass(frozen=True, kw_only=True)
class MergeLora(MatchOp):
  """Fold LoRA adapters into the base kernels they sit beside:
  W + scale * (A @ B), in float32, cast to W's dtype; A and B are dropped.
  `match` selects the base kernels; `a` and `b` name each one's adapters
  (templates on the match, as `to` is). In every mirror the adapters'
  entries are dropped with them and the base's are kept: the base was
  frozen while the adapters trained, so its moments are still its own."""
  name: ClassVar[str] = 'merge_lora'
  structural: ClassVar[bool] = True
  a: str
  b: str
  scale: float = 1.0

  def __post_init__(self):
    super().__post_init__()
    _check_template(self.match, self.a)
    _check_template(self.match, self.b)

  verb: ClassVar[str] = 'merged into'

  def combined(self, selected, produced):
    return {adapter: [base] for base in produced for adapter in self.adapters(base)}

  def adapters(self, base: str) -> tuple[str, str]:
    return (paths.substitute(self.pattern, self.a, base),
            paths.substitute(self.pattern, self.b, base))

  def select(self, params):
    """The base kernels, then their adapters (so that mirrors drop them too)."""
    bases = super().select(params)
    for base in bases:
      for adapter in self.adapters(base):
        if adapter not in params:
          raise SurgeryError(f'{base!r} has no adapter {adapter!r}')
        if paths.matching(self.pattern, [adapter]):
          raise SurgeryError(f'{adapter!r}, an adapter, is matched by {self.match!r} too: '
                             'narrow the match to the base kernels')
    return bases + [p for base in bases for p in self.adapters(base)]

  def apply(self, flat, selected, mirror=False):
    bases = paths.matching(self.pattern, selected)  # the rest are adapters: none matches
    new = {p: x for p, x in flat.items() if p not in set(selected) - set(bases)}
    if mirror:
      return new, []
    for base in bases:
      w, (a, b) = flat[base], (flat[p] for p in self.adapters(base))
      if not (w.ndim == a.ndim == b.ndim == 2 and a.shape[1] == b.shape[0]
              and (a.shape[0], b.shape[1]) == tuple(w.shape)):
        a_path, b_path = self.adapters(base)
        raise SurgeryError(f'cannot merge {a_path!r} {tuple(a.shape)} @ {b_path!r} '
                           f'{tuple(b.shape)} into {base!r} {tuple(w.shape)}: A must be (in, r) '
                           'and B (r, out) for W (in, out)')
      product = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32),
                           precision=jax.lax.Precision.HIGHEST)
      new[base] = (w.astype(jnp.float32) + jnp.float32(self.scale) * product).astype(w.dtype)
    return new, bases


def resolve(name: str, field: str) -> Any:
  """'pkg.module:attr' or 'pkg.module.attr' -> the object, imported."""
  module, _, attr = name.partition(':') if ':' in name else name.rpartition('.')
  try:
    return getattr(importlib.import_module(module), attr)
  except (ImportError, AttributeError, ValueError) as e:
    raise ValueError(f'field {field!r}: cannot import {name!r}: {e}') from None


class Context(NamedTuple):
  """What whole-state ops need to know of the spec."""
  params: str
  opt_state: str
  optimizer: Any  # an optax GradientTransformation, or None


@dataclasses.dataclass(frozen=True, kw_only=True)
class StateOp(Op):
  """An op on the whole {params, opt_state} tree rather than on selected leaves."""
  structural: ClassVar[bool] = True

  def select(self, params):
    return []

  def transform(self, tree: dict[str, Any], ctx: Context) -> dict[str, Any]:
    raise NotImplementedError


@dataclasses.dataclass(frozen=True, kw_only=True)
class Python(StateOp):
  """A user's jittable `state -> state`, where state is {params, opt_state}."""
  name: ClassVar[str] = 'python'
  fn: str

  def __post_init__(self):
    super().__post_init__()
    if not callable(resolve(self.fn, 'fn')):
      raise ValueError(f"field 'fn': {self.fn!r} is not callable")

  def transform(self, tree, ctx):
    out = resolve(self.fn, 'fn')(dict(tree))
    if not isinstance(out, dict) or ctx.params not in out:
      raise SurgeryError(f'{self.fn} must return the state dict with {ctx.params!r}')
    return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResetOptimizer(StateOp):
  """opt_state = the optimizer's init of the params (needs `optimizer:`)."""
  name: ClassVar[str] = 'reset_optimizer'

  def transform(self, tree, ctx):
    if ctx.optimizer is None:
      raise SurgeryError("needs the spec's 'optimizer:' section to build a fresh state")
    return {**tree, ctx.opt_state: ctx.optimizer.init(tree[ctx.params])}


@dataclasses.dataclass(frozen=True, kw_only=True)
class DropOptimizer(StateOp):
  """Remove opt_state from the checkpoint (for serving)."""
  name: ClassVar[str] = 'drop_optimizer'

  def transform(self, tree, ctx):
    return {k: v for k, v in tree.items() if k != ctx.opt_state}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Relayout(StateOp):
  """The state laid out as another library saves it; the spec's last op,
  run on the surgery's result once the guard has proven it. Both presets
  take the whole state (spec `params: ''`); every leaf is moved, none
  computed, and `names` renames modules (a path's keys) on the way.

  linen_to_nnx: a Linen TrainState {params, batch_stats, ..., opt_state,
  step} becomes what NNX's guide saves, {'model': nnx.state(model),
  'optimizer': nnx.state(nnx.Optimizer(...))}: each param and collection
  leaf at model/<path>/value, each optimizer-state leaf at
  optimizer/opt_state/<i>/<path>/value (optax's empty states, which NNX
  does not store, left out), the step at optimizer/step/value.

  nnx_to_linen: the way back (spec `opt_state: optimizer`). A model leaf
  the optimizer's moments shadow is a param; any other (BatchNorm's
  statistics) goes to `batch_stats`. The optimizer state is the list of
  `opt_states` optax states (adam's chain: 2), those NNX did not store
  empty (None), as Linen's TrainState saves them."""
  name: ClassVar[str] = 'relayout'
  PRESETS: ClassVar[tuple[str, ...]] = ('linen_to_nnx', 'nnx_to_linen')
  preset: str
  names: dict = dataclasses.field(default_factory=dict)
  opt_states: int = 0  # nnx_to_linen: how many states optax's chain has (0: as many as stored)

  def __post_init__(self):
    super().__post_init__()
    if self.preset not in self.PRESETS:
      raise ValueError(f"field 'preset': {self.preset!r} is not one of {', '.join(self.PRESETS)}")
    if not all(isinstance(k, str) and isinstance(v, str) and v for k, v in self.names.items()):
      raise ValueError("field 'names': a mapping of module names to module names")

  def _named(self, path: str) -> str:
    return paths.join(*(self.names.get(k, k) for k in paths.parts(path)))

  def moves(self, tree: dict[str, Any], ctx: Context) -> dict[str, str]:
    """Each leaf's path in the surgery's tree -> its path after the relayout."""
    if ctx.params != '':
      raise SurgeryError(f"{self.preset} lays out the whole state: say params: '' in the spec")
    if self.preset == 'linen_to_nnx':
      return self._linen_to_nnx(tree[''], tree.get(ctx.opt_state), ctx.opt_state)
    return self._nnx_to_linen(tree[''], tree.get(ctx.opt_state), ctx.opt_state)

  def _linen_to_nnx(self, state: dict[str, Any], opt_state: Any, key: str) -> dict[str, str]:
    if 'params' not in state:
      raise SurgeryError(f'no params in the state (keys {sorted(state)}): not a Linen TrainState')
    moved = {}
    for name, value in state.items():
      if name == 'step':
        moved['step'] = 'optimizer/step/value'
      elif isinstance(value, Mapping):  # params, and collections such as batch_stats
        moved.update({paths.join(name, p): paths.join('model', self._named(p), 'value')
                      for p, x in paths.flatten(value).items() if not is_empty(x)})
      else:
        raise SurgeryError(f'{name!r} is not a collection of the model nor its step: NNX has '
                           'no place for it')
    entries = opt_state if isinstance(opt_state, (list, tuple)) else [opt_state]
    for i, entry in enumerate(entries):
      if isinstance(entry, Mapping):
        moved.update({paths.join(key, str(i), p):
                      paths.join('optimizer/opt_state', str(i), self._named(p), 'value')
                      for p, x in paths.flatten(entry).items() if is_array(x)})
      elif entry is not None:
        raise SurgeryError(f'{key}[{i}] is a {type(entry).__name__}: not a state NNX stores')
    return moved

  def _nnx_to_linen(self, state: dict[str, Any], optimizer: Any, key: str) -> dict[str, str]:
    if set(state) != {'model'} or not isinstance(optimizer, Mapping):
      raise SurgeryError(f"not an NNX model and optimizer (state keys {sorted(state)}, "
                         f"{key!r} {type(optimizer).__name__}): say opt_state: optimizer, "
                         "the key NNX's guide saves it under")
    unwrap = lambda p: p[:-len('/value')] if p.endswith('/value') else p
    held = {unwrap(p) for p in paths.flatten(optimizer)}
    moments = {p.split('/', 3)[3] for p in held if paths.parts(p)[:1] == ['opt_state']
               and len(paths.parts(p)) > 3 and paths.parts(p)[2] in ('mu', 'nu', 'trace')}
    moved = {}
    for p, x in paths.flatten(state['model']).items():
      if unwrap(p) not in moments and not (is_array(x) and jnp.issubdtype(x.dtype, jnp.floating)):
        raise SurgeryError(f'model/{p} is neither a param (the optimizer holds no moments of it) '
                           'nor a float statistic (such as BatchNorm\'s): Linen\'s TrainState has '
                           'no place for it (an nnx.Rngs key or count?)')
      where = 'params' if unwrap(p) in moments else 'batch_stats'
      moved[paths.join('model', p)] = paths.join(where, self._named(unwrap(p)))
    for p in paths.flatten(optimizer):
      if unwrap(p) == 'step':
        moved[paths.join(key, p)] = 'step'
      elif paths.parts(p)[:1] == ['opt_state'] and len(paths.parts(p)) > 2:
        moved[paths.join(key, p)] = paths.join('opt_state', self._named(unwrap(p)[len('opt_state/'):]))
      else:
        raise SurgeryError(f'{key}/{p} is neither the step nor optimizer state: Linen has no '
                           'place for it')
    return moved

  def transform(self, tree, ctx):
    moved = self.moves(tree, ctx)
    flat = {paths.join(key, p): x for key in tree if key for p, x in _leaves(tree[key]).items()}
    flat.update(paths.flatten(tree['']))
    out = paths.unflatten({moved[p]: x for p, x in flat.items() if p in moved})
    if self.preset == 'nnx_to_linen' and 'opt_state' in out:  # positions, as optax's tuple
      stored = out['opt_state']
      count = max(self.opt_states, 1 + max(int(i) for i in stored))
      out['opt_state'] = [stored.get(str(i)) for i in range(count)]
    return {'': out}


def _leaves(node: Any) -> Flat:
  """An optimizer state's leaves by path, its tuples' positions as keys."""
  if isinstance(node, (list, tuple)) and not is_array(node):
    return {paths.join(str(i), p): x for i, entry in enumerate(node)
            for p, x in _leaves(entry).items()}
  if isinstance(node, Mapping):
    return {paths.join(k, p): x for k, v in node.items() for p, x in _leaves(v).items()}
  return {'': node} if node is not None else {}


OPS: dict[str, type[Op]] = {op.name: op for op in (
    Rename, Drop, Add, Normalize, Scale, Cast, Reinit, Pad, Slice, Repeat, Transpose, Reshape,
    Stack, Unstack, Fuse, Split, MergeLora, Python, ResetOptimizer, DropOptimizer, Relayout)}


class Stale:
  """A mirror leaf that could not follow its param (a factored Adafactor moment
  whose param changed shape); the optimizer's own init replaces it."""

  def __repr__(self):
    return 'STALE'


STALE = Stale()


@dataclasses.dataclass(frozen=True, eq=False)
class Grown:
  """A mirror entry padded along `axis`: its old values stay at the start, the
  optimizer's init of the new params gives the rest."""
  value: Any
  axis: int


def is_array(x: Any) -> bool:
  """An array leaf, concrete or traced or abstract."""
  return hasattr(x, 'shape') and hasattr(x, 'dtype')


def is_empty(x: Any) -> bool:
  """An empty sub-tree, kept as a leaf of its own (see paths.flatten)."""
  return isinstance(x, Mapping) and not x


def zero(flat: Flat, selected: Sequence[str]) -> Flat:
  """`flat` with the selected leaves replaced by zeros of their own shape."""
  chosen = set(selected)
  return {p: jnp.zeros_like(x) if p in chosen and is_array(x) else x
          for p, x in flat.items()}


def _require_full_copy(mirror: Flat, params: Flat, where: str) -> None:
  """Zeros are a new leaf's entry only in a mirror that holds every param at
  its shape; in a masked or factored one, only the optimizer knows."""
  for p, x in params.items():
    entry = mirror.get(p)
    if not is_array(entry) or tuple(entry.shape) != tuple(x.shape):
      held = 'has no entry' if not is_array(entry) else f'has shape {tuple(entry.shape)}'
      raise SurgeryError(
          f"{where} is not a full copy of the params ({p!r} {held}), so a new leaf's "
          "entry there is unknown; give the spec an 'optimizer:' section to take it "
          "from the optimizer's init")


def apply_to_mirror(op: Op, mirror: Flat, selected: Sequence[str], params: Flat,
                    can_rebuild: bool, where: str = 'opt_state',
                    zero_fills: list[tuple[str, Any]] | None = None) -> Flat:
  """What `op`, applied to `params` at `selected`, does to one mirror.

  A mirror leaf whose shape is not its param's cannot follow an op that
  changes shapes: it becomes STALE when the optimizer can rebuild it, else
  the checkpoint fails naming the leaf. New leaves' entries, and those `zero`
  resets, are STALE too when the optimizer can say what they are (factored,
  masked, zeros or its own starting values).

  Without the optimizer, a pad writes zeros into a mirror entry's new slots:
  each such entry, as it was before, goes to `zero_fills` as
  ('<where> <path>', value), so that the caller can refuse zeros in a state
  that holds none (COCOB's starts at 1e-8: zeros there are NaN a step
  later). A `zero` reset asks for zeros by name, and gets them.
  """
  mode = op.mirror_mode
  if mode == 'keep':
    return mirror
  present = [p for p in selected if p in mirror]
  mirror = dict(mirror)
  for p in present:
    x = mirror[p]
    if isinstance(x, Grown) and not op.moves_only:
      mirror[p] = STALE  # padded, then changed again: init rebuilds it whole
    elif op.changes_shapes and not is_placeholder(x) and not isinstance(x, (Hole, Stale, Grown)) and (
        not is_array(x) or tuple(x.shape) != tuple(params[p].shape)):
      held = f'has shape {tuple(x.shape)}' if is_array(x) else f'is a {type(x).__name__}'
      if not can_rebuild:
        raise SurgeryError(
            f'{where} leaf {p!r} {held}, not its param\'s '
            f'{tuple(params[p].shape)} array, so it cannot follow; give the spec an '
            "'optimizer:' section to rebuild it from the optimizer's init")
      mirror[p] = STALE
  if can_rebuild and hasattr(op, 'grow') and mode == 'follow':
    return {**mirror, **{p: op.grow(mirror[p], p) for p in present if is_array(mirror[p])}}
  if op.creates_leaves and not can_rebuild:
    _require_full_copy(mirror, params, where)
  if (not can_rebuild and hasattr(op, 'grow') and mode == 'follow' and not op.mirror_init
      and zero_fills is not None):
    zero_fills.extend((f'{where} {p}', mirror[p]) for p in present if is_array(mirror[p]))
  if mode == 'follow' or op.structural:
    new, produced = op.apply(mirror, present, mirror=True)
  else:  # a value op with `zero`: the values stay, then are zeroed
    new, produced = mirror, present
  if op.creates_leaves and can_rebuild:
    return {**new, **{p: STALE for p in produced}}
  if mode == 'follow':
    return new
  # `zero` resets what the op produced: to the optimizer's own init where it
  # is known (COCOB's scale starts at 1e-8, schedule-free's z at the params).
  return {**new, **{p: STALE for p in produced if is_array(new[p])}} if can_rebuild else zero(new, produced)
