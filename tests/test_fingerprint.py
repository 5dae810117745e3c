"""Fingerprints: a leaf's checksum and finiteness, the same whole or slab by slab."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st

import transforms


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 7), cuts=st.lists(st.integers(0, 40), max_size=4),
       dtype=st.sampled_from([np.float32, np.int8, np.float16, np.int64]))
def test_slab_by_slab_is_the_whole_leafs_fingerprint(rows, cols, cuts, dtype):
  x = (np.arange(rows * cols) * 7 % 251).astype(dtype).reshape(rows, cols)
  running = transforms.Fingerprinter()
  for start, stop in zip([0, *sorted(c % rows for c in cuts)], [*sorted(c % rows for c in cuts), rows]):
    running.update(x[start:stop])
  assert running.result() == transforms.fingerprint(x)


def test_a_changed_or_moved_word_changes_the_checksum_and_nan_is_not_finite():
  x = np.arange(12, dtype=np.float32)
  changed, moved = x.copy(), x.copy()
  changed[5] += 1
  moved[[3, 4]] = moved[[4, 3]]
  sums = {transforms.fingerprint(a).checksum for a in (x, changed, moved)}
  assert len(sums) == 3
  assert transforms.fingerprint(x).finite
  assert not transforms.fingerprint(np.array([1.0, np.inf], np.float32)).finite
  assert transforms.fingerprint(np.array([2 ** 31 - 1], np.int32)).finite


def test_a_tree_has_a_fingerprint_per_array_and_one_digest():
  tree = {'params': {'w': jnp.ones((2, 3))}, 'step': 3, 'mu': [np.zeros(2)]}
  prints = transforms.fingerprints(tree)
  assert sorted(prints) == ['mu/0', 'params/w']
  assert transforms.digest(prints) == transforms.digest(dict(reversed(prints.items())))
  assert transforms.digest(prints) != transforms.digest({**prints, 'mu/0': prints['params/w']})
  key = jax.random.key(0)  # a typed key: its bits are fingerprinted
  assert transforms.fingerprint(key) == transforms.fingerprint(jax.random.key_data(key))
