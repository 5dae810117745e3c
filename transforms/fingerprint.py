"""Per-leaf fingerprints: a checksum of each leaf's bits and whether it is finite.

Computed on the device in one jitted pass, before an output is written and
again on what was read back, so a checkpoint that did not survive the trip
(or a surgery that made NaNs) is caught. The checksum is two wrapping uint32
sums over the leaf's bits as words: plain, and weighted by position, so a
changed or moved word changes it.
"""
from __future__ import annotations

import hashlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from transforms.surgery import key_path

_WORDS = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}


class Fingerprint(NamedTuple):
  checksum: str   # 16 hex digits
  finite: bool    # False if any NaN or inf (always True for integers)


def _words(x: jax.Array) -> jax.Array:
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  return jax.lax.bitcast_convert_type(x, _WORDS[x.dtype.itemsize]).astype(jnp.uint32).ravel()


def _fingerprint(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  words = _words(x)
  position = jnp.arange(1, words.size + 1, dtype=jnp.uint32)
  sums = jnp.stack([words.sum(dtype=jnp.uint32), (words * position).sum(dtype=jnp.uint32)])
  finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.array(True)
  return sums, finite


_fingerprints = jax.jit(lambda leaves: [_fingerprint(x) for x in leaves])


def fingerprints(tree: Any) -> dict[str, Fingerprint]:
  """{leaf path: Fingerprint} for every array leaf of `tree`."""
  pairs = [(key_path(k), x) for k, x in jax.tree_util.tree_flatten_with_path(tree)[0]
           if isinstance(x, jax.Array)]
  computed = jax.device_get(_fingerprints([x for _, x in pairs]))
  return {path: Fingerprint(f'{int(s[0]):08x}{int(s[1]):08x}', bool(ok))
          for (path, _), (s, ok) in zip(pairs, computed)}


def digest(prints: dict[str, Fingerprint]) -> str:
  """One checksum for a whole tree, from its leaves' fingerprints."""
  text = ''.join(f'{p}={f.checksum};' for p, f in sorted(prints.items()))
  return hashlib.sha256(text.encode()).hexdigest()[:32]
