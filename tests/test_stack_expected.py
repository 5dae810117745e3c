"""`stack` with `expected` and `fill`, `unstack` with `expected` (issue 26)."""
from __future__ import annotations

import numpy as np
import pytest

from tests.test_ops import layered, run
from transforms import SurgeryError, load_spec
from transforms.ops import initialize

STACK = r"ops: [{stack: {match: '^layer_(\d+)/(.*)$', to: 'layers/\2', axis: 0, expected: 12%s}}]"


def without_layer_5() -> dict:
  state = layered(12)
  for tree in (state['params'], state['opt_state'][0].mu, state['opt_state'][0].nu):
    del tree['layer_5']
  return state


def test_a_missing_layer_fails_by_name_without_fill():
  with pytest.raises(SurgeryError, match=r"cannot stack into 'layers/w': layer\(s\) \[5\] of the "
                                         r'12 expected are missing'):
    run(STACK % '', without_layer_5())


def test_zeros_fill_the_missing_layer_and_its_moments_the_rest_as_they_were():
  state = without_layer_5()
  out = run(STACK % ', fill: zeros, mirror_init: zeros', state)
  for tree, old in ((out['params'], state['params']),
                    (out['opt_state'][0].mu, state['opt_state'][0].mu),
                    (out['opt_state'][0].nu, state['opt_state'][0].nu)):
    stacked = np.asarray(tree['layers']['w'])
    assert stacked.shape == (12, 2, 3) and not stacked[5].any()
    for i in (0, 4, 6, 11):
      assert stacked[i].tobytes() == np.asarray(old[f'layer_{i}']['w']).tobytes()
  back = run(r"ops: [{unstack: {match: '^layers/(.*)$', to: 'layer_{i}/\1', expected: 12}}]", out)
  assert sorted(back['params'], key=lambda k: int(k.split('_')[1])) == [f'layer_{i}' for i in range(12)]


def test_an_initializer_fills_params_and_the_moments_need_the_users_word():
  state = without_layer_5()
  with pytest.raises(SurgeryError, match=r"filled layer\(s\) \[5\] are unknown; say mirror_init: zeros"):
    run(STACK % ', fill: lecun_normal, seed: 3', state)
  out = run(STACK % ', fill: lecun_normal, seed: 3, mirror_init: zeros', state)
  want = initialize('lecun_normal', 3, 'layers/w[5]', (2, 3), np.float32)
  assert np.asarray(out['params']['layers']['w'][5]).tobytes() == np.asarray(want).tobytes()


def test_counts_beyond_or_short_of_expected_fail_by_name():
  with pytest.raises(SurgeryError, match=r"layer\(s\) \[11\] beyond the 11 expected"):
    run(STACK.replace('expected: 12', 'expected: 11') % '', layered(12))
  stacked = run(STACK % '', layered(12))
  with pytest.raises(SurgeryError, match=r"cannot unstack 'layers/w' of shape \(12, 2, 3\): axis 0 "
                                         r'holds 12 layer\(s\), not the 10 expected'):
    run(r"ops: [{unstack: {match: '^layers/(.*)$', to: 'layer_{i}/\1', expected: 10}}]", stacked)


def test_fill_without_expected_is_refused_when_the_spec_loads():
  with pytest.raises(ValueError, match='give expected too'):
    load_spec(r"ops: [{stack: {match: '^layer_(\d+)/(.*)$', to: 'layers/\2', fill: zeros}}]")
