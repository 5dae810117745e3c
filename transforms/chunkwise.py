"""A leaf too large for the memory budget, computed a slab of rows at a time.

A dependency group of one input and one output whose every step is
elementwise (a cast, a scale), or a constant fill with the input placed in
it along later axes (a pad with a constant, along any axis but the first),
makes each slab of its output's leading rows from the same rows of its
input alone. Such a leaf streams: read a slab, compute it, write it, go
on, whatever its size. `why_not` says whether a group's computation is one;
`on_slab` gives that computation for slabs of a given number of rows.
Anything else over the budget fails its checkpoint by name.
"""
from __future__ import annotations

from typing import Any, Callable

import jax.extend as jex

# Primitives that map each element alone (with rank-0 operands broadcast).
_ELEMENTWISE = frozenset({
    'convert_element_type', 'reduce_precision', 'copy', 'neg', 'sign', 'abs', 'floor',
    'ceil', 'round', 'exp', 'exp2', 'log', 'log1p', 'expm1', 'tanh', 'logistic', 'sqrt', 'rsqrt',
    'square', 'integer_pow', 'erf', 'add', 'sub', 'mul', 'div', 'rem', 'pow', 'max', 'min',
    'nextafter', 'select_n', 'clamp', 'eq', 'ne', 'lt', 'le', 'gt', 'ge', 'and', 'or', 'not',
    'xor'})


def _is_var(v: Any) -> bool:
  return isinstance(v, jex.core.Var)


def _rank(v: Any) -> int:
  return len(v.aval.shape)


_NESTED = ('jit', 'pjit')  # a jitted function inside: its jaxpr is checked and run the same way


def why_not(jaxpr: Any) -> str | None:
  """None where `jaxpr` (one group's computation: constants as leading
  inputs, then its inputs) computes its one output's rows from the same rows
  of its one array input; else why not."""
  arrays = [v for v in jaxpr.invars if _rank(v) > 0]
  if len(arrays) != 1 or len(jaxpr.outvars) != 1 or not _is_var(jaxpr.outvars[0]):
    return 'not one array read and one written'
  if jaxpr.invars[-1] is not arrays[0]:
    return 'reads an array constant'
  rows = arrays[0].aval.shape[0]
  out = jaxpr.outvars[0].aval.shape
  if not out or out[0] != rows:
    return f'its output does not keep the input\'s {rows} leading rows'
  return _why_not_rows(jaxpr.eqns, rows)


def _why_not_rows(eqns: Any, rows: int) -> str | None:
  """None where every equation keeps `rows` leading rows, row by row."""
  for eqn in eqns:
    name = eqn.primitive.name
    shaped = [v for v in (*eqn.invars, *eqn.outvars) if _rank(v) > 0]
    if any(v.aval.shape[0] != rows for v in shaped):
      return f'{name} changes the leading axis'
    if name in _ELEMENTWISE:
      if len({v.aval.shape for v in shaped}) > 1:
        return f'{name} mixes shapes'
    elif name == 'broadcast_in_dim':
      if _rank(eqn.invars[0]):
        return 'broadcasts an array'
    elif name == 'dynamic_update_slice':  # operand, update, then a start index per axis
      if _rank(eqn.invars[1]) == 0 or _is_var(eqn.invars[2]) or eqn.invars[2].val != 0:
        return 'places an array along the leading axis'
    elif name in _NESTED:
      inner = eqn.params['jaxpr']
      if inner.consts:
        return f'{name} holds constants'
      if why := _why_not_rows(inner.jaxpr.eqns, rows):
        return why
    else:
      return f'{name} is not elementwise'
  return None


def on_slab(jaxpr: Any, rows: int) -> Callable[..., Any]:
  """`jaxpr`'s computation (one `why_not` accepts) for slabs of `rows`
  leading rows: f(*constants, slab) -> the output's slab. To be traced
  (jitted): its steps are bound again with the slab's shapes."""
  return lambda *args: _evaluate(jaxpr, args, rows)[0]


def _evaluate(jaxpr: Any, args: Any, rows: int) -> list[Any]:
  env = dict(zip(jaxpr.invars, args))
  read = lambda v: env[v] if _is_var(v) else v.val
  for eqn in jaxpr.eqns:
    params = eqn.params
    if eqn.primitive.name in _NESTED:
      outs = _evaluate(params['jaxpr'].jaxpr, list(map(read, eqn.invars)), rows)
    else:
      if eqn.primitive.name == 'broadcast_in_dim':
        params = {**params, 'shape': (rows, *params['shape'][1:])}
      outs = eqn.primitive.bind(*map(read, eqn.invars), **params)
    env.update(zip(eqn.outvars, outs if eqn.primitive.multiple_results or
                   eqn.primitive.name in _NESTED else [outs]))
  return [read(v) for v in jaxpr.outvars]
