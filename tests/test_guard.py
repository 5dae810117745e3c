"""The guard: no migrated state whose mirrors or collections disagree with its params.

Unit cases for each check, then a property: random param trees with Adam
moments and a masked mirror, random structural specs; the surgery either
refuses by name or gives a state whose every mirror and collection has the
params' paths and shapes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

from tests.conftest import copy_tree, mlp, trained
from transforms import Surgery, SurgeryError, flatten, load_spec, unflatten
from transforms import mirrors, plan


def run(spec_text, state):
  return Surgery(load_spec(spec_text))(copy_tree(state))[0]


@pytest.fixture
def adam_state():
  params, opt_state = trained(optax.adam(1e-3), mlp())
  return {'params': params, 'opt_state': opt_state}


def rename_params_only(state):
  """A python op that forgets the optimizer state."""
  params = {('Head' if k == 'Dense_1' else k): v for k, v in state['params'].items()}
  return {**state, 'params': params}


def test_a_python_op_that_forgets_the_moments_fails_by_name(adam_state):
  with pytest.raises(SurgeryError) as e:
    run("ops: [{python: {fn: 'tests.test_guard:rename_params_only'}}]", adam_state)
  assert 'guard: opt_state/0/mu/Dense_1/bias still sits at param path' in str(e.value)
  # plan meets it too, from shapes alone
  with pytest.raises(SurgeryError, match='guard: '):
    plan(Surgery(load_spec("ops: [{python: {fn: 'tests.test_guard:rename_params_only'}}]")),
         adam_state)


@pytest.mark.parametrize('fn, message', [
    ('params_only', "guard: the surgery's result lacks 'opt_state', which its input had"),
    ('add_param_without_moments',
     "guard: opt_state/0/mu holds no entry for param(s) ['Extra/bias'], though it held every param"),
    ('drop_param_keeping_moments', "guard: opt_state/0/mu/Dense_1/bias still sits at param path"),
])
def test_a_python_op_that_loses_the_optimizer_state_fails_by_name(adam_state, fn, message):
  with pytest.raises(SurgeryError) as e:
    run(f"ops: [{{python: {{fn: 'tests.fix_heads:{fn}'}}}}]", adam_state)
  assert message in str(e.value)


def test_with_the_optimizer_a_python_op_must_match_its_init(adam_state):
  spec = ("optimizer: {factory: optax.adam, kwargs: {learning_rate: 0.001}}\n"
          "ops: [{python: {fn: 'tests.fix_heads:add_param_without_moments'}}]")
  with pytest.raises(SurgeryError, match="lacks leaf '0/mu/Extra/bias', which the optimizer's init"):
    run(spec, adam_state)
  out = run("ops: [{python: {fn: 'tests.fix_heads:params_only'}}, {drop_optimizer: {}}]", adam_state)
  assert set(out) == {'params'}  # dropped, as said


def test_reinit_that_keeps_moments_is_refused_unless_asked(adam_state):
  out = run("ops: [{reinit: {match: '^Dense_1/', init: zeros}}]", adam_state)
  assert not out['opt_state'][0].mu['Dense_1']['kernel'].any()
  kept = run("ops: [{reinit: {match: '^Dense_1/', init: zeros, opt_state: keep}}]", adam_state)
  np.testing.assert_array_equal(kept['opt_state'][0].mu['Dense_1']['kernel'],
                                adam_state['opt_state'][0].mu['Dense_1']['kernel'])


def test_the_guard_catches_a_mirror_the_ops_did_not_follow(adam_state, monkeypatch):
  """With the mirror bookkeeping broken on purpose, the guard still refuses."""
  monkeypatch.setattr(mirrors, 'find_mirrors', lambda *a, **k: [])
  with pytest.raises(SurgeryError, match="guard: opt_state/0/mu/Dense_1/bias still sits at param "
                                         "path 'Dense_1/bias', which the surgery renamed to 'Head/bias'"):
    run("ops: [{rename: {match: '^Dense_1/', to: 'Head/'}}]", adam_state)


def test_the_migrated_state_lacking_a_leaf_is_named_as_such(adam_state):
  spec = "optimizer: {factory: optax.adam, kwargs: {learning_rate: 0.001}}\nops: [{scale: {match: kernel, by: 2.0}}]"
  state = {**adam_state, 'opt_state': (adam_state['opt_state'][0]._replace(mu={'Dense_0': adam_state['opt_state'][0].mu['Dense_0']}),
                                       adam_state['opt_state'][1])}
  with pytest.raises(SurgeryError, match="the migrated opt_state lacks leaf '0/mu/Dense_1/bias', "
                                         "which the optimizer's init of the new params has"):
    run(spec, state)


@pytest.mark.parametrize('state, message', [
    ({'params': [jnp.ones(2)]}, "the state's 'params' is a list, not a mapping"),
    ({'params': jnp.ones(2)}, "the state's 'params' is a ArrayImpl, not a mapping"),
    ({'params': {'a': jnp.ones(2), 'b': [jnp.ones(1), jnp.ones(1)]}},
     "ops[0] (scale): 'b' is a list, not an array, so scale cannot change it"),
])
def test_params_that_are_not_a_dict_of_arrays_are_named(state, message):
  with pytest.raises(SurgeryError) as e:
    run("ops: [{scale: {match: '.', by: 2.0}}]", state)
  assert message in str(e.value)


def test_an_untouched_list_in_params_is_carried_and_planned():
  state = {'params': {'a': jnp.ones(2), 'b': [jnp.ones(1), jnp.zeros(1)]}}
  spec = "ops: [{scale: {match: '^a$', by: 2.0}}]"
  out = run(spec, state)
  np.testing.assert_array_equal(out['params']['b'][1], jnp.zeros(1))
  result = plan(Surgery(load_spec(spec)), state)
  assert result.changes == []


@pytest.mark.parametrize('tree', [
    {'mlp/~/linear_0': {'w': 1.0}, 'a': {'b': 2.0}, 'a/b': 3.0, 'x.y z%': 4.0, 'empty': {}},
])
def test_paths_round_trip_keys_with_any_character(tree):
  flat = flatten(tree)
  assert set(flat) == {'mlp%2F~%2Flinear_0/w', 'a/b', 'a%2Fb', 'x.y z%25', 'empty'}
  assert unflatten(flat) == tree


def test_colliding_and_empty_subtrees_survive_a_surgery():
  params = {'a': {'b': jnp.ones(2)}, 'a/b': jnp.zeros(2), 'empty': {}, 'c': jnp.ones(3)}
  tx = optax.adam(1e-3)
  state = {'params': params, 'opt_state': tx.init(params)}
  out = run("ops: [{pad: {match: '^c$', axis: 0, to: 5, mirror_init: zeros}}]", state)
  assert set(out['params']) == {'a', 'a/b', 'empty', 'c'} and out['params']['empty'] == {}
  np.testing.assert_array_equal(out['params']['a/b'], jnp.zeros(2))
  assert out['opt_state'][0].mu['c'].shape == (5,) and out['opt_state'][0].mu['a/b'].shape == (2,)


# The property: random trees, random structural specs.

names = st.sampled_from(['a', 'b', 'c', 'layer_0', 'layer_1'])
shapes = st.lists(st.integers(1, 3), min_size=1, max_size=2).map(tuple)
param_trees = st.recursive(shapes, lambda kids: st.dictionaries(names, kids, min_size=1, max_size=3),
                           max_leaves=8).filter(lambda t: isinstance(t, dict))
regexes = st.sampled_from(['^a', 'b$', 'layer_0', 'c/', '^layer_(\\d)/', '.'])
structural_ops = st.one_of(
    st.builds(lambda m, t: {'rename': {'match': m, 'to': t}}, regexes, st.sampled_from(['x', 'y/', 'layer_9'])),
    st.builds(lambda m: {'drop': {'match': m}}, regexes),
    st.builds(lambda m, n: {'pad': {'match': m, 'axis': 0, 'to': n}}, regexes, st.integers(1, 5)),
    st.builds(lambda m: {'slice': {'match': m, 'axis': 0, 'stop': 1}}, regexes),
    st.builds(lambda m: {'reinit': {'match': m, 'init': 'ones'}}, regexes),
)


def _arrays(tree, seed):
  flat = flatten(tree)
  return unflatten({p: jax.random.normal(jax.random.PRNGKey(seed + i), s)
                    for i, (p, s) in enumerate(flat.items())})


@settings(max_examples=40, deadline=None)
@given(param_trees, st.lists(structural_ops, min_size=1, max_size=3), st.booleans())
def test_no_output_disagrees_with_its_params(shape_tree, ops, masked):
  params = _arrays(shape_tree, 0)
  first = sorted(params)[0]
  mask = {k: k != first for k in params} if masked and len(params) > 1 else {k: True for k in params}
  tx = optax.chain(optax.masked(optax.adam(1e-2), mask), optax.sgd(1e-2, momentum=0.9))
  _, opt_state = trained(tx, params)
  state = {'params': params, 'opt_state': opt_state,
           'stats': {k: jnp.ones(3) for k in params if isinstance(params[k], dict)}}
  import yaml  # pylint: disable=g-import-not-at-top
  try:
    out = Surgery(load_spec(yaml.safe_dump({'ops': ops})))(copy_tree(state))[0]
  except SurgeryError:
    return  # refused by name: allowed
  new = flatten(out['params'])
  for m in mirrors.find_mirrors(new, out['opt_state']):
    for q, x in flatten(mirrors.get_at(out['opt_state'], m.location)).items():
      p = q if not m.base else f'{m.base}/{q}'
      if mirrors.is_placeholder(x):
        assert any(n == p or n.startswith(p + '/') for n in new), (ops, p)
      else:
        assert p in new and x.shape == new[p].shape, (ops, p)
  mu = flatten(out['opt_state'][0].inner_state[0].mu)
  assert set(new) == {p for p in new if p in mu or any(p.startswith(q + '/') for q in mu)}, ops
  trace = flatten(out['opt_state'][1][0].trace)
  assert set(trace) == set(new) and all(trace[p].shape == new[p].shape for p in new), ops


# Found by a second read (each reported ok and wrong, or refused a right surgery, before).

P = {'Dense_0': {'kernel': jnp.ones((3, 4)), 'bias': jnp.zeros(4)},
     'Head': {'kernel': jnp.ones((4, 2)), 'bias': jnp.zeros(2)}}


def test_an_optimizer_state_under_another_key_is_named():
  params, opt_state = trained(optax.adam(1e-2), P)
  with pytest.raises(SurgeryError, match="the state's 'optimizer' holds mirrors of the params"):
    run("ops: [{rename: {match: '^Head/', to: 'Out/'}}]", {'params': params, 'optimizer': opt_state})


def test_reinit_with_the_optimizer_takes_its_init_not_zeros():
  tx = optax.contrib.cocob()
  params, opt_state = trained(tx, P)
  out = run("optimizer: {factory: optax.contrib.cocob}\n"
            "ops: [{reinit: {match: '^Head/kernel', init: normal}}]", {'params': params, 'opt_state': opt_state})
  cocob = out['opt_state'][2]
  np.testing.assert_array_equal(cocob.scale['Head']['kernel'], jnp.full((4, 2), 1e-8))
  np.testing.assert_array_equal(cocob.init_particles['Head']['kernel'], out['params']['Head']['kernel'])
  np.testing.assert_array_equal(cocob.scale['Dense_0']['kernel'], opt_state[2].scale['Dense_0']['kernel'])


@pytest.mark.parametrize('params, spec', [
    ({'mu': jnp.ones(3), 'b': jnp.ones(2)}, "ops: [{rename: {match: '^mu$', to: 'mean'}}]"),
    (P, "ops: [{rename: {match: '^Dense_0/kernel$', to: 'Dense_0/kernel/base'}}]"),
    (P, r"ops: [{rename: {match: '^(.*)$', to: '\1/value'}}]"),
])
def test_names_like_optimizer_fields_and_deeper_renames_migrate(params, spec):
  params, opt_state = trained(optax.adam(1e-2), params)
  out = run(spec, {'params': params, 'opt_state': opt_state})
  assert flatten(out['opt_state'][0].mu).keys() == flatten(out['params']).keys()


def test_typed_per_leaf_masks_follow_a_pad_without_the_optimizer():
  tx = optax.masked(optax.adam(1e-2), lambda p: jax.tree_util.tree_map_with_path(
      lambda k, _: k[-1].key == 'kernel', p))
  params, opt_state = trained(tx, P)
  out = run("ops: [{pad: {match: '^Head/', axis: -1, to: 3, mirror_init: zeros}}]", {'params': params, 'opt_state': opt_state})
  mu = out['opt_state'].inner_state[0].mu
  assert mu['Head']['kernel'].shape == (4, 3) and isinstance(mu['Head']['bias'], optax.MaskedNode)


def test_lookahead_over_a_one_leaf_model():
  tx = optax.lookahead(optax.adam(1e-2), 2, 0.5)
  params = optax.LookaheadParams.init_synced({'w': jnp.ones(3)})
  state = {'params': {'fast': params.fast, 'slow': params.slow}, 'opt_state': tx.init(params)}
  out = run("ops: [{pad: {match: '/w$', axis: 0, to: 5, mirror_init: zeros}}]", state)
  assert out['opt_state'].fast_state[0].mu['w'].shape == (5,)


def test_an_ema_of_the_params_without_an_entry_for_an_added_param_is_named():
  params, opt_state = trained(optax.adam(1e-2), P)
  with pytest.raises(SurgeryError, match="guard: ema_params held every param, but has nothing for"):
    run("ops: [{add: {path: 'Extra/bias', shape: [2]}}]",
        {'params': params, 'opt_state': opt_state, 'ema_params': params})


@pytest.mark.parametrize('spec, message', [
    ("ops: [{stack: {match: '^(Dense_0|Head)/bias$', to: 'b', axis: 3}}]", 'along axis 3'),
    ("ops: [{unstack: {match: '^Head/kernel$', to: 'k{i}', axis: 5}}]", "has no axis 5"),
])
def test_axes_out_of_range_are_named(spec, message):
  params, opt_state = trained(optax.adam(1e-2), {**P, 'Head': {'kernel': jnp.ones((4, 2)), 'bias': jnp.zeros(4)}})
  with pytest.raises(SurgeryError, match=message):
    run(spec, {'params': params, 'opt_state': opt_state})
