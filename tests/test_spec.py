"""A bad spec is refused with the op's index and the field in the message."""
from __future__ import annotations

import time

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
    # Replacement templates, refused at load (issue 21), not once per checkpoint.
    (r"ops: [{rename: {match: '^Dense_(\d+)/', to: 'Linear_\9/'}}]",
     "ops[0] (rename): field 'to': 'Linear_\\\\9/' cannot be filled from match"),
    ("ops: [{rename: {match: '^Dense_', to: ''}}]", "ops[0] (rename): field 'to': must not be empty"),
    (r"ops: [{rename: {match: '^a', to: 'x\g<name>'}}]", 'unknown group'),
    (r"ops: [{stack: {match: '^layer_(\d+)/(.*)$', to: 'layers/\3'}}]", "ops[0] (stack): field 'to'"),
    (r"ops: [{unstack: {match: '^layers/(.*)$', to: 'layer_{i}/\2'}}]", "ops[0] (unstack): field 'to'"),
    # Keys given twice, with their lines.
    ("ops: [{drop: {match: a}}]\nops: [{drop: {match: b}}]", "line 2: key 'ops' is given twice (first at line 1)"),
    ("ops:\n  - scale: {match: a, by: 2, by: 3}", "line 2: key 'by' is given twice"),
    ("a: &a [*a]\nops: [{drop: {match: a}}]", 'line 1: an alias refers to the anchor that holds it'),
    # A merge's fields.
    ('merge: {take: {last: 3}}', "merge: missing field 'group'"),
    ('merge: {group: runs, take: {last: 3}}', "merge: field 'group' must be one of run, step, all, got 'runs'"),
    ('merge: {group: run, take: {last: 0}}', 'merge: take: last must be a positive integer, got 0'),
    ('merge: {group: run, take: {last: 2, every: 5}}', "merge: field 'take' must be one of"),
    ('merge: {group: run, take: {steps: []}}', 'merge: take: steps must be a non-empty list'),
    ('merge: {group: run, take: {last: 3}, method: median}', "field 'method' must be one of mean, weighted, ema"),
    ('merge: {group: run, take: {last: 3}, method: weighted}', "'weights' go with method: weighted"),
    ('merge: {group: run, take: {last: 3}, weights: [1, 2, 3]}', "'weights' go with method: weighted"),
    ('merge: {group: run, take: {last: 3}, method: weighted, weights: [1, 2]}',
     'merge: 2 weight(s) for the 3 checkpoint(s) it takes'),
    ('merge: {group: run, take: {last: 1}, method: weighted, weights: [1], allow_fewer: true}',
     'weighted takes exactly one weight per input: not with allow_fewer'),
    ('merge: {group: run, take: {last: 2}, method: weighted, weights: [1, -1]}', 'not negative'),
    ('merge: {group: run, take: {last: 3}, method: ema}', "'decay' goes with method: ema"),
    ('merge: {group: run, take: {last: 3}, method: ema, decay: 1.5}', 'merge: ema: decay must be in [0, 1)'),
    ('merge: {group: run, take: {last: 3}, opt_state: sum}', "field 'opt_state' must be one of latest, drop, mean"),
    ('merge: {group: run, take: {last: 3}, allow_fewer: 1}', "'allow_fewer' must be true or false"),
    ('merge: {group: run, take: {last: 3}, window: 2}', "merge: unknown field(s) ['window']"),
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


def test_good_templates_load():
  load_spec(r"ops: [{rename: {match: '^Dense_(?P<n>\d+)/', to: 'Linear_\g<n>/'}}]")
  load_spec(r"ops: [{rename: {match: '^(a|b)(c)?', to: '\2\1'}}]")  # a group that may not match
  load_spec(r"ops: [{rename: {match: '^model/(.*)$', to: '\1'}}]")


def alias_bomb(levels: int) -> str:
  lines = ['l0: &l0 [x, x, x, x, x, x, x, x, x, x]']
  lines += [f'l{i}: &l{i} [' + ', '.join([f'*l{i - 1}'] * 10) + ']' for i in range(1, levels)]
  return ('optimizer:\n  factory: optax.adam\n  kwargs:\n    ' + '\n    '.join(lines) +
          '\nops: [{drop: {match: a}}]\n')


def test_an_alias_bomb_is_refused_at_once_by_line():
  bomb = alias_bomb(12)  # under 1 KB; 10**12 values expanded
  assert len(bomb) < 1024
  start = time.perf_counter()
  with pytest.raises(SpecError, match=r'line 8: this value expands to more than 100,000 values'):
    load_spec(bomb)
  assert time.perf_counter() - start < 1.0


def test_an_error_names_a_large_value_without_printing_it():
  with pytest.raises(SpecError) as e:
    load_spec(alias_bomb(4))  # 10,000 values: loads, and adam refuses its kwargs
  assert len(str(e.value)) < 700 and 'characters)' in str(e.value)
  with pytest.raises(SpecError) as e:
    load_spec('ops: [{drop: {match: [' + ', '.join(['x'] * 10000) + ']}}]')
  assert len(str(e.value)) < 300



def test_a_merge_needs_no_ops_and_is_part_of_the_hash():
  mean = load_spec('merge: {group: run, take: {last: 5}}')
  assert mean.ops == () and mean.merge.coefficients(5).tolist() == [0.2] * 5
  assert mean.canonical['merge'] == {'group': 'run', 'take': {'last': 5}, 'method': 'mean',
                                     'opt_state': 'latest', 'allow_fewer': False}
  weighted = load_spec('merge: {group: step, take: {steps: [20, 10]}, method: weighted, weights: [1, 3]}\n'
                       'ops: [{drop: {match: head}}]')
  assert weighted.merge.take.steps == (10, 20) and len(weighted.ops) == 1
  assert len({mean.hash, weighted.hash, load_spec('merge: {group: run, take: {last: 4}}').hash,
              load_spec('ops: [{drop: {match: head}}]').hash}) == 4
