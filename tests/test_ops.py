"""The ops beyond the seed's: shapes, layers, initializers, whole-state ops."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

from tests.conftest import copy_tree, mlp, trained
from transforms import Surgery, SurgeryError, flatten, load_spec


def run(spec_text, state):
  return Surgery(load_spec(spec_text))(copy_tree(state))[0]


def layered(n=11):
  """params layer_0 .. layer_{n-1}, each {w: (2,3) filled with its index}, with Adam."""
  params = {f'layer_{i}': {'w': jnp.full((2, 3), float(i))} for i in range(n)}
  params, opt_state = trained(optax.adam(1e-2), params)
  return {'params': params, 'opt_state': opt_state}


def test_stack_orders_layers_by_their_integer_and_mirrors_follow():
  state = layered()
  out = run(r"ops: [{stack: {match: '^layer_(\d+)/(.*)$', to: 'layers/\2', axis: 0}}]", state)
  stacked = out['params']['layers']['w']
  assert stacked.shape == (11, 2, 3)
  np.testing.assert_array_equal(stacked[10], state['params']['layer_10']['w'])  # after layer_9
  np.testing.assert_array_equal(out['opt_state'][0].mu['layers']['w'][9], state['opt_state'][0].mu['layer_9']['w'])


def test_unstack_inverts_stack():
  state = layered(3)
  stacked = run(r"ops: [{stack: {match: '^layer_(\d+)/(.*)$', to: 'layers/\2'}}]", state)
  back = run(r"ops: [{unstack: {match: '^layers/(.*)$', to: 'layer_{i}/\1'}}]", stacked)
  for tree in ('params',):
    assert {k: np.asarray(v).tobytes() for k, v in flatten(back[tree]).items()} == \
        {k: np.asarray(v).tobytes() for k, v in flatten(state[tree]).items()}
  assert {k: np.asarray(v).tobytes() for k, v in flatten(back['opt_state'][0].nu).items()} == \
      {k: np.asarray(v).tobytes() for k, v in flatten(state['opt_state'][0].nu).items()}


def adam_state():
  params, opt_state = trained(optax.adam(1e-2), mlp())
  return {'params': params, 'opt_state': opt_state}


def test_slice_transpose_reshape_follow_mirrors():
  state = adam_state()
  out = run("""ops:
  - slice: {match: '^Dense_0/kernel$', axis: 1, start: 1, stop: 3}
  - transpose: {match: '^Dense_1/kernel$', axes: [1, 0]}
  - reshape: {match: '^Dense_1/bias$', shape: [1, 2]}
""", state)
  mu, old = out['opt_state'][0].mu, state['opt_state'][0].mu
  np.testing.assert_array_equal(mu['Dense_0']['kernel'], old['Dense_0']['kernel'][:, 1:3])
  np.testing.assert_array_equal(mu['Dense_1']['kernel'], old['Dense_1']['kernel'].T)
  assert out['params']['Dense_1']['bias'].shape == mu['Dense_1']['bias'].shape == (1, 2)


def test_add_and_reinit_are_seeded_and_zero_their_mirrors():
  state = adam_state()
  spec = """ops:
  - add: {path: 'Extra/bias', shape: [5], init: normal, seed: 3}
  - reinit: {match: '^Dense_1/kernel$', init: lecun_normal, seed: 1}
"""
  a, b = run(spec, state), run(spec, state)
  assert np.asarray(a['params']['Extra']['bias']).tobytes() == np.asarray(b['params']['Extra']['bias']).tobytes()
  assert np.asarray(a['params']['Dense_1']['kernel']).tobytes() == np.asarray(b['params']['Dense_1']['kernel']).tobytes()
  assert a['params']['Extra']['bias'].any() and not a['opt_state'][0].mu['Extra']['bias'].any()
  assert not a['opt_state'][0].nu['Dense_1']['kernel'].any()
  np.testing.assert_array_equal(a['opt_state'][0].nu['Dense_0']['kernel'], state['opt_state'][0].nu['Dense_0']['kernel'])
  other_seed = run(spec.replace('seed: 1', 'seed: 2'), state)
  assert not np.array_equal(other_seed['params']['Dense_1']['kernel'], a['params']['Dense_1']['kernel'])


def test_pad_fills_params_from_init_and_mirrors_with_zeros():
  state = adam_state()
  out = run("ops: [{pad: {match: '^Dense_1/bias$', axis: 0, to: 5, init: ones, mirror_init: zeros}}]", state)
  np.testing.assert_array_equal(out['params']['Dense_1']['bias'][2:], jnp.ones(3))
  assert not out['opt_state'][0].mu['Dense_1']['bias'][2:].any()


def test_python_op_and_optimizer_ops():
  state = adam_state()
  out = run("ops: [{python: {fn: 'tests.fix_heads:double_bias'}}]", state)
  np.testing.assert_array_equal(out['params']['Dense_0']['bias'], state['params']['Dense_0']['bias'] * 2)
  out = run("optimizer: {factory: optax.adam, kwargs: {learning_rate: 0.1}}\nops: [{reset_optimizer: {}}]", state)
  assert not out['opt_state'][0].mu['Dense_0']['kernel'].any() and int(out['opt_state'][0].count) == 0
  out = run("ops: [{drop_optimizer: {}}]", state)
  assert 'opt_state' not in out
  with pytest.raises(SurgeryError, match="needs the spec's 'optimizer:' section"):
    run("ops: [{reset_optimizer: {}}]", state)


@pytest.mark.parametrize('spec_text, message', [
    ("ops: [{pad: {match: '^Dense_0/kernel$', axis: 1, to: 2}}]", "axis 1 is 4, more than to=2"),
    ("ops: [{pad: {match: '^Dense_0/kernel$', axis: 2, to: 9}}]", 'has no axis 2'),
    ("ops: [{reshape: {match: '^Dense_0/kernel$', shape: [5]}}]", "'Dense_0/kernel' of shape (3, 4)"),
    ("ops: [{add: {path: 'Dense_0/kernel', shape: [1]}}]", "'Dense_0/kernel' already exists"),
    ("ops: [{reinit: {match: 'bias$', init: lecun_normal}}]", 'lecun_normal cannot initialise'),
    ("ops: [{stack: {match: '^Dense_(\\d+)/kernel$', to: 'W'}}]", 'cannot stack'),
])
def test_shape_misfits_name_the_op_and_path(spec_text, message):
  with pytest.raises(SurgeryError) as e:
    run(spec_text, adam_state())
  assert message in str(e.value) and str(e.value).startswith('ops[0]')


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(['Dense_0/', 'Dense_1/', 'Dense_', 'kernel', 'bias']), st.text('xyzXYZ', min_size=1, max_size=4))
def test_rename_round_trips(fragment, replacement):
  state = adam_state()
  params = flatten(state['params'])
  if any(replacement in p for p in params):
    return
  there = run(f"ops: [{{rename: {{match: '{fragment}', to: '{replacement}'}}}}]", state)
  back = run(f"ops: [{{rename: {{match: '{replacement}', to: '{fragment}'}}}}]", there)
  assert {k: np.asarray(v).tobytes() for k, v in flatten(back['params']).items()} == \
      {k: np.asarray(v).tobytes() for k, v in params.items()}
