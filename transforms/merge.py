"""Many checkpoints into one: which steps a merge takes, and how it combines them.

A merge (checkpoint averaging, a soup of runs, an EMA over stored steps) is
one weighted sum. Each method only chooses its coefficients `c` over the K
inputs, ordered oldest step first (`coefficients`):
- mean: c_i = 1 / K;
- weighted: c_i = w_i / sum(w), the weights as given;
- ema (decay d): c_0 = d^(K-1), c_i = (1 - d) d^(K-1-i), what the running
  e = d e + (1 - d) x_i leaves after the newest input.
They are computed in float64 and sum to 1.

`Running` (and `combine_leaf`, the same for pieces in hand) makes every
float leaf as

    acc = c_0 * x_0;  acc = acc + c_i * x_i  for i = 1 .. K-1;  cast(acc)

in the accumulating dtype (float64 for float64 leaves, float32 for every
other float), each product and each sum rounded on its own, then cast to
the leaf's stored dtype. That order, and NumPy on the host rather than a
compiled kernel that may fuse a product into its sum, make a merge the same
bits on every worker whatever its accelerator, and reproducible by anyone
with the inputs and this paragraph. Every element is computed alone, so a
leaf merged a slab of rows at a time is the same bits as merged whole.

Integer and boolean leaves (step counters, Adam's `count`) are never
averaged: they come from the newest input.

Nothing here reads a file: `pipeline.merge` reads each input's piece of
a pack in turn and adds it to its leaf's `Running` sum.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np

METHODS = ('mean', 'weighted', 'ema')
GROUPS = ('run', 'step', 'all')  # the steps of each run; each step across runs (a soup); all
OPT_STATES = ('latest', 'drop', 'mean')  # the newest input's; none; merged as params are


class MergeError(ValueError):
  """Inputs a merge cannot combine, or a merge's own settings wrong; says which."""


class Leaf(NamedTuple):
  """What must agree across a merge's inputs for one leaf."""
  shape: tuple[int, ...]
  dtype: np.dtype


def coefficients(method: str, count: int, weights: Sequence[float] | None = None,
                 decay: float | None = None) -> np.ndarray:
  """Each input's coefficient (float64, oldest first) under `method`."""
  if count < 1:
    raise MergeError('a merge needs at least one input')
  if method == 'mean':
    return np.full(count, 1.0 / count)
  if method == 'weighted':
    if weights is None or len(weights) != count:
      raise MergeError(f'weighted: {0 if weights is None else len(weights)} weight(s) for '
                       f'{count} input(s)')
    given = np.asarray(weights, np.float64)
    if not np.all(np.isfinite(given)) or np.any(given < 0) or given.sum() <= 0:
      raise MergeError(f'weighted: weights must be finite, not negative, and not all zero: '
                       f'{list(weights)}')
    return given / given.sum()
  if method == 'ema':
    if decay is None or not 0.0 <= decay < 1.0:
      raise MergeError(f'ema: decay must be in [0, 1), not {decay}')
    powers = decay ** np.arange(count - 1, -1, -1, dtype=np.float64)
    return np.concatenate([powers[:1], (1.0 - decay) * powers[1:]])
  raise MergeError(f'unknown merge method {method!r}; one of {", ".join(METHODS)}')


def is_averaged(dtype: np.dtype) -> bool:
  """Whether a leaf of this dtype is combined (floats), not the newest input's."""
  return bool(jnp.issubdtype(dtype, jnp.floating))  # bfloat16 and float8 too


def accumulating(dtype: np.dtype) -> np.dtype:
  return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


class Running:
  """One leaf's merge (or one slab's), an input at a time, oldest first:
  what it holds is the sum and one piece, however many inputs there are."""

  def __init__(self, weights: np.ndarray):
    self.weights, self.count = weights, 0
    self.acc: np.ndarray | None = None
    self.newest: np.ndarray | None = None  # an integer leaf's: the newest input's

  def add(self, piece: np.ndarray) -> None:
    """The next input's piece: c_i * x_i added to the sum, in the accumulating dtype."""
    self.dtype = piece.dtype
    if is_averaged(piece.dtype):
      acc_dtype = accumulating(piece.dtype)
      term = self.weights[self.count].astype(acc_dtype) * piece.astype(acc_dtype)
      self.acc = term if self.acc is None else self.acc + term
    else:
      self.newest = piece
    self.count += 1

  def result(self) -> np.ndarray:
    return self.newest if self.acc is None else self.acc.astype(self.dtype)


def combine_leaf(pieces: Sequence[np.ndarray], weights: np.ndarray) -> np.ndarray:
  """One leaf (or one slab of its rows) from each input, oldest first, combined
  as the module says."""
  running = Running(weights)
  for piece in pieces:
    running.add(piece)
  return running.result()


def check_same_tree(trees: Sequence[tuple[str, Mapping[str, Leaf]]]) -> None:
  """Every input (named) has the newest input's leaves, shapes and dtypes;
  else MergeError naming the first input, leaf and difference found."""
  newest_name, newest = trees[-1]
  for name, tree in trees[:-1]:
    missing = sorted(set(newest) - set(tree))
    extra = sorted(set(tree) - set(newest))
    if missing or extra:
      path, where = (missing[0], f'has no leaf that {newest_name} has') if missing else (
          extra[0], f'has a leaf that {newest_name} does not')
      raise MergeError(f'{name}: {where}: {path} ({len(missing)} missing, '
                       f'{len(extra)} extra)')
    for path, leaf in newest.items():
      if tree[path].shape != leaf.shape:
        raise MergeError(f'{name}: {path} has shape {tuple(tree[path].shape)}, '
                         f'{newest_name} {tuple(leaf.shape)}')
      if np.dtype(tree[path].dtype) != np.dtype(leaf.dtype):
        raise MergeError(f'{name}: {path} is {np.dtype(tree[path].dtype)}, '
                         f'{newest_name} {np.dtype(leaf.dtype)}')


class Take(NamedTuple):
  """Which of a group's steps a merge takes: the `last` K, these `steps`, or
  `every` N-th (steps divisible by N)."""
  last: int | None = None
  steps: tuple[int, ...] | None = None
  every: int | None = None


@dataclasses.dataclass(frozen=True)
class Merge:
  """A spec's `merge:`: how checkpoints group, which of each group's steps
  it takes, how it combines them, and what becomes of the optimizer state."""
  group: str
  take: Take
  method: str = 'mean'
  weights: tuple[float, ...] | None = None
  decay: float | None = None
  opt_state: str = 'latest'
  allow_fewer: bool = False

  @property
  def canonical(self) -> dict[str, Any]:
    return {'group': self.group, 'take': {k: v if not isinstance(v, tuple) else list(v)
                                         for k, v in self.take._asdict().items() if v is not None},
            'method': self.method, **({'weights': list(self.weights)} if self.weights else {}),
            **({'decay': self.decay} if self.decay is not None else {}),
            'opt_state': self.opt_state, 'allow_fewer': self.allow_fewer}

  def coefficients(self, count: int) -> np.ndarray:
    return coefficients(self.method, count, self.weights, self.decay)


def take_steps(available: Sequence[int], take: Take, allow_fewer: bool = False,
               group: str = 'the group') -> list[int]:
  """The steps of `available` that `take` names, oldest first; MergeError
  where fewer are there than it asks for (unless `allow_fewer`) or none."""
  ordered = sorted(set(available))
  if take.last is not None:
    chosen, wanted = ordered[-take.last:], take.last
  elif take.steps is not None:
    chosen, wanted = [s for s in ordered if s in set(take.steps)], len(set(take.steps))
  elif take.every is not None:
    chosen = [s for s in ordered if s % take.every == 0]
    wanted = len(chosen)
  else:
    raise MergeError('take: one of last, steps or every')
  if not chosen or len(chosen) < wanted and not allow_fewer:
    missing = ('' if take.steps is None else
               f' (missing step(s) {sorted(set(take.steps) - set(chosen))})')
    raise MergeError(f'{group}: {len(chosen)} of the {wanted} checkpoint(s) the merge takes'
                     f'{missing}; steps there: {ordered}')
  return chosen
