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
import jax.numpy as jnp
# The one private JAX name we use: dead-code elimination of a traced jaxpr,
# which finds the inputs that the computed outputs read.
from jax._src.interpreters.partial_eval import dce_jaxpr

from transforms import guard, mirrors, paths
from transforms.groups import Computation, Group, tree_bytes
from transforms.ops import (STALE, Context, Grown, MatchOp, Op, Reinit, Relayout, StateOp,
                            SurgeryError, apply_to_mirror)
from transforms.spec import Spec

Signature = tuple[Any, tuple[tuple[tuple[int, ...], str], ...]]


def signature(tree: Any) -> Signature:
  """Tree structure plus every leaf's shape and dtype."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  return treedef, tuple((tuple(x.shape), str(x.dtype)) for x in leaves)


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


def fill_from_init(opt_state: Any, fresh: Any) -> Any:
  """opt_state with what only the optimizer knows taken from `fresh` (its
  init of the new params): STALE leaves whole, the new slots of Grown ones.
  Then checked leaf by leaf against it: paths, shapes, dtypes."""
  fresh_leaves, fresh_nodes = paths.leaf_paths(fresh), mirrors.nodes(fresh)

  def fill(k, x):
    want = fresh_leaves.get(paths.key_path(k))
    if x is STALE:
      return fresh_nodes.get(paths.key_path(k))  # a leaf, or a sub-tree (SM3's list per param)
    if isinstance(x, Grown):
      fits = want is not None and want.ndim == x.value.ndim and all(
          n == m or i == x.axis for i, (n, m) in enumerate(zip(want.shape, x.value.shape)))
      return (jax.lax.dynamic_update_slice_in_dim(want, x.value.astype(want.dtype), 0, x.axis)
              if fits else want)
    return x

  filled = jax.tree_util.tree_map_with_path(
      fill, opt_state, is_leaf=lambda x: x is STALE or isinstance(x, Grown))
  ours = paths.leaf_paths(filled)
  for path in sorted(set(ours) | set(fresh_leaves)):
    got, want = ours.get(path), fresh_leaves.get(path)
    if got is None:
      raise SurgeryError(f"the migrated opt_state lacks leaf {path!r}, which the optimizer's "
                         'init of the new params has')
    if want is None:
      raise SurgeryError(f"the migrated opt_state has leaf {path!r}, which the optimizer's "
                         'init of the new params does not have')
    if (tuple(got.shape), got.dtype) != (tuple(want.shape), want.dtype):
      hint = (' (a cast leaves the moments as they are unless it says opt_state: follow)'
              if tuple(got.shape) == tuple(want.shape) else '')
      raise SurgeryError(
          f'opt_state leaf {path!r} is {got.dtype}{list(got.shape)}, the optimizer\'s init of '
          f'the new params gives {want.dtype}{list(want.shape)}{hint}')
  placed, expected = _placeholders(filled), _placeholders(fresh)
  if placed != expected:
    differ = sorted(placed ^ expected)[0]
    where = 'has' if differ in placed else 'lacks'
    raise SurgeryError(f"the migrated opt_state {where} a masked-out placeholder at {differ!r}, "
                       "unlike the optimizer's init of the new params")
  return filled


def _placeholders(opt_state: Any) -> set[str]:
  """Where a tree holds placeholders (a masked-out sub-tree, an EmptyState)."""
  return {p for p, node in mirrors.nodes(opt_state).items() if p and mirrors.is_placeholder(node)}


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
  whole-state ops), which it only renamed, and which it combined with
  others or cut up (`Op.combined`, said as `verb`)."""
  index: int
  name: str
  matched: int | None
  renamed: dict[str, str]
  combined: dict[str, list[str]] = {}
  verb: str = ''


class Migrated(NamedTuple):
  state: Any
  signature: str   # signature_id of the input's params and opt_state
  compiled: bool   # whether this call compiled the surgery


class Route(NamedTuple):
  """What the surgery does to each leaf of one signature, proven by tracing it.

  A carried output *is* an input leaf (untouched or renamed): nothing about
  it needs computing. The computed outputs read only the `needed` inputs;
  `Surgery.route_function` maps those to the computed outputs, in output
  order (or `Surgery.groups` splits them, to compute a part at a time).
  """
  out_treedef: Any
  carried: dict[int, int]     # output leaf index -> the input leaf index it is
  needed: tuple[int, ...]     # input leaf indices the computed outputs read
  removes: str | None = None  # how the output loses input data (see `removal`), or None

  def assemble(self, computed: list[Any], carried: list[Any]) -> Any:
    """The output tree from the computed leaves and, for each carried output
    in order, what stands for it (`carried[k]` for the k-th carried output)."""
    computed, carried = iter(computed), iter(carried)
    return self.out_treedef.unflatten(
        [next(carried) if i in self.carried else next(computed)
         for i in range(self.out_treedef.num_leaves)])


class _View:
  """The params as a flat dict, each opt_state mirror and each collection as
  one keyed by full param paths, while ops run; `close` puts them back."""

  def __init__(self, tree: dict[str, Any], ctx: Context):
    self.tree, self.ctx = tree, ctx
    self.params = paths.flatten(tree[ctx.params])
    opt_state = tree.get(ctx.opt_state)
    self.mirrors = mirrors.find_mirrors(self.params, opt_state, ctx.opt_state or 'state')
    self.shadows = [
        mirrors.expand({paths.join(m.base, q): x for q, x in
                        paths.flatten(mirrors.get_at(opt_state, m.location)).items()},
                       self.params, m.label)
        for m in self.mirrors]
    self.collections = {k: paths.flatten(v) for k, v in tree.items()
                        if k not in (ctx.params, ctx.opt_state)}
    self.found: list[tuple[mirrors.Mirror, str]] = []  # by close: each mirror, its base now

  def follow(self, op: Op, selected: list[str], before: paths.Flat, can_rebuild: bool,
             zero_fills: list[tuple[str, Any]] | None = None) -> None:
    """Apply `op`, which the params took at `selected`, to every mirror and,
    if it is structural, to every collection (matched by its own paths).
    `zero_fills`: see `apply_to_mirror`."""
    self.shadows = [apply_to_mirror(op, shadow, selected, before, can_rebuild, m.label, zero_fills)
                    for m, shadow in zip(self.mirrors, self.shadows)]
    if op.structural and isinstance(op, MatchOp):
      self.collections = {k: op.apply(flat, paths.matching(op.pattern, flat))[0]
                          for k, flat in self.collections.items()}

  def bases(self) -> list[str]:
    """Where each mirror's base is after the ops (a renamed `fast/` moves it)."""
    out = []
    for m, shadow in zip(self.mirrors, self.shadows):
      keys = [paths.parts(p) for p in shadow]
      depth = len(paths.parts(m.base))
      tops = {tuple(k[:depth]) for k in keys}
      if len(tops) > 1:
        raise SurgeryError(f'{m.label} mirrored {m.base!r}, but the surgery spread its params over '
                           f'{sorted(paths.SEP.join(t) for t in tops)[:3]}')
      out.append(paths.SEP.join(tops.pop()) if tops else m.base)
    return out

  def close(self) -> dict[str, Any]:
    """The tree with the ops' results; fails naming a mirror that cannot go back."""
    out = {**self.tree, self.ctx.params: paths.unflatten(self.params),
           **{k: paths.unflatten(flat) for k, flat in self.collections.items()}}
    if self.ctx.opt_state in out:
      opt_state = out[self.ctx.opt_state]
      self.found = list(zip(self.mirrors, self.bases()))
      for (m, base), shadow in zip(self.found, self.shadows):
        try:
          flat = mirrors.collapse(shadow, self.params.keys())
        except mirrors.MirrorError as e:
          raise SurgeryError(str(e)) from None
        relative = {p[len(base) + 1:] if base else p: x for p, x in flat.items()}
        opt_state = mirrors.replace_at(opt_state, m.location, paths.unflatten(relative))
      out[self.ctx.opt_state] = opt_state
    return out


class Surgery:
  """The spec's ops as a compiled function, one compilation per signature."""

  def __init__(self, spec: Spec):
    self.spec = spec
    self.optimizer = spec.optimizer.make() if spec.optimizer else None
    self._compiled: dict[Signature, Any] = {}
    self._routes: dict[Signature, Route] = {}
    self._route_functions: dict[Signature, Any] = {}
    self._traced: dict[Signature, tuple[Any, ...]] = {}  # see _split_computed
    self._group_functions: dict[Any, Any] = {}  # by group signature: see Computation
    self._computations: dict[tuple[Any, ...], Computation] = {}  # by signature, whole, placement
    self._zero_fills: dict[Signature, list[str]] = {}  # see zero_fills
    self._probes: dict[Signature, Any] = {}  # see check_zero_fills
    self._compiling = threading.Lock()  # a worker's threads share one compilation per signature

  @property
  def compilations(self) -> int:
    return len(self._compiled) + len(self._route_functions) + len(self._group_functions)

  def split(self, state: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(what the surgery changes, the rest of the state).

    What it changes: the params, the optimizer state, and every collection
    beside the params keyed by their module paths (`batch_stats`). With
    `params: ''` the params are the whole state but the optimizer state (as
    NNX's guide saves a model). Decided from the keys alone, so metadata and
    arrays split alike."""
    params, opt_state = self.spec.params, self.spec.opt_state
    if not isinstance(state, Mapping):
      raise SurgeryError(f'the state is a {type(state).__name__}, not a mapping of params and '
                         'optimizer state')
    if params == '':
      return ({'': {k: v for k, v in state.items() if k != opt_state},
               **({opt_state: state[opt_state]} if opt_state in state else {})}, {})
    if params not in state:
      raise SurgeryError(
          f"the state has no {params!r} key (it has {list(state)}): set the spec's 'params:' "
          "to the key that holds the params, or to '' when the params are the whole state "
          "(as NNX's guide saves a model)")
    if not isinstance(state[params], Mapping):
      raise SurgeryError(f"the state's {params!r} is a {type(state[params]).__name__}, not a "
                         'mapping of names to arrays')
    param_paths = paths.flatten(state[params])
    keys = {params, opt_state} | {k for k, v in state.items()
                                  if k not in (params, opt_state) and
                                  guard.is_collection(v, param_paths)}
    for k, v in state.items():
      if k not in keys and mirrors.find_mirrors(param_paths, v, k):
        raise SurgeryError(
            f"the state's {k!r} holds mirrors of the params (an optimizer state?), and the spec's "
            f"opt_state is {opt_state!r}: set 'opt_state: {k}' so that they follow the params")
    return ({k: v for k, v in state.items() if k in keys},
            {k: v for k, v in state.items() if k not in keys})

  def join(self, tree: dict[str, Any], rest: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `split`: the whole state from the surgery's output and the rest."""
    if self.spec.params == '':
      return {**tree[''], **{k: v for k, v in tree.items() if k != ''}}
    return {**rest, **tree}

  def apply(self, tree: dict[str, Any], trace: list[OpTrace] | None = None,
            zero_fills: list[tuple[str, Any]] | None = None) -> dict[str, Any]:
    """The pure surgery on what `split` gives: what gets traced and compiled.
    The guard checks its result before it is returned.

    `trace`, when given, gets one OpTrace per op (what `plan` reports);
    `zero_fills`, each optimizer-state entry that an op fills with zeros for
    want of `optimizer:`, as it was before (see `check_zero_fills`).
    """
    ctx = Context(self.spec.params, self.spec.opt_state, self.optimizer)
    view = _View(tree, ctx)
    before = dict(view.params)
    held_every = [m for m, shadow in zip(view.mirrors, view.shadows)
                  if all(p in shadow for p in before if paths.under(p, m.base))]
    lineage = guard.Lineage({p: p for p in view.params})
    for index, op in enumerate(self.spec.ops):
      if isinstance(op, Relayout):
        continue  # the last op: laid out once the guard has proven the result, below
      try:
        if isinstance(op, StateOp):
          view = _View(op.transform(self._settle(view.close(), ctx), ctx), ctx)
          if trace is not None:
            trace.append(OpTrace(index, op.name, None, {}))
          continue
        selected = op.select(view.params)
        current = view.params
        view.params, produced = op.apply(current, selected)
        renamed = op.renamed(selected, produced)
        lineage.follow(renamed)
        if isinstance(op, Reinit) and op.mirror_mode != 'keep':
          lineage.fresh |= set(produced)
        if trace is not None:
          trace.append(OpTrace(index, op.name, len(selected), renamed,
                               op.combined(selected, produced), op.verb))
        view.follow(op, selected, current, self.optimizer is not None, zero_fills)
      except (SurgeryError, TimeoutError) as e:  # TimeoutError: a regex that would not end
        raise SurgeryError(f'ops[{index}] ({op.name}): {e}') from None
    _check_tree(view.params, 'after the surgery')
    out = self._settle(view.close(), ctx)
    try:
      guard.check_keys(tree, out, {ctx.opt_state} if any(
          op.name == 'drop_optimizer' for op in self.spec.ops) else set())
      guard.check_opt_state(before, view.params, tree.get(ctx.opt_state), out.get(ctx.opt_state),
                            view.found, lineage, ctx.opt_state or 'state',
                            rebuilt=self.optimizer is not None)
      if self.optimizer is None and ctx.opt_state in out:  # with it, _settle checked against init
        guard.check_complete(held_every, out[ctx.opt_state], view.params, view.found)
      for name, flat in view.collections.items():
        guard.check_collection(name, before, view.params, paths.flatten(tree[name]), flat)
      guard.check_storable(out[ctx.params], ctx.params)  # a param is named before its moments
      guard.check_storable(out)
    except guard.GuardError as e:
      raise SurgeryError(f'guard: {e}') from None
    return self._relayout(out, ctx, trace)

  def _relayout(self, out: dict[str, Any], ctx: Context,
                trace: list[OpTrace] | None) -> dict[str, Any]:
    """The proven result laid out as the spec's last op says, if it says."""
    if not self.spec.ops or not isinstance(self.spec.ops[-1], Relayout):
      return out
    op, index = self.spec.ops[-1], len(self.spec.ops) - 1
    try:
      moved = op.moves(out, ctx)
      if trace is not None:
        trace.append(OpTrace(index, op.name, None, moved))
      return op.transform(out, ctx)
    except SurgeryError as e:
      raise SurgeryError(f'ops[{index}] ({op.name}): {e}') from None

  def _settle(self, tree: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """With `optimizer:`, fill what only it knows from its init of the params
    and prove one update type-checks; without, the tree as it is."""
    if self.optimizer is None or ctx.opt_state not in tree:
      return tree
    fresh = self.optimizer.init(tree[ctx.params])
    filled = fill_from_init(tree[ctx.opt_state], fresh)
    typed = jax.tree_util.tree_structure(fresh).unflatten(
        [paths.leaf_paths(filled)[p] for p in paths.leaf_paths(fresh)])
    try:
      guard.check_update(self.optimizer, tree[ctx.params], typed)
    except guard.GuardError as e:
      raise SurgeryError(f'guard: {e}') from None
    return {**tree, ctx.opt_state: filled}

  def compiled_for(self, tree: dict[str, Any]) -> tuple[Any, Signature, bool]:
    """(the compiled surgery for this tree, its signature, whether it was compiled now)."""
    sig = signature(tree)
    with self._compiling:
      if sig in self._compiled:
        return self._compiled[sig], sig, False
      fills = []
      self._compiled[sig] = _compile_donating(lambda t: self.apply(t, zero_fills=fills), tree)
      self._zero_fills.setdefault(sig, [name for name, _ in fills])
      return self._compiled[sig], sig, True

  def __call__(self, state: Any) -> Migrated:
    """The migrated state, its input's signature, whether this call compiled.
    Donates `state`'s arrays."""
    tree, rest = self.split(state)
    tree = jax.device_put(tree)
    compiled, sig, fresh = self.compiled_for(tree)
    if self._zero_fills[sig]:
      self.check_zero_fills(tree)
    return Migrated(self.join(compiled(tree), rest), signature_id(sig), fresh)

  def route(self, tree: dict[str, Any]) -> tuple[Route, Signature]:
    """(the Route of this tree's signature, the signature), traced once per
    signature. `tree` may be abstract: anything with shape and dtype."""
    sig = signature(tree)
    with self._compiling:
      if sig not in self._routes:
        self._routes[sig] = self._trace_route(tree)
      return self._routes[sig], sig

  def route_function(self, tree: dict[str, Any]) -> tuple[Any, bool]:
    """([needed input leaves] -> [computed output leaves] of this tree's
    Route, compiled once per signature for `tree`'s shapes, dtypes and
    placements; whether it was compiled now)."""
    sig = signature(tree)
    closed, _, _, pruned, needed, _ = self._split_computed(tree)
    with self._compiling:
      fresh = sig not in self._route_functions
      if fresh:
        compute = jex.core.jaxpr_as_fun(jex.core.ClosedJaxpr(pruned, closed.consts))
        abstract, _ = _abstract_leaves(tree)  # with their shardings, which avals lack
        self._route_functions[sig] = _compile_donating(lambda xs: compute(*xs),
                                                       [abstract[i] for i in needed])
      return self._route_functions[sig], fresh

  def trace(self, tree: dict[str, Any]) -> tuple[Any, Any, dict[int, int]]:
    """(the surgery's closed jaxpr on this tree's leaves, its output shapes,
    {output leaf index: the input leaf index it is}). No array is read."""
    return self._split_computed(tree)[:3]

  def zero_fills(self, tree: dict[str, Any]) -> list[str]:
    """The optimizer-state entries this surgery fills with zeros for want
    of `optimizer:` ('<mirror> <param path>'), traced once per signature
    (`tree` may be abstract): each is checked by `check_zero_fills`."""
    sig = signature(tree)
    if sig not in self._zero_fills:
      self._split_computed(tree)
    return self._zero_fills[sig]

  def check_zero_fills(self, tree: dict[str, Any]) -> None:
    """Fail, naming them, where a pad fills an optimizer-state entry with
    zeros that held none before. Without `optimizer:` nothing says zero is
    that state's init: it is Adam's, but COCOB's scale starts at 1e-8 and
    zeros there turn the params NaN one step later. A zero among the stored
    values is evidence that the state takes zeros; none, and we cannot
    prove the output resumes."""
    sig = signature(tree)
    def probe(t):
      fills = []
      self.apply(t, zero_fills=fills)
      return [jnp.all(x != 0) for _, x in fills]
    with self._compiling:  # as every cache here: one per signature, whichever thread asks
      checks = self._probes.setdefault(sig, jax.jit(probe))
    zeroless = [name for name, none in zip(self.zero_fills(tree), checks(tree)) if none]
    if zeroless:
      raise SurgeryError(
          f'pad would fill new slots of {", ".join(zeroless[:2])}'
          f'{f" and {len(zeroless) - 2} more" if len(zeroless) > 2 else ""} with zeros, which no '
          "stored value there is: give the spec 'optimizer:' to fill them from its init, or put "
          "'mirror_init: zeros' on the pad if zeros are that init (Adam's moments; not COCOB's "
          "scale, which starts at 1e-8: zeros there are NaN a step later)")

  def _trace(self, tree: dict[str, Any]) -> tuple[Any, Any, dict[int, int]]:
    abstract, treedef = _abstract_leaves(tree)
    fills = []
    closed, out_shape = jax.make_jaxpr(
        lambda flat: self.apply(treedef.unflatten(flat), zero_fills=fills),
        return_shape=True)(abstract)
    self._zero_fills.setdefault(signature(tree), [name for name, _ in fills])
    inputs = {v: i for i, v in enumerate(closed.jaxpr.invars)}
    carried = {o: inputs[v] for o, v in enumerate(closed.jaxpr.outvars)
               if isinstance(v, jex.core.Var) and v in inputs}
    return closed, out_shape, carried

  def _split_computed(self, tree: dict[str, Any]) -> tuple[Any, Any, dict[int, int], Any,
                                                            tuple[int, ...], str | None]:
    """(closed jaxpr, output shapes, carried, the jaxpr of the computed
    outputs alone, the inputs it reads, how the surgery removes data), traced
    once per signature: `plan` asks for its parts three times."""
    sig = signature(tree)
    if sig not in self._traced:
      closed, out_shape, carried = self._trace(tree)
      jaxpr = closed.jaxpr
      pruned, used = dce_jaxpr(jaxpr, [o not in carried for o in range(len(jaxpr.outvars))])
      needed = tuple(i for i, u in enumerate(used) if u)
      removes = removal(self.spec, pruned, len(jaxpr.invars), set(carried.values()) | set(needed))
      self._traced[sig] = closed, out_shape, carried, pruned, needed, removes
    return self._traced[sig]

  def groups(self, tree: dict[str, Any], whole: bool = False) -> list[Group]:
    """The computed outputs of this tree's signature (abstract is fine), in
    groups that read disjoint inputs (`dependency_groups`); `whole`: every
    output, the carried ones too (as read and written again: a fresh output)."""
    return self.computation(tree, whole).groups

  def computation(self, tree: dict[str, Any], whole: bool = False) -> Computation:
    """This tree's signature's computed outputs (every output, where
    `whole`) as a Computation, to compute a group at a time; one per
    signature, sharing this surgery's compilations."""
    abstract, _ = _abstract_leaves(tree)
    key = signature(tree), whole, tuple(repr(a.sharding) for a in abstract)
    with self._compiling:
      if key not in self._computations:
        closed, _, carried, pruned, needed, _ = self._split_computed(tree)
        jaxpr = closed.jaxpr
        if whole:
          parts = jaxpr, tuple(range(len(jaxpr.invars))), tuple(range(len(jaxpr.outvars)))
        else:
          parts = pruned, needed, tuple(o for o in range(len(jaxpr.outvars)) if o not in carried)
        self._computations[key] = Computation(
            *parts, closed.consts, abstract, self._group_functions, self._compiling)
      return self._computations[key]

  def removes(self, tree: dict[str, Any]) -> str | None:
    """How this surgery loses data of `tree` (abstract is fine), or None:
    `Route.removes` without compiling (for `plan`)."""
    return self._split_computed(tree)[-1]

  def _trace_route(self, tree: dict[str, Any]) -> Route:
    _, out_shape, carried, _, needed, removes = self._split_computed(tree)
    return Route(jax.tree_util.tree_structure(out_shape), carried, needed, removes)


# Ops that lose data by what they are (a drop of one piece of an unstacked
# leaf loses data the trace still sees read), and ops whose effect we cannot see.
_LOSSY_OPS = {'slice': 'slices arrays', 'drop': 'drops leaves', 'drop_optimizer': 'drops opt_state',
              'reset_optimizer': 'resets opt_state', 'reinit': 're-initialises leaves',
              'python': 'runs a python op (what it keeps is unproven)',
              'merge_lora': 'drops the adapters it merges'}
# Ops that may lose data, as `removal` finds: without any, a surgery keeps all of it.
_MAY_REMOVE = {*_LOSSY_OPS, 'cast'}


def may_remove(spec: Spec) -> bool:
  """Whether `removal` may find that this spec's surgery loses data (from
  its ops alone, before any checkpoint is read: for planning the work)."""
  return any(op.name in _MAY_REMOVE for op in spec.ops)


def removal(spec: Spec, computed: Any, inputs: int, read: set[int]) -> str | None:
  """How a surgery's output loses data of its input, or None if it provably
  keeps all of it: an input leaf that no output carries or reads (drop,
  reinit, reset_optimizer), a narrowing dtype conversion in `computed` (the
  jaxpr of the computed outputs), or an op that keeps part of what it reads.
  A writer that leaves the input's bytes behind in the output (copy-and-patch)
  must not be used for such a surgery."""
  lost = inputs - len(read)
  if lost:
    return f'drops {lost} input leaf(s)'
  for op in spec.ops:
    if op.name in _LOSSY_OPS:
      return f'{op.name}: {_LOSSY_OPS[op.name]}'
  narrowed = sorted({f'{a} -> {b}' for a, b in _conversions(computed)
                     if not jax.numpy.can_cast(a, b, casting='safe')})
  return f'narrows dtypes ({", ".join(narrowed)})' if narrowed else None


def _conversions(jaxpr: Any):
  """(from dtype, to dtype) of every element-type conversion in a jaxpr and
  the jaxprs inside it (a jitted python op's, a scan's)."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'convert_element_type':
      yield eqn.invars[0].aval.dtype, eqn.outvars[0].aval.dtype
    for param in eqn.params.values():
      for inner in param if isinstance(param, (tuple, list)) else (param,):
        inner = getattr(inner, 'jaxpr', inner)
        if hasattr(inner, 'eqns'):
          yield from _conversions(inner)
