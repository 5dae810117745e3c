"""Dependency groups: what reads disjoint inputs is computed on its own."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from transforms import groups


def test_outputs_that_share_no_input_are_groups_of_their_own():
  def f(a, b, c, d):
    return a * 2, b + c, jnp.zeros(3), d.sum() + b.sum()

  args = [np.ones((4,), np.float32), np.ones((2,), np.float32), np.ones((2,), np.float32),
          np.ones((5,), np.float32)]
  jaxpr = jax.make_jaxpr(f)(*args).jaxpr
  found = {g.outputs: (g.inputs, g.nbytes)
           for g in groups.dependency_groups(jaxpr, (0, 1, 2, 3), (10, 11, 12, 13))}
  assert found == {(10,): ((0,), 32),                        # a -> a * 2
                   (11, 13): ((1, 2, 3), 8 + 8 + 20 + 8 + 4),  # b + c and d + b share b
                   (12,): ((), 12)}                         # reads nothing


def test_tree_bytes_counts_arrays_their_abstract_form_and_nothing_else():
  tree = {'a': np.zeros((2, 3), np.float32), 'b': jax.ShapeDtypeStruct((4,), jnp.int8), 'c': 3}
  assert groups.tree_bytes(tree) == 24 + 4
