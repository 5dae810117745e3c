"""Each op on the params and on every optimizer-state mirror; compile reuse; donation."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.conftest import copy_tree, mlp, trained
from transforms import Surgery, SurgeryError, flatten, load_spec


@pytest.fixture
def adam_state():
  params, opt_state = trained(optax.adam(1e-3), mlp())
  return {'params': params, 'opt_state': opt_state, 'step': 2}


def run(spec_text, state):
  return Surgery(load_spec(spec_text))(copy_tree(state))[0]


def leaves(tree):
  return {k: np.asarray(v) for k, v in flatten(tree).items()}


def test_rename_follows_every_mirror(adam_state):
  out = run(r"ops: [{rename: {match: '^Dense_(\d+)/', to: 'Linear_\1/'}}]", adam_state)
  old, new = leaves(adam_state['params']), leaves(out['params'])
  assert set(new) == {p.replace('Dense_', 'Linear_') for p in old}
  for field in ('mu', 'nu'):
    before, after = leaves(getattr(adam_state['opt_state'][0], field)), leaves(getattr(out['opt_state'][0], field))
    assert {p.replace('Dense_', 'Linear_'): v.tobytes() for p, v in before.items()} == \
        {p: v.tobytes() for p, v in after.items()}
  assert type(out['opt_state'][0]).__name__ == 'ScaleByAdamState'


def test_drop_removes_from_params_and_mirrors(adam_state):
  out = run("ops: [{drop: {match: '^Dense_1/'}}]", adam_state)
  assert set(leaves(out['params'])) == {'Dense_0/kernel', 'Dense_0/bias'}
  assert set(leaves(out['opt_state'][0].mu)) == {'Dense_0/kernel', 'Dense_0/bias'}


def test_value_ops_keep_mirrors_by_default(adam_state):
  out = run("ops: [{scale: {match: 'kernel$', by: 0.5}}, {cast: {match: 'bias$', dtype: bfloat16}}]",
            adam_state)
  p = adam_state['params']
  np.testing.assert_array_equal(out['params']['Dense_0']['kernel'], p['Dense_0']['kernel'] * 0.5)
  assert out['params']['Dense_0']['bias'].dtype == jnp.bfloat16
  for field in ('mu', 'nu'):  # moments untouched, fp32
    assert {k: v.tobytes() for k, v in leaves(getattr(out['opt_state'][0], field)).items()} == \
        {k: v.tobytes() for k, v in leaves(getattr(adam_state['opt_state'][0], field)).items()}


def test_opt_state_modes_on_value_ops(adam_state):
  mu = adam_state['opt_state'][0].mu['Dense_0']['kernel']
  out = run("ops: [{scale: {match: '^Dense_0/kernel$', by: 2.0, opt_state: follow}}]", adam_state)
  np.testing.assert_array_equal(out['opt_state'][0].mu['Dense_0']['kernel'], mu * 2.0)
  out = run("ops: [{scale: {match: '^Dense_0/kernel$', by: 2.0, opt_state: zero}}]", adam_state)
  assert not np.any(out['opt_state'][0].mu['Dense_0']['kernel'])
  np.testing.assert_array_equal(out['opt_state'][0].mu['Dense_1']['kernel'],
                                adam_state['opt_state'][0].mu['Dense_1']['kernel'])


def test_rename_with_zero_moves_then_zeroes(adam_state):
  out = run("ops: [{rename: {match: '^Dense_1/', to: 'Head/', opt_state: zero}}]", adam_state)
  assert not np.any(out['opt_state'][0].nu['Head']['kernel'])
  assert np.any(out['opt_state'][0].nu['Dense_0']['kernel'])


def test_masked_mirrors_rename_with_their_none_leaves():
  params = mlp()
  mask = {'Dense_0': {'kernel': True, 'bias': False}, 'Dense_1': {'kernel': True, 'bias': True}}
  params, opt_state = trained(optax.masked(optax.adam(1e-3), mask), params)
  out = run("ops: [{rename: {match: '^Dense_0/', to: 'In/'}}]", {'params': params, 'opt_state': opt_state})
  mu = out['opt_state'].inner_state[0].mu
  assert isinstance(mu['In']['bias'], optax.MaskedNode) and mu['In']['kernel'].shape == (3, 4)


@pytest.mark.parametrize('spec_text, message', [
    ("ops: [{drop: {match: '^Nothing/'}}]", "ops[0] (drop): match '^Nothing/' matched no param path"),
    ("ops: [{rename: {match: '^Dense_\\d', to: 'Dense'}}]", "would both be named"),
    ("ops: [{rename: {match: '^Dense_0/kernel$', to: 'Dense_1'}}]", "both a leaf and the parent"),
])
def test_misfit_names_the_op(adam_state, spec_text, message):
  with pytest.raises(SurgeryError) as e:
    run(spec_text, adam_state)
  assert message in str(e.value)


def test_no_params_key_is_a_clear_error():
  with pytest.raises(SurgeryError, match="no 'params' key"):
    run("ops: [{drop: {match: a}}]", {'weights': {'a': jnp.ones(1)}})


def test_one_compilation_per_signature(adam_state):
  surgery = Surgery(load_spec("ops: [{scale: {match: 'kernel$', by: 0.5}}]"))
  fresh = [surgery(copy_tree(adam_state)).compiled for _ in range(3)]
  other = {'params': mlp((5, 6, 2)), 'opt_state': optax.adam(1e-3).init(mlp((5, 6, 2)))}
  fresh.append(surgery(copy_tree(other)).compiled)
  assert fresh == [True, False, False, True] and surgery.compilations == 2


def test_state_is_donated(adam_state):
  state = copy_tree(adam_state)
  kernel = state['params']['Dense_0']['kernel']
  Surgery(load_spec("ops: [{scale: {match: 'kernel$', by: 0.5}}]"))(state)
  assert kernel.is_deleted()
  assert adam_state['step'] == 2  # non-array state passes through


def test_seed_normalize_is_bit_exact(cnn_state):
  """The seed's own steps: flatten, divide by the norm, unflatten."""
  flat = flatten(cnn_state['params'])
  kernel = flat['Dense_1/kernel']
  want = kernel / jnp.linalg.norm(kernel)
  out = run("ops: [{normalize: {match: '^Dense_1/kernel$'}}]", cnn_state)
  got = leaves(out['params'])
  assert got['Dense_1/kernel'].tobytes() == np.asarray(want).tobytes()
  assert {k: v.tobytes() for k, v in got.items() if k != 'Dense_1/kernel'} == \
      {k: np.asarray(v).tobytes() for k, v in flat.items() if k != 'Dense_1/kernel'}
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(
      lambda a, b: np.asarray(a).tobytes() == np.asarray(b).tobytes(), out['opt_state'], cnn_state['opt_state']))


def test_dependency_groups_are_what_reads_disjoint_inputs(adam_state):
  """A normalize: one group per kernel. A stack of three layers: one per
  stacked leaf (the params' and each moment's) with its three sources. A
  python op that reads every param: one group."""
  def groups(spec_text, state):
    surgery = Surgery(load_spec(spec_text))
    tree, _ = surgery.split(state)
    return sorted((len(g.inputs), len(g.outputs), g.nbytes) for g in surgery.groups(tree))

  kernels = sorted(2 * v.nbytes for p, v in leaves(adam_state['params']).items() if 'kernel' in p)
  assert groups("ops: [{normalize: {match: 'kernel$'}}]", adam_state) == [(1, 1, n) for n in kernels]
  layers = {f'layer_{i}': {'w': jnp.full((2, 3), float(i))} for i in range(3)}
  stacked = {'params': layers, 'opt_state': optax.adam(1e-3).init(layers)}
  assert groups(r"ops: [{stack: {match: '^layer_(\d+)/w$', to: 'w', axis: 0}}]", stacked) == [(3, 1, 144)] * 3
  assert [g[:2] for g in groups("ops: [{python: {fn: 'tests.fix_heads:unit_global_norm'}}]",
                                adam_state)] == [(4, 4)]
