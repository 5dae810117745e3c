"""A surgery: the spec's ops compiled into one jitted `state -> state`.

The function that `jax.jit` traces works on concrete structure: paths, the
mirrors in opt_state and every rule's matches are plain Python at trace time,
so a rule that fits no checkpoint fails while tracing, before any array
moves. One compilation serves every checkpoint of the same signature (tree
structure, shapes, dtypes); `Surgery` keeps them and counts them. The state is
donated, so the old arrays are not held beside the new ones.

Only the params and opt_state go through the compiled function; everything
else in the state (step, rng, batch stats) passes through untouched.

`route` is the same surgery traced once more to find what it does NOT do:
an output leaf that is an input leaf (untouched, or only renamed) needs no
computing, reading or writing, and its stored bytes can be carried over.
"""
from __future__ import annotations

import hashlib
import math
import threading
import warnings
from typing import Any, Mapping, NamedTuple

import jax
import jax.extend as jex
# The one private JAX name we use: dead-code elimination of a traced jaxpr,
# which finds the inputs that the computed outputs read.
from jax._src.interpreters.partial_eval import dce_jaxpr

from transforms import mirrors, paths
from transforms.ops import STALE, Context, StateOp, SurgeryError, apply_to_mirror
from transforms.spec import Spec

Signature = tuple[Any, tuple[tuple[tuple[int, ...], str], ...]]


def signature(tree: Any) -> Signature:
  """Tree structure plus every leaf's shape and dtype."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  return treedef, tuple((tuple(x.shape), str(x.dtype)) for x in leaves)


def tree_bytes(tree: Any) -> int:
  """Bytes of every array leaf (shape x itemsize): arrays, abstract arrays or
  Orbax's array metadata alike."""
  return sum(math.prod(x.shape) * x.dtype.itemsize
             for x in jax.tree_util.tree_leaves(tree)
             if hasattr(x, 'shape') and hasattr(x, 'dtype'))


def signature_id(sig: Signature) -> str:
  """A short stable name for a signature, for reports."""
  return hashlib.sha256(repr(sig).encode()).hexdigest()[:12]


def _check_tree(flat: paths.Flat, what: str) -> None:
  """A path may not be both a leaf and a sub-tree (rename into a leaf)."""
  for p in flat:
    parts = p.split(paths.SEP)
    for i in range(1, len(parts)):
      parent = paths.SEP.join(parts[:i])
      if parent in flat:
        raise SurgeryError(f'{what}: {parent!r} would be both a leaf and the parent of {p!r}')


def key_path(keys: tuple[Any, ...]) -> str:
  """A jax key path as 'a/0/mu': NamedTuple fields, dict keys and list indices
  alike, so a typed state and its target-less restore give the same paths."""
  return paths.SEP.join(
      str(next(getattr(k, a) for a in ('name', 'key', 'idx') if hasattr(k, a))) for k in keys)


def fill_from_init(opt_state: Any, fresh: Any) -> Any:
  """opt_state with its STALE leaves taken from `fresh` (the optimizer's init
  of the new params; None where init holds nothing there, as a masked leaf),
  then checked leaf by leaf against it: paths, shapes, dtypes."""
  fresh_leaves = {key_path(k): x for k, x in jax.tree_util.tree_flatten_with_path(fresh)[0]}
  filled = jax.tree_util.tree_map_with_path(
      lambda k, x: fresh_leaves.get(key_path(k)) if x is STALE else x, opt_state)
  ours = {key_path(k): x for k, x in jax.tree_util.tree_flatten_with_path(filled)[0]}
  for path in sorted(set(ours) | set(fresh_leaves)):
    got, want = ours.get(path), fresh_leaves.get(path)
    if got is None or want is None:
      where = 'is missing from' if got is None else 'is not in'
      raise SurgeryError(f"opt_state leaf {path!r} {where} the optimizer's init of the new params")
    if (tuple(got.shape), got.dtype) != (tuple(want.shape), want.dtype):
      raise SurgeryError(
          f'opt_state leaf {path!r} is {got.dtype}{list(got.shape)}, the optimizer\'s init of '
          f'the new params gives {want.dtype}{list(want.shape)}')
  return filled


def _abstract_leaves(tree: Any) -> tuple[list[jax.ShapeDtypeStruct], Any]:
  """(the tree's leaves as shape, dtype and sharding where they have one, its treedef)."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  return [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s if isinstance(
      s := getattr(x, 'sharding', None), jax.sharding.Sharding) else None) for x in leaves], treedef


def _compile_donating(fn: Any, arg: Any) -> Any:
  """`fn` jitted with its argument donated, compiled for `arg` (arrays or abstract)."""
  with warnings.catch_warnings():
    # Donation is best effort: a leaf whose shape changes cannot reuse its buffer.
    warnings.filterwarnings('ignore', 'Some donated buffers were not usable')
    return jax.jit(fn, donate_argnums=0).lower(arg).compile()


class OpTrace(NamedTuple):
  """What one op did while tracing: how many params it matched (None for
  whole-state ops) and which it only renamed."""
  index: int
  name: str
  matched: int | None
  renamed: dict[str, str]


class Migrated(NamedTuple):
  state: Any
  signature: str   # signature_id of the input's params and opt_state
  compiled: bool   # whether this call compiled the surgery


class Route(NamedTuple):
  """What the surgery does to each leaf of one signature, proven by tracing it.

  A carried output *is* an input leaf (untouched or renamed): nothing about
  it needs computing. The computed outputs read only the `needed` inputs;
  `compiled` maps those to the computed outputs, in output order.
  """
  out_treedef: Any
  carried: dict[int, int]     # output leaf index -> the input leaf index it is
  needed: tuple[int, ...]     # input leaf indices the computed outputs read
  compiled: Any               # [needed input leaves] -> [computed output leaves]

  def assemble(self, computed: list[Any], carried: list[Any]) -> Any:
    """The output tree from the computed leaves and, for each carried output
    in order, what stands for it (`carried[k]` for the k-th carried output)."""
    computed, carried = iter(computed), iter(carried)
    return self.out_treedef.unflatten(
        [next(carried) if i in self.carried else next(computed)
         for i in range(self.out_treedef.num_leaves)])


class _View:
  """The params as a flat dict and each opt_state mirror as one, while ops run."""

  def __init__(self, tree: dict[str, Any], ctx: Context):
    self.tree, self.ctx = tree, ctx
    self.params = paths.flatten(tree[ctx.params])
    self.locations = mirrors.find_mirrors(self.params.keys(), tree.get(ctx.opt_state))
    self.shadows = [paths.flatten(mirrors.get_at(tree[ctx.opt_state], loc))
                    for loc in self.locations]

  def close(self) -> dict[str, Any]:
    out = {**self.tree, self.ctx.params: paths.unflatten(self.params)}
    if self.ctx.opt_state in out:
      opt_state = out[self.ctx.opt_state]
      for loc, m in zip(self.locations, self.shadows):
        opt_state = mirrors.replace_at(opt_state, loc, paths.unflatten(m))
      out[self.ctx.opt_state] = opt_state
    return out


class Surgery:
  """The spec's ops as a compiled function, one compilation per signature."""

  def __init__(self, spec: Spec):
    self.spec = spec
    self.optimizer = spec.optimizer.make() if spec.optimizer else None
    self._compiled: dict[Signature, Any] = {}
    self._routes: dict[Signature, Route] = {}
    self._compiling = threading.Lock()  # a worker's threads share one compilation per signature

  @property
  def compilations(self) -> int:
    return len(self._compiled) + len(self._routes)

  def split(self, state: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(what the surgery changes: params and opt_state, the rest of the state)."""
    if not isinstance(state, Mapping) or self.spec.params not in state:
      keys = list(state) if isinstance(state, Mapping) else type(state).__name__
      raise SurgeryError(f'the state has no {self.spec.params!r} key (it has {keys})')
    keys = (self.spec.params, self.spec.opt_state)
    return ({k: state[k] for k in keys if k in state},
            {k: v for k, v in state.items() if k not in keys})

  def apply(self, tree: dict[str, Any], trace: list[OpTrace] | None = None
            ) -> dict[str, Any]:
    """The pure surgery on {params, opt_state}: what gets traced and compiled.

    `trace`, when given, gets one OpTrace per op (what `plan` reports).
    """
    ctx = Context(self.spec.params, self.spec.opt_state, self.optimizer)
    view = _View(tree, ctx)
    for index, op in enumerate(self.spec.ops):
      try:
        if isinstance(op, StateOp):
          view = _View(op.transform(view.close(), ctx), ctx)
          if trace is not None:
            trace.append(OpTrace(index, op.name, None, {}))
          continue
        selected = op.select(view.params)
        before = view.params
        view.params, produced = op.apply(before, selected)
        if trace is not None:
          trace.append(OpTrace(index, op.name, len(selected), op.renamed(selected, produced)))
        view.shadows = [
            apply_to_mirror(op, m, selected, before, self.optimizer is not None,
                            paths.SEP.join(map(str, (ctx.opt_state, *loc))))
            for loc, m in zip(view.locations, view.shadows)]
      except SurgeryError as e:
        raise SurgeryError(f'ops[{index}] ({op.name}): {e}') from None
    _check_tree(view.params, 'after the surgery')
    out = view.close()
    if self.optimizer is not None and ctx.opt_state in out:
      out[ctx.opt_state] = fill_from_init(out[ctx.opt_state], self.optimizer.init(out[ctx.params]))
    return out

  def compiled_for(self, tree: dict[str, Any]) -> tuple[Any, Signature, bool]:
    """(the compiled surgery for this tree, its signature, whether it was compiled now)."""
    sig = signature(tree)
    with self._compiling:
      if sig in self._compiled:
        return self._compiled[sig], sig, False
      self._compiled[sig] = _compile_donating(self.apply, tree)
      return self._compiled[sig], sig, True

  def __call__(self, state: Any) -> Migrated:
    """The migrated state, its input's signature, whether this call compiled.
    Donates `state`'s arrays."""
    tree, rest = self.split(state)
    tree = jax.device_put(tree)
    compiled, sig, fresh = self.compiled_for(tree)
    return Migrated({**rest, **compiled(tree)}, signature_id(sig), fresh)

  def route(self, tree: dict[str, Any]) -> tuple[Route, Signature, bool]:
    """(the Route of this tree's signature, the signature, whether it was
    compiled now). `tree` may be abstract: anything with shape and dtype."""
    sig = signature(tree)
    with self._compiling:
      if sig in self._routes:
        return self._routes[sig], sig, False
      self._routes[sig] = self._trace_route(tree)
      return self._routes[sig], sig, True

  def trace(self, tree: dict[str, Any]) -> tuple[Any, Any, dict[int, int]]:
    """(the surgery's closed jaxpr on this tree's leaves, its output shapes,
    {output leaf index: the input leaf index it is}). No array is read."""
    abstract, treedef = _abstract_leaves(tree)
    closed, out_shape = jax.make_jaxpr(
        lambda flat: self.apply(treedef.unflatten(flat)), return_shape=True)(abstract)
    inputs = {v: i for i, v in enumerate(closed.jaxpr.invars)}
    carried = {o: inputs[v] for o, v in enumerate(closed.jaxpr.outvars)
               if isinstance(v, jex.core.Var) and v in inputs}
    return closed, out_shape, carried

  def _trace_route(self, tree: dict[str, Any]) -> Route:
    closed, out_shape, carried = self.trace(tree)
    jaxpr = closed.jaxpr
    pruned, used = dce_jaxpr(jaxpr, [o not in carried for o in range(len(jaxpr.outvars))])
    needed = tuple(i for i, u in enumerate(used) if u)
    compute = jex.core.jaxpr_as_fun(jex.core.ClosedJaxpr(pruned, closed.consts))
    abstract, _ = _abstract_leaves(tree)  # with their shardings, which avals lack
    compiled = _compile_donating(lambda xs: compute(*xs), [abstract[i] for i in needed])
    return Route(jax.tree_util.tree_structure(out_shape), carried, needed, compiled)
