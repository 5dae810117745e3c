"""Merging K checkpoints' leaves: the documented sum, bit for bit (transforms/merge.py)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from transforms import merge


def _reference(pieces, weights):
  """The module docstring's sum, written out again: oldest first, each
  product and sum rounded in the accumulating dtype, then cast."""
  stored = pieces[0].dtype
  acc_dtype = np.float64 if stored == np.float64 else np.float32
  total = None
  for weight, piece in zip(weights, pieces):
    term = np.multiply(np.array(weight, acc_dtype), piece.astype(acc_dtype), dtype=acc_dtype)
    total = term if total is None else np.add(total, term, dtype=acc_dtype)
  return total.astype(stored)


def _inputs(count, dtype, shape=(7, 5), seed=0):
  rng = np.random.default_rng(seed)
  return [rng.normal(size=shape).astype(dtype) for _ in range(count)]


@pytest.mark.parametrize('dtype', [np.float32, np.float64, jnp.bfloat16, np.float16])
@pytest.mark.parametrize('method,options', [('mean', {}), ('weighted', {'weights': [1, 3, 0.5, 2, 1]}),
                                             ('ema', {'decay': 0.9})])
@pytest.mark.parametrize('count', [2, 3, 5])
def test_each_method_is_the_documented_sum_bit_for_bit(dtype, method, options, count):
  if 'weights' in options:
    options = {'weights': options['weights'][:count]}
  weights = merge.coefficients(method, count, **options)
  pieces = _inputs(count, dtype)
  merged = merge.combine_leaf(pieces, weights)
  assert merged.dtype == np.dtype(dtype)
  assert merged.tobytes() == _reference(pieces, weights).tobytes()


def test_a_leaf_merged_a_slab_of_rows_at_a_time_is_the_same_bits_as_whole():
  pieces = _inputs(4, np.float32, shape=(10, 3))
  weights = merge.coefficients('ema', 4, decay=0.99)
  whole = merge.combine_leaf(pieces, weights)
  slabs = [merge.combine_leaf([p[start:start + 3] for p in pieces], weights) for start in (0, 3, 6, 9)]
  assert np.concatenate(slabs).tobytes() == whole.tobytes()


def test_integer_leaves_come_from_the_newest_input():
  counts = [np.int32(100), np.int32(200), np.int32(300)]
  flags = [np.array([True]), np.array([False]), np.array([True])]
  weights = merge.coefficients('mean', 3)
  assert merge.combine_leaf(counts, weights) == 300
  assert merge.combine_leaf(flags, weights).tolist() == [True]


def test_coefficients():
  assert merge.coefficients('mean', 4).tolist() == [0.25] * 4
  assert merge.coefficients('weighted', 3, weights=[1, 1, 2]).tolist() == [0.25, 0.25, 0.5]
  decay, xs = 0.9, [1.0, 5.0, -2.0, 4.0]
  running = xs[0]
  for x in xs[1:]:
    running = decay * running + (1 - decay) * x
  ema = merge.coefficients('ema', 4, decay=decay)
  assert ema.sum() == pytest.approx(1.0) and ema @ np.array(xs) == pytest.approx(running)
  for method, options, says in [('weighted', {'weights': [1]}, '1 weight(s) for 2'),
                                ('weighted', {'weights': [1, -1]}, 'not negative'),
                                ('weighted', {'weights': [0, 0]}, 'not all zero'),
                                ('ema', {'decay': 1.0}, 'decay must be in [0, 1)'),
                                ('median', {}, "unknown merge method 'median'")]:
    with pytest.raises(merge.MergeError) as raised:
      merge.coefficients(method, 2, **options)
    assert says in str(raised.value)


def test_inputs_of_another_tree_are_named_with_the_leaf_and_what_differs():
  leaf = merge.Leaf((4, 2), np.dtype(np.float32))
  newest = ('run/300', {'a/kernel': leaf, 'a/bias': merge.Leaf((2,), np.dtype(np.float32))})
  merge.check_same_tree([('run/200', dict(newest[1])), newest])
  cases = [
      ({'a/kernel': leaf}, 'run/100: has no leaf that run/300 has: a/bias (1 missing, 0 extra)'),
      ({**newest[1], 'b/kernel': leaf}, 'run/100: has a leaf that run/300 does not: b/kernel'),
      ({**newest[1], 'a/kernel': merge.Leaf((2, 4), np.dtype(np.float32))},
       'run/100: a/kernel has shape (2, 4), run/300 (4, 2)'),
      ({**newest[1], 'a/kernel': merge.Leaf((4, 2), np.dtype(jnp.bfloat16))},
       'run/100: a/kernel is bfloat16, run/300 float32'),
  ]
  for tree, says in cases:
    with pytest.raises(merge.MergeError) as raised:
      merge.check_same_tree([('run/100', tree), ('run/200', dict(newest[1])), newest])
    assert str(raised.value).startswith(says)


def test_take_steps():
  steps = [3000, 1000, 5000, 2000, 4000]
  assert merge.take_steps(steps, merge.Take(last=3)) == [3000, 4000, 5000]
  assert merge.take_steps(steps, merge.Take(steps=(1000, 5000))) == [1000, 5000]
  assert merge.take_steps(steps, merge.Take(every=2000)) == [2000, 4000]
  assert merge.take_steps(steps, merge.Take(last=8), allow_fewer=True) == sorted(steps)
  with pytest.raises(merge.MergeError, match=r'run_a: 5 of the 8 checkpoint\(s\) the merge takes'):
    merge.take_steps(steps, merge.Take(last=8), group='run_a')
  with pytest.raises(merge.MergeError, match=r'missing step\(s\) \[6000\]'):
    merge.take_steps(steps, merge.Take(steps=(5000, 6000)))
  with pytest.raises(merge.MergeError, match='0 of the 0'):
    merge.take_steps(steps, merge.Take(every=7))
