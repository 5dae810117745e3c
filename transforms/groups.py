"""Dependency groups: a surgery's computation split into parts that read disjoint inputs.

The traced surgery says which inputs each computed output reads. Its
dataflow's connected components are groups: restored, computed and written
on their own, they give what the whole surgery gives, so a checkpoint of any
size can be migrated a few groups at a time (`packs`, `pipeline.compute.stream`).
A `Computation` is one signature's computed outputs so split, each group's
part compiled once per distinct computation: a model's layers share one.
"""
from __future__ import annotations

import math
import threading
import warnings
from typing import Any, NamedTuple

import jax
import jax.extend as jex
import numpy as np
# Dead-code elimination of a traced jaxpr: a group's part of the computation.
from jax._src.interpreters.partial_eval import dce_jaxpr

from transforms import chunkwise
from transforms.ops import SurgeryError


def tree_bytes(tree: Any) -> int:
  """Bytes of every array leaf (shape x itemsize): arrays, abstract arrays or
  Orbax's array metadata alike."""
  return sum(math.prod(x.shape) * x.dtype.itemsize
             for x in jax.tree_util.tree_leaves(tree)
             if hasattr(x, 'shape') and hasattr(x, 'dtype'))


class Group(NamedTuple):
  """Computed outputs and the inputs they read, which no other group reads:
  restored, computed and written on their own, they give what the whole
  surgery gives."""
  outputs: tuple[int, ...]  # output leaf indices
  inputs: tuple[int, ...]   # input leaf indices
  nbytes: int               # the inputs' bytes and the outputs'


def dependency_groups(jaxpr: Any, inputs: tuple[int, ...], outputs: tuple[int, ...]) -> list[Group]:
  """The connected components of `jaxpr`'s dataflow: an equation joins all
  it reads and makes (one with a jaxpr inside, as a python op's, joins all
  of it: never finer than what is proven). `inputs` and `outputs` give the
  leaf index of each of its invars and outvars, in order."""
  parent: dict[Any, Any] = {}

  def root(v):
    parent.setdefault(v, v)
    while parent[v] is not v:
      parent[v] = parent[parent[v]]
      v = parent[v]
    return v

  for eqn in jaxpr.eqns:
    joined = [v for v in (*eqn.invars, *eqn.outvars) if isinstance(v, jex.core.Var)]
    for v in joined[1:]:
      parent[root(v)] = root(joined[0])
  members: dict[Any, tuple[list[int], list[int], list[Any]]] = {}
  for leaf, v in zip(inputs, jaxpr.invars):
    ins, _, avals = members.setdefault(root(v), ([], [], []))
    ins.append(leaf)
    avals.append(v.aval)
  for leaf, v in zip(outputs, jaxpr.outvars):  # a literal output reads nothing: a group alone
    _, outs, avals = members.setdefault(root(v) if isinstance(v, jex.core.Var) else (leaf,),
                                        ([], [], []))
    outs.append(leaf)
    avals.append(v.aval)
  return [Group(tuple(outs), tuple(ins), tree_bytes(avals))
          for ins, outs, avals in members.values() if outs]


_MESHES = (jax.sharding.Mesh, jax.sharding.AbstractMesh)  # callable (as contexts), and printed


def _opaque(jaxpr: Any) -> bool:
  """Whether a jaxpr's text leaves out some of what it computes: an inner
  closed jaxpr's constants, or a function (a custom derivative rule, a
  callback). Inner jaxprs are printed whole."""
  for eqn in jaxpr.eqns:
    for param in eqn.params.values():
      for inner in param if isinstance(param, (tuple, list)) else (param,):
        if getattr(inner, 'consts', None) or (callable(inner) and not isinstance(inner, _MESHES)):
          return True
        inner = getattr(inner, 'jaxpr', inner)
        if hasattr(inner, 'eqns') and _opaque(inner):
          return True
  return False


class Computation:
  """One signature's computed outputs (a jaxpr of the surgery's input
  leaves), split into dependency groups, each group's part compiled on
  demand. Compilations go into `compiled`, shared by every Computation of
  one surgery (under `lock`): a group's part is compiled once per distinct
  computation and placement, whichever group or checkpoint has it."""

  def __init__(self, jaxpr: Any, inputs: tuple[int, ...], outputs: tuple[int, ...],
               consts: list[Any], abstract: list[jax.ShapeDtypeStruct], compiled: dict[Any, Any],
               lock: threading.Lock):
    self.jaxpr, self.inputs, self.outputs, self.consts = jaxpr, inputs, outputs, consts
    self.abstract = abstract  # every input leaf, placed
    self.groups = dependency_groups(jaxpr, inputs, outputs)
    self._compiled, self._lock = compiled, lock
    self._parts: dict[tuple[int, ...], tuple[Any, list[Any], tuple[int, ...], Any]] = {}

  def _part(self, group: Group) -> tuple[Any, list[Any], tuple[int, ...], Any]:
    """(the jaxpr of `group`'s outputs alone, taking the constants it uses
    and then its inputs; those constants; the input leaf indices it reads;
    what identifies its computation for sharing a compilation: its text,
    where that says all it does, else the group)."""
    if group.outputs not in self._parts:
      wanted = set(group.outputs)
      jaxpr, used = dce_jaxpr(self.jaxpr, [o in wanted for o in self.outputs])
      reads = tuple(i for i, u in zip(self.inputs, used) if u)
      read = {v for v in (*(v for eqn in jaxpr.eqns for v in eqn.invars), *jaxpr.outvars)
              if isinstance(v, jex.core.Var)}
      consts = [(v, c) for v, c in zip(jaxpr.constvars, self.consts) if v in read]
      jaxpr = jaxpr.replace(constvars=[], invars=[*(v for v, _ in consts), *jaxpr.invars])
      key = (id(self), group.outputs) if _opaque(jaxpr) else str(jaxpr)
      self._parts[group.outputs] = jaxpr, [c for _, c in consts], reads, key
    return self._parts[group.outputs]

  def function(self, group: Group, out_shardings: list[Any]) -> tuple[Any, tuple[int, ...], bool]:
    """(f(*inputs) -> `group`'s outputs, placed on `out_shardings`; the
    input leaf indices it reads, in order; whether it was compiled now).
    Its inputs are donated."""
    jaxpr, consts, reads, name = self._part(group)
    args = [jax.ShapeDtypeStruct(np.shape(c), np.result_type(c)) for c in consts] + [
        self.abstract[i] for i in reads]
    key = (name, tuple((a.shape, str(a.dtype), repr(a.sharding)) for a in args),
           tuple(map(repr, out_shardings)))
    with self._lock:
      fresh = key not in self._compiled
      if fresh:
        as_fun = jex.core.jaxpr_as_fun(jex.core.ClosedJaxpr(jaxpr, []))
        with warnings.catch_warnings():
          warnings.filterwarnings('ignore', 'Some donated buffers were not usable')
          self._compiled[key] = jax.jit(
              lambda *xs: tuple(as_fun(*xs)), out_shardings=tuple(out_shardings),
              donate_argnums=tuple(range(len(consts), len(args)))).lower(*args).compile()
    compiled = self._compiled[key]
    return (lambda *inputs: compiled(*consts, *inputs)), reads, fresh

  def why_not_slabs(self, group: Group) -> str | None:
    """None where `group` can be computed a slab of rows at a time
    (`chunkwise`); else why not. Nothing is compiled."""
    return chunkwise.why_not(self._part(group)[0])

  def slab_function(self, group: Group, rows: int) -> tuple[Any, bool]:
    """(f(slab) -> the output's slab, for slabs of `rows` leading rows of
    `group`'s one input; whether it was compiled now), where `chunkwise`
    accepts the group's computation; else SurgeryError saying why not.
    Compiled once per computation and slab shape."""
    if why := self.why_not_slabs(group):
      raise SurgeryError(why)
    jaxpr, consts, _, name = self._part(group)
    x = jaxpr.invars[-1].aval
    key = ('slab', name, rows)
    with self._lock:
      fresh = key not in self._compiled
      if fresh:
        self._compiled[key] = jax.jit(chunkwise.on_slab(jaxpr, rows)).lower(
            *consts, jax.ShapeDtypeStruct((rows, *x.shape[1:]), x.dtype)).compile()
    compiled = self._compiled[key]
    return (lambda s: compiled(*consts, s)), fresh
