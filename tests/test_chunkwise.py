"""Slabs and packs, without files: an elementwise computation run a slab of
rows at a time gives the whole one's bits; anything else is refused with a
reason; packs never exceed their budget but for a group alone over it."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transforms import Group, chunkwise, pack

X = np.random.default_rng(0).standard_normal((10, 6)).astype(np.float32)


def jaxpr_of(fn):
  return jax.make_jaxpr(fn)(X).jaxpr


@pytest.mark.parametrize('fn', [
    lambda x: x.astype(jnp.bfloat16),
    lambda x: (x * 0.5).astype(x.dtype),
    lambda x: jax.lax.dynamic_update_slice_in_dim(jnp.zeros((10, 9), x.dtype), x, 0, 1),
    lambda x: jnp.where(x > 0, x ** 2, -x),
    lambda x: x,
], ids=['cast', 'scale', 'pad_later_axis', 'select', 'carried'])
def test_slabs_give_the_whole_computation(fn):
  jaxpr = jaxpr_of(fn)
  assert chunkwise.why_not(jaxpr) is None
  slabs = [jax.jit(chunkwise.on_slab(jaxpr, len(X[a:a + 4])))(X[a:a + 4]) for a in range(0, 10, 4)]
  np.testing.assert_array_equal(np.concatenate([np.asarray(s) for s in slabs]), np.asarray(fn(X)))


@pytest.mark.parametrize('fn,why', [
    (lambda x: x / jnp.linalg.norm(x), 'not elementwise'),
    (lambda x: x.T, 'leading'),
    (lambda x: jax.lax.dynamic_update_slice_in_dim(jnp.zeros((12, 6), x.dtype), x, 0, 0), 'leading'),
    (lambda x: x.reshape(5, 12), 'leading'),
    (lambda x: x + jnp.arange(6.0), 'iota'),
])
def test_what_does_not_go_by_rows_is_refused_with_a_reason(fn, why):
  assert why in chunkwise.why_not(jaxpr_of(fn))


def test_packs_fill_up_to_the_budget_and_a_large_group_goes_alone():
  groups = [Group((i,), (i,), n) for i, n in enumerate([40, 30, 50, 200, 10, 60])]
  packs = pack(groups, 100)
  assert [[g.outputs[0] for g in p.groups] for p in packs] == [[0, 1], [3], [2, 4], [5]]
  assert [p.over for p in packs] == [False, True, False, False]
  assert all(p.nbytes <= 100 for p in packs if not p.over)
