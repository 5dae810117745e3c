"""Per-leaf fingerprints: a checksum of each leaf's bits and whether it is finite.

Computed before an output is written and again on what was read back, so a
checkpoint that did not survive the trip (or a surgery that made NaNs) is
caught. The checksum is two wrapping uint32 sums over the leaf's bits as
words: plain, and weighted by position, so a changed or moved word changes it.

It runs in NumPy on the host, a bounded slice at a time: no compilation per
signature (a jitted pass cost more to compile than to run), and no temporary
as large as the leaf.
"""
from __future__ import annotations

import hashlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from transforms.paths import key_path

_WORDS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}
_SLICE = 1 << 22  # words per step: 16 MB of uint32 temporaries at most


class Fingerprint(NamedTuple):
  checksum: str   # 16 hex digits
  finite: bool    # False if any NaN or inf (always True for integers)


class Fingerprinter:
  """A Fingerprint built from an array's leading-axis slices, in order: what
  `fingerprint` gives for their concatenation (a leaf too large to hold is
  checksummed slab by slab as it streams)."""

  def __init__(self):
    self.plain = self.weighted = 0  # wrapping uint32 sums, kept as Python ints
    self.words = 0  # words seen so far: where the next slice's positions start
    self.finite = True

  def update(self, x: Any) -> 'Fingerprinter':
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)  # a typed key: its bits
    flat = np.ascontiguousarray(x).reshape(-1)
    words = flat.view(_WORDS[flat.dtype.itemsize])
    for start in range(0, words.size, _SLICE):
      chunk = words[start:start + _SLICE].astype(np.uint32)
      position = np.arange(1, chunk.size + 1, dtype=np.uint32)
      position += np.uint32((self.words + start) & 0xffffffff)  # wraps, as the sums do
      self.plain = (self.plain + int(chunk.sum(dtype=np.uint32))) & 0xffffffff
      self.weighted = (self.weighted + int((chunk * position).sum(dtype=np.uint32))) & 0xffffffff
    self.words += words.size
    self.finite = self.finite and (not jnp.issubdtype(flat.dtype, jnp.inexact) or all(
        np.isfinite(flat[start:start + _SLICE]).all() for start in range(0, flat.size, _SLICE)))
    return self

  def result(self) -> Fingerprint:
    return Fingerprint(f'{self.plain:08x}{self.weighted:08x}', bool(self.finite))


def fingerprint(x: Any) -> Fingerprint:
  """The Fingerprint of one array (a jax.Array is brought to the host)."""
  return Fingerprinter().update(x).result()


def fingerprints(tree: Any) -> dict[str, Fingerprint]:
  """{leaf path: Fingerprint} for every array leaf of `tree`."""
  return {key_path(k): fingerprint(x) for k, x in jax.tree_util.tree_flatten_with_path(tree)[0]
          if isinstance(x, (jax.Array, np.ndarray))}


def digest(prints: dict[str, Fingerprint]) -> str:
  """One checksum for a whole tree, from its leaves' fingerprints."""
  text = ''.join(f'{p}={f.checksum};' for p, f in sorted(prints.items()))
  return hashlib.sha256(text.encode()).hexdigest()[:32]
