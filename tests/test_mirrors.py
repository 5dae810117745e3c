"""Mirror discovery and tree paths, on real optax states and random trees."""
from __future__ import annotations

import optax
import orbax.checkpoint as ocp
from hypothesis import given, settings, strategies as st

from tests.conftest import mlp, trained
from transforms import find_mirrors, flatten, unflatten
from transforms import mirrors


def param_paths(params):
  return set(flatten(params))


def test_adam_has_mu_and_nu():
  params = mlp()
  _, opt_state = trained(optax.adam(1e-3), params)
  assert [m.location for m in find_mirrors(param_paths(params), opt_state)] == [(0, 1), (0, 2)]


def test_sgd_momentum_and_inject_hyperparams():
  params = mlp()
  tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9)
  _, opt_state = trained(tx, params)
  # The hyperparameters are scalars, not mirrors; the trace is.
  found = find_mirrors(param_paths(params), opt_state)
  assert [mirrors.get_at(opt_state, m.location) for m in found] == [opt_state.inner_state[0].trace]


def test_masked_mirror_is_a_subset_with_none_leaves(tmp_path):
  params = mlp()
  mask = {'Dense_0': {'kernel': True, 'bias': False}, 'Dense_1': {'kernel': True, 'bias': True}}
  tx = optax.chain(optax.masked(optax.adam(1e-3), mask), optax.sgd(0.1, momentum=0.9))
  _, opt_state = trained(tx, params)
  ocp.PyTreeCheckpointer().save(tmp_path / 'c', {'params': params, 'opt_state': opt_state})
  restored = ocp.PyTreeCheckpointer().restore(tmp_path / 'c')  # dicts, lists, None
  for tree in (opt_state, restored['opt_state']):
    found = find_mirrors(param_paths(params), tree)
    assert len(found) == 3  # mu, nu (masked) and the momentum trace
    mu = flatten(mirrors.get_at(tree, found[0].location))
    assert set(mu) <= param_paths(params)


def test_replace_at_keeps_container_types():
  params = mlp()
  _, opt_state = trained(optax.adam(1e-3), params)
  new = mirrors.replace_at(opt_state, (0, 1), {'x': 1})
  assert type(new) is type(opt_state) and type(new[0]) is type(opt_state[0])
  assert new[0].mu == {'x': 1} and new[0].nu is opt_state[0].nu
  as_lists = [{'count': 0, 'mu': {'a': 1}}, None]
  assert mirrors.replace_at(as_lists, (0, 'mu'), {'b': 2}) == [{'count': 0, 'mu': {'b': 2}}, None]


names = st.text(alphabet='abcxyz_0123', min_size=1, max_size=5)
trees = st.recursive(st.integers(0, 9), lambda kids: st.dictionaries(names, kids, min_size=1, max_size=3),
                     max_leaves=12).filter(lambda t: isinstance(t, dict))


@settings(max_examples=60, deadline=None)
@given(trees)
def test_flatten_unflatten_round_trip(tree):
  assert unflatten(flatten(tree)) == tree


@settings(max_examples=60, deadline=None)
@given(trees, st.data())
def test_every_planted_mirror_is_found(params, data):
  """Any subset of the params, planted anywhere in a state of scalars, is found."""
  flat = flatten(params)
  subset = data.draw(st.sets(st.sampled_from(sorted(flat)), min_size=1))
  mirror = unflatten({p: None if data.draw(st.booleans()) else flat[p] for p in subset}) \
      if len(subset) > 1 else unflatten({p: flat[p] for p in subset})
  state = [{'count': 3, 'hyper': {'lr_zz_': 0.1}}, {'inner': (mirror, 'tag')}]
  assert [m.location for m in find_mirrors(set(flat), state)] == [(1, 'inner', 0)]
