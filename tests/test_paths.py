"""Tree paths: keys escaped so any key round-trips, and regexes that cannot hang a run."""
from __future__ import annotations

import jax
import optax
import pytest
import regex
from hypothesis import given, strategies as st

import transforms
from transforms import paths

keys = st.text(alphabet=st.sampled_from('ab/%2F_'), min_size=1, max_size=5)
trees = st.recursive(st.integers(), lambda children: st.dictionaries(keys, children, min_size=1,
                                                                      max_size=3), max_leaves=8)


@given(st.dictionaries(keys, trees, min_size=1, max_size=3))
def test_flatten_then_unflatten_gives_the_tree_back(tree):
  assert paths.unflatten(paths.flatten(tree)) == tree


def test_typed_and_restored_states_have_the_same_leaf_paths():
  params = {'w': 1.0}
  typed = optax.adam(1e-3).init(params)
  plain = [{'count': typed[0].count, 'mu': {'w': 0.0}, 'nu': {'w': 0.0}}, {}]
  assert sorted(paths.leaf_paths(typed)) == sorted(paths.leaf_paths(plain)) == [
      '0/count', '0/mu/w', '0/nu/w']


def test_key_paths_modules_and_under():
  assert transforms.key_path((jax.tree_util.DictKey('a/b'), jax.tree_util.SequenceKey(2))) == 'a%2Fb/2'
  assert paths.modules(['a/b/c', 'a/d']) == {'a', 'a/b'}
  assert paths.under('a/b', 'a') and paths.under('a', '') and not paths.under('ab', 'a')


def test_a_regex_that_backtracks_forever_is_stopped_by_name(monkeypatch):
  assert paths.substitute(regex.compile('^Dense_(\\d)'), 'Layer_\\1', 'Dense_1/kernel') == 'Layer_1/kernel'
  monkeypatch.setattr(paths, 'REGEX_SECONDS', 0.2)
  evil = regex.compile('^(a|aa)+$')
  with pytest.raises(TimeoutError, match='backtracks catastrophically'):
    paths.matching(evil, ['a' * 60 + 'b'])
