"""The spec: a YAML document naming the ops of one surgery.

Parsing checks everything that can be checked without a checkpoint (op names,
fields, their types, regexes, dtypes), so that a bad spec is refused before
any checkpoint is read, with the op's index and the field in the message.
The spec hash identifies a surgery in each output's provenance; a rerun with
the same hash skips outputs already written.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from typing import Any

import yaml

from transforms import merge as merging
from transforms.ops import OPS, Op, resolve

TOP_LEVEL = ('params', 'opt_state', 'optimizer', 'merge', 'ops')


class SpecError(ValueError):
  """The spec is malformed; the message says where."""


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """The optax optimizer that produced opt_state: `factory(**kwargs)`."""
  factory: str
  kwargs: dict

  def make(self) -> Any:
    return resolve(self.factory, 'factory')(**self.kwargs)


@dataclasses.dataclass(frozen=True)
class Spec:
  ops: tuple[Op, ...]
  params: str = 'params'
  opt_state: str = 'opt_state'
  optimizer: Optimizer | None = None
  merge: merging.Merge | None = None  # many checkpoints into one, before the ops

  @property
  def canonical(self) -> dict[str, Any]:
    """The spec with defaults filled in, as plain data."""
    canonical = {
        'params': self.params,
        'opt_state': self.opt_state,
        'ops': [{op.name: _fields_of(op)} for op in self.ops],
    }
    if self.optimizer:
      canonical['optimizer'] = dataclasses.asdict(self.optimizer)
    if self.merge:
      canonical['merge'] = self.merge.canonical
    return canonical

  @property
  def hash(self) -> str:
    text = json.dumps(self.canonical, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _fields_of(op: Op) -> dict[str, Any]:
  return {f.name: getattr(op, f.name) for f in dataclasses.fields(op)
          if getattr(op, f.name) != f.default}


def _check_type(value: Any, hint: Any) -> bool:
  if typing.get_origin(hint) is list:  # list[str]: names
    (item,) = typing.get_args(hint)
    return isinstance(value, list) and all(
        isinstance(v, item) and not isinstance(v, bool) for v in value)
  if isinstance(value, bool):
    return hint is bool
  if hint is float:
    return isinstance(value, (int, float)) or _as_float(value) is not None
  if hint is list:  # every list field is a list of integers (shape, axes)
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value)
  return isinstance(value, hint)


def _as_float(value: Any) -> float | None:
  """A number YAML 1.1 left as text (`1e30` has no dot, so it is a string there)."""
  try:
    return float(value) if isinstance(value, str) else None
  except ValueError:
    return None


def _hint_name(hint: Any) -> str:
  if typing.get_origin(hint) is list:
    return {str: 'a list of names', int: 'a list of integers'}[typing.get_args(hint)[0]]
  return 'a list of integers' if hint is list else hint.__name__


def _parse_optimizer(data: Any) -> Optimizer:
  if not isinstance(data, dict) or 'factory' not in data or set(data) - {'factory', 'kwargs'}:
    raise SpecError("spec: field 'optimizer' must be {factory: 'optax.adam', kwargs: {...}}")
  kwargs = data.get('kwargs') or {}
  if not isinstance(data['factory'], str) or not isinstance(kwargs, dict):
    raise SpecError("spec: optimizer: 'factory' must be a string and 'kwargs' a mapping")
  optimizer = Optimizer(factory=data['factory'], kwargs=kwargs)
  try:
    tx = optimizer.make()
  except ValueError as e:
    raise SpecError(f'spec: optimizer: {e}') from None
  except Exception as e:  # the factory's own complaint about its kwargs
    raise SpecError(f'spec: optimizer: {optimizer.factory}(**{_short(kwargs)}) failed: '
                    f'{_short(str(e), 400)}') from None
  if not hasattr(tx, 'init') or not hasattr(tx, 'update'):
    raise SpecError(f'spec: optimizer: {optimizer.factory} did not return an optax GradientTransformation')
  return optimizer


_MERGE_FIELDS = ('group', 'take', 'method', 'weights', 'decay', 'opt_state', 'allow_fewer')


def _one_of(where: str, value: Any, choices: tuple[str, ...]) -> str:
  if value not in choices:
    raise SpecError(f"{where} must be one of {', '.join(choices)}, got {_short(value)}")
  return value


def _count(where: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise SpecError(f'{where} must be a positive integer, got {_short(value)}')
  return value


def _parse_take(data: Any) -> merging.Take:
  if not isinstance(data, dict) or len(data) != 1 or set(data) - set(merging.Take._fields):
    raise SpecError("merge: field 'take' must be one of {last: K}, {steps: [...]}, "
                    f'{{every: N}}, got {_short(data)}')
  (key, value), = data.items()
  if key != 'steps':
    return merging.Take(**{key: _count(f'merge: take: {key}', value)})
  if not isinstance(value, list) or not value or not all(
      isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
    raise SpecError(f'merge: take: steps must be a non-empty list of steps, got {_short(value)}')
  return merging.Take(steps=tuple(sorted(set(value))))


def _parse_merge(data: Any) -> merging.Merge:
  """The `merge:` block; SpecError names the field."""
  if not isinstance(data, dict):
    raise SpecError(f'merge: expected a mapping with {", ".join(_MERGE_FIELDS)}, got {_short(data)}')
  unknown = sorted(map(str, set(data) - set(_MERGE_FIELDS)))
  if unknown:
    raise SpecError(f'merge: unknown field(s) {_short(unknown)} (fields: {", ".join(_MERGE_FIELDS)})')
  for key in ('group', 'take'):
    if key not in data:
      raise SpecError(f'merge: missing field {key!r}')
  take = _parse_take(data['take'])
  method = _one_of("merge: field 'method'", data.get('method', 'mean'), merging.METHODS)
  allow_fewer = data.get('allow_fewer', False)
  if not isinstance(allow_fewer, bool):
    raise SpecError(f"merge: field 'allow_fewer' must be true or false, got {_short(allow_fewer)}")
  weights, decay = data.get('weights'), data.get('decay')
  if (weights is not None) != (method == 'weighted'):
    raise SpecError("merge: 'weights' go with method: weighted, and it needs them")
  if (decay is not None) != (method == 'ema'):
    raise SpecError("merge: 'decay' goes with method: ema, and it needs one")
  if weights is not None:
    if not isinstance(weights, list) or not weights or not all(_check_type(w, float) for w in weights):
      raise SpecError(f'merge: weights must be a list of numbers, got {_short(weights)}')
    weights = tuple(float(w) for w in weights)
    if allow_fewer:
      raise SpecError('merge: weighted takes exactly one weight per input: not with allow_fewer')
    # A run's group takes one checkpoint per step it takes: countable here.
    # A soup's or `all`'s count is known once the checkpoints are found.
    inputs = take.last or len(take.steps or ())
    if data.get('group') == 'run' and inputs and len(weights) != inputs:
      raise SpecError(f'merge: {len(weights)} weight(s) for the {inputs} checkpoint(s) it takes')
  if decay is not None:
    if not _check_type(decay, float):
      raise SpecError(f'merge: decay must be a number, got {_short(decay)}')
    decay = float(decay)
  result = merging.Merge(group=_one_of("merge: field 'group'", data['group'], merging.GROUPS),
                         take=take, method=method, weights=weights, decay=decay,
                         opt_state=_one_of("merge: field 'opt_state'",
                                           data.get('opt_state', 'latest'), merging.OPT_STATES),
                         allow_fewer=allow_fewer)
  try:
    result.coefficients(len(weights) if weights else 2)  # the method's own checks
  except merging.MergeError as e:
    raise SpecError(f'merge: {e}') from None
  return result


def _parse_op(index: int, entry: Any) -> Op:
  where = f'ops[{index}]'
  if not isinstance(entry, dict) or len(entry) != 1:
    raise SpecError(f'{where}: expected one op as {{name: {{fields}}}}, got {_short(entry)}')
  (name, fields), = entry.items()
  if name not in OPS:
    raise SpecError(f'{where}: unknown op {_short(name)} (known: {", ".join(sorted(OPS))})')
  where = f'{where} ({name})'
  fields = {} if fields is None else fields
  if not isinstance(fields, dict):
    raise SpecError(f'{where}: fields must be a mapping, got {_short(fields)}')
  cls = OPS[name]
  hints = typing.get_type_hints(cls)
  declared = {f.name: f for f in dataclasses.fields(cls)}
  for key, value in fields.items():
    if key not in declared:
      raise SpecError(f"{where}: unknown field {_short(key)} (fields: {', '.join(declared)})")
    if not _check_type(value, hints[key]):
      raise SpecError(f"{where}: field {key!r} must be {_hint_name(hints[key])}, "
                      f'got {_short(value)}')
  for key, f in declared.items():
    if key not in fields and f.default is f.default_factory is dataclasses.MISSING:
      raise SpecError(f'{where}: missing field {key!r}')
  fields = {k: _as_float(v) if hints[k] is float and isinstance(v, str) else v
            for k, v in fields.items()}
  try:
    return cls(**fields)
  except ValueError as e:
    raise SpecError(f'{where}: {e}') from None


def parse_spec(data: Any) -> Spec:
  """A Spec from the YAML's data; SpecError names what is wrong."""
  if not isinstance(data, dict):
    raise SpecError(f'spec: expected a mapping with {TOP_LEVEL}, got {type(data).__name__}')
  unknown = set(data) - set(TOP_LEVEL)
  if unknown:
    raise SpecError(f'spec: unknown field(s) {_short(sorted(map(str, unknown)))} (fields: '
                    f'{", ".join(TOP_LEVEL)})')
  for key in ('params', 'opt_state'):
    if key in data and not isinstance(data[key], str):
      raise SpecError(f'spec: field {key!r} must be a string, got {_short(data[key])}')
  merge = _parse_merge(data['merge']) if 'merge' in data else None
  ops = data.get('ops', [] if merge else None)
  if not isinstance(ops, list) or not ops and not merge:
    raise SpecError("spec: field 'ops' must be a non-empty list of ops")
  optimizer = _parse_optimizer(data['optimizer']) if data.get('optimizer') else None
  parsed = tuple(_parse_op(i, entry) for i, entry in enumerate(ops))
  for i, op in enumerate(parsed[:-1]):
    if op.name == 'relayout':
      raise SpecError(f'ops[{i}] (relayout): must be the last op (it lays out the result '
                      'the others made)')
  return Spec(ops=parsed,
              params=data.get('params', 'params'),
              opt_state=data.get('opt_state', 'opt_state'),
              optimizer=optimizer, merge=merge)


# What a spec's YAML may expand to, in nodes (a mapping, a sequence or a
# scalar each, counting every use of an alias): far above any real spec,
# far below what 1 KB of nested aliases expands to (billions).
MAX_NODES = 100_000


class _Loader(yaml.SafeLoader):
  """YAML's safe loader, refusing a mapping that says a key twice (YAML
  keeps the last silently), with the line of each."""

  def construct_mapping(self, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
      if key_node.tag == 'tag:yaml.org,2002:merge':
        continue
      key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
      try:
        if key in seen:
          raise SpecError(f'spec: line {line}: key {_short(key)} is given twice (first at line '
                          f'{seen[key]})')
        seen[key] = line
      except TypeError:  # an unhashable key: the constructor refuses it
        continue
    return super().construct_mapping(node, deep)


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_: set[int]) -> int:
  """How many nodes `node` stands for with every alias expanded (each shared
  node sized once); SpecError, with its line, for a value that expands past
  MAX_NODES or an alias inside its own anchor."""
  if id(node) in sizes:
    return sizes[id(node)]
  if id(node) in open_:
    raise SpecError(f'spec: line {node.start_mark.line + 1}: an alias refers to the anchor '
                    'that holds it (a recursive structure)')
  open_.add(id(node))
  if isinstance(node, yaml.MappingNode):
    size = 1 + sum(_expanded_size(k, sizes, open_) + _expanded_size(v, sizes, open_)
                   for k, v in node.value)
  elif isinstance(node, yaml.SequenceNode):
    size = 1 + sum(_expanded_size(x, sizes, open_) for x in node.value)
  else:
    size = 1
  if size > MAX_NODES:
    raise SpecError(f'spec: line {node.start_mark.line + 1}: this value expands to more than '
                    f'{MAX_NODES:,} values once its aliases (*name) are filled in; write it out, '
                    'without aliases of aliases')
  open_.discard(id(node))
  sizes[id(node)] = size
  return size


def _short(value: Any, limit: int = 120) -> str:
  """repr(value), cut to `limit` characters: an error names a value, it
  does not print a large one."""
  text = repr(value)
  return text if len(text) <= limit else text[:limit] + f'... ({len(text)} characters)'


def load_spec(text: str) -> Spec:
  """A Spec from YAML text. Refused before anything is built from it: a key
  given twice, and aliases that expand past MAX_NODES (a billion laughs)."""
  loader = _Loader(text)
  try:
    node = loader.get_single_node()
    if node is not None:
      _expanded_size(node, {}, set())
    data = loader.construct_document(node) if node is not None else None
  except yaml.YAMLError as e:
    raise SpecError(f'spec: not valid YAML: {e}') from None
  finally:
    loader.dispose()
  return parse_spec(data)
