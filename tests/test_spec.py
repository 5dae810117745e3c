"""A bad spec is refused with the op's index and the field in the message."""
from __future__ import annotations

import pytest

from transforms import SpecError, load_spec


@pytest.mark.parametrize('text, message', [
    ("ops: [{frobnicate: {match: a}}]", "ops[0]: unknown op 'frobnicate'"),
    ("ops: [{pad: {match: a, axis: 1}}]", "ops[0] (pad): missing field 'to'"),
    ("ops: [{pad: {match: a, axis: 1.5, to: 3}}]", "ops[0] (pad): field 'axis' must be int"),
    ("ops: [{reshape: {match: a, shape: [2, x]}}]", "field 'shape' must be a list of integers"),
    ("ops: [{reinit: {match: a, init: nonsense}}]", "ops[0] (reinit): field 'init': unknown initializer"),
    ("ops: [{add: {path: a/b, shape: [2], init: zeros, seed: true}}]", "field 'seed' must be int"),
    ("ops: [{unstack: {match: a, to: b}}]", "ops[0] (unstack): field 'to': must contain {i}"),
    ("ops: [{python: {fn: 'no_such_pkg.mod:fix'}}]", "ops[0] (python): field 'fn': cannot import"),
    ("optimizer: {factory: optax.nope}\nops: [{drop: {match: a}}]", "optimizer: field 'factory': cannot import"),
    ("optimizer: {factory: optax.adam, kwargs: {lr: 1}}\nops: [{drop: {match: a}}]", "optax.adam(**{'lr': 1}) failed"),
    ("ops: [{drop: {match: a}}, {rename: {match: a}}]", "ops[1] (rename): missing field 'to'"),
    ("ops: [{rename: {match: '(', to: b}}]", "ops[0] (rename): field 'match': bad regex"),
    ("ops: [{scale: {match: a, by: x}}]", "ops[0] (scale): field 'by' must be float"),
    ("ops: [{normalize: {match: a, foo: 1}}]", "ops[0] (normalize): unknown field 'foo'"),
    ("ops: [{cast: {match: a, dtype: float7}}]", "ops[0] (cast): field 'dtype': unknown dtype"),
    ("ops: [{drop: {match: a, opt_state: keep}}]", "ops[0] (drop): field 'opt_state'"),
    ("ops: [{drop: {match: a}, scale: {match: b}}]", 'ops[0]: expected one op'),
    ("ops: []", "field 'ops' must be a non-empty list"),
    ("opz: []", "unknown field(s) ['opz']"),
    ("params: [1]\nops: [{drop: {match: a}}]", "field 'params' must be a string"),
    ("ops: [unclosed", 'not valid YAML'),
])
def test_bad_spec_names_op_and_field(text, message):
  with pytest.raises(SpecError) as e:
    load_spec(text)
  assert message in str(e.value)


def test_hash_ignores_formatting_and_defaults():
  a = load_spec("ops: [{scale: {match: 'k$', by: 0.5}}]")
  b = load_spec("params: params\nops:\n  - scale: {by: 0.5, match: 'k$', opt_state: ''}\n")
  c = load_spec("ops: [{scale: {match: 'k$', by: 0.25}}]")
  assert a.hash == b.hash != c.hash
  assert a.canonical == {'params': 'params', 'opt_state': 'opt_state',
                         'ops': [{'scale': {'match': 'k$', 'by': 0.5}}]}
