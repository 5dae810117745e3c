"""Streaming: a checkpoint larger than the memory budget, migrated a pack at a time.

Where what the surgery computes, with what it reads, exceeds half of
`--memory_budget` (`pack_limit`), nothing is restored whole. The surgery's
dependency groups (`Surgery.groups`) are packed under that
(`transforms.pack`) and, for each pack in turn: its inputs are restored
onto the devices, its groups' compiled functions run (one compilation per
distinct group), its outputs checksummed, encoded and written into the
output's open tree (one OCDBT transaction per tree item), then released.
A group over that limit whose
computation `transforms.chunkwise` accepts (a cast, a scale, a pad with a
constant, or a leaf only carried) goes a slab of rows at a time through
TensorStore; any other fails the checkpoint, naming its leaves, their bytes
and the budget.

Leaves the surgery leaves untouched are carried as copy-and-patch carries
them (hard links, server-side copies), never read. Where copy-and-patch does
not apply (the surgery removes data, the output is on other storage, or
`--full_decode`), the output is a fresh tree and those leaves are read and
written again, a pack at a time like the rest.

The writer is copy-and-patch's (`protocol.PatchWriter`), which `Run` hands
each pack: nothing is visible at dst until every pack is in and the writer
commits, and its `verify` proves the output per stored key, without
decoding it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Callable, ContextManager, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

import transforms
from pipeline import checkpoint, release_freed_memory
from pipeline.checkpoint import StoredArray
from pipeline.compute import finite
from pipeline.write import copy_patch, protocol, writers

MIN_BUDGET = 64 << 20
FOOTPRINT = 1 << 30  # what a worker holds besides its checkpoints (JAX, Beam, TensorStore), about


class NotStreamed(Exception):
  """Why a checkpoint over the budget is migrated whole all the same."""


def default_budget(in_flight: int) -> int:
  """Bytes per checkpoint in flight: this machine's memory per core (a
  runner starts a worker process per core), less a worker's footprint,
  shared by its checkpoints in flight."""
  memory = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  try:  # a container's limit, where it has one
    limit = int(open('/sys/fs/cgroup/memory.max').read())
    memory = min(memory, limit)
  except (OSError, ValueError):
    pass
  return max(MIN_BUDGET, (memory // (os.cpu_count() or 1) - FOOTPRINT) // in_flight)


def pack_limit(budget: int) -> int:
  """The bytes of arrays (inputs and outputs) a pack may hold under `budget`:
  half of it. The other half is what restoring, placing, checksumming and
  encoding them holds beside them for a while, and the allocator's slack
  (measured on 0.9 GB of 16 MB leaves: packs of the whole budget peaked at
  1.4 to 1.7 times it over the worker's idle footprint, run to run)."""
  return budget // 2


def chunk_bytes(budget: int) -> int:
  """The chunks a streamed leaf is stored in: small enough that a slab of
  whole chunks, its input and its encoding fit the budget."""
  return min(64 << 20, max(1 << 10, budget // 8))


def too_large(path: str, group: transforms.Group, budget: int, why: str) -> transforms.SurgeryError:
  """The error of a group over the budget that cannot stream in slabs."""
  return transforms.SurgeryError(
      f'{path}: {group.nbytes} bytes (with the {len(group.inputs)} input leaf(s) it reads) '
      f'exceed the {pack_limit(budget)} a pack may hold under the memory budget of {budget} '
      f'bytes, and its computation cannot go a slab at a time ({why}); raise --memory_budget')


class PlacedInput(NamedTuple):
  """A checkpoint's state as the surgery sees it, from its metadata: the
  leaf metadata of the surgery's tree (`leaves`, by index, and `treedef`);
  the values beside it (`rest`, and the arrays among them); where each
  array is placed on this worker's devices (`place`, from its metadata);
  and the tree's abstract form, placed, where every leaf is an array (else
  None: a Python scalar among params or opt_state)."""
  leaves: list[Any]
  treedef: Any
  rest: Any
  rest_arrays: list[Any]
  place: Callable[[Any], jax.sharding.Sharding]
  abstract: Any
  formats: dict[str, Any]  # a tree's directory -> how it stores its arrays

  def stand_in(self) -> Callable[[Any], StoredArray]:
    """A leaf's StoredArray, from its metadata, placed."""
    return checkpoint.stand_ins(self.place, self.formats)


def placed_input(layout: checkpoint.Layout, meta: dict[str, Any],
                 surgery: transforms.Surgery) -> PlacedInput:
  """The PlacedInput of a checkpoint of `layout` whose items' metadata is `meta`."""
  tree_meta, rest_meta = surgery.split(layout.join(checkpoint.trees(meta)))
  leaves, treedef = jax.tree_util.tree_flatten(tree_meta)
  rest_arrays = [m for m in jax.tree_util.tree_leaves(rest_meta) if checkpoint.is_array(m)]
  devices = jax.local_devices()
  place = lambda m: transforms.placement(m.shape, m.dtype, devices)
  abstract = (treedef.unflatten([jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=place(m))
                                 for m in leaves])
              if all(checkpoint.is_array(x) for x in leaves) else None)
  return PlacedInput(leaves, treedef, rest_meta, rest_arrays, place, abstract,
                     checkpoint.stored_formats(meta))


class _Slot:
  """Stands for output leaf `index` while the output's tree is laid out."""

  def __init__(self, index: int):
    self.index = index


@dataclasses.dataclass
class Streamed:
  """One checkpoint's streamed migration, laid out from its metadata."""
  leaves: list[Any]              # the surgery's input leaves' metadata, by index
  abstract: Any                  # the surgery's input tree, abstract, placed
  computation: transforms.Computation  # what is computed, by dependency group
  fresh: str | None              # why the output is a fresh tree, every output leaf written
                                 # again; None: copy-and-patch, only computed leaves written
  packs: list[transforms.Pack]
  outputs: list[Any]             # every output leaf's abstract form, placed
  where: dict[int, tuple[str, str]]  # output leaf index -> (item, param name)
  patches: list[copy_patch.TreePatch]
  known: dict[str, dict[str, Any]]  # item -> {param name: value}, of the values known from the
                                    # start (beside the surgery's tree, in a fresh tree)
  carried: dict[str, Any]        # leaf path -> StoredArray, of the leaves copied as stored
  rest_placeholders: Any         # the values beside the surgery's tree, none to restore
  signature: str
  budget: int
  bytes_out: int                 # the output's array bytes

  @property
  def fresh_tree(self) -> bool:
    return self.fresh is not None


def prepare(src: epath.Path, dst: epath.Path, layout: checkpoint.Layout, meta: dict[str, Any],
         surgery: transforms.Surgery, budget: int, full_decode: bool,
         allowed: tuple[str, ...] = writers.WRITERS) -> Streamed | None:
  """The streamed migration of `src` to `dst`, or None where what the
  unbounded path would hold (what the surgery computes and reads; every
  leaf with --full_decode) fits what a pack may (`pack_limit`) under
  `budget`; NotStreamed where it does not fit and cannot stream (by the
  `allowed` writers)."""
  placed = placed_input(layout, meta, surgery)
  leaves, treedef, rest_meta, rest_arrays, place, abstract, _ = placed
  limit = pack_limit(budget)
  if abstract is None:
    if transforms.tree_bytes(leaves) + transforms.tree_bytes(rest_arrays) <= limit:
      return None
    raise NotStreamed('a Python scalar among params or opt_state')
  route, sig = surgery.route(abstract)
  _, out_shape, _ = surgery.trace(abstract)
  outputs = [jax.ShapeDtypeStruct(o.shape, o.dtype, sharding=place(o))
             for o in jax.tree_util.tree_leaves(out_shape)]
  everything = full_decode or not route.carried  # the unbounded path restores every leaf
  held = sum(g.nbytes for g in surgery.groups(abstract, everything))
  if held + everything * transforms.tree_bytes(rest_arrays) <= limit:
    return None
  stand_in = placed.stand_in()

  def lay_out(fresh: str | None) -> Streamed:
    """The streamed migration writing a fresh tree (`fresh` says why) or patching a copy."""
    if fresh and transforms.tree_bytes(rest_arrays) > limit:
      raise NotStreamed(f'the arrays beside the params and optimizer state hold '
                        f'{transforms.tree_bytes(rest_arrays)} bytes, over the budget')
    # The values beside the surgery's tree: small ones restored now; arrays
    # carried as stored, or (a fresh tree) restored now too.
    like = surgery.join(treedef.unflatten([ocp.PLACEHOLDER] * len(leaves)), jax.tree_util.tree_map(
        lambda m: m if fresh or not checkpoint.is_array(m) else ocp.PLACEHOLDER, rest_meta))
    _, items = checkpoint.restore(src, like=layout.split(like, {}))
    _, rest = surgery.split(layout.join(items))
    rest = jax.tree_util.tree_map(lambda x, m: stand_in(m) if x is ocp.PLACEHOLDER else x,
                                  rest, rest_meta)
    slots = route.out_treedef.unflatten([_Slot(o) for o in range(len(outputs))])
    where = {x.index: (item, checkpoint.param_name(keys))
             for item, tree in layout.split(surgery.join(slots, rest), {}).items()
             if item in layout.trees
             for keys, x in jax.tree_util.tree_flatten_with_path(tree)[0] if isinstance(x, _Slot)}
    carried_in = {} if fresh else route.carried
    state = surgery.join(route.out_treedef.unflatten(
        [stand_in(leaves[carried_in[o]]) if o in carried_in else outputs[o]
         for o in range(len(outputs))]), rest)
    patches, values = copy_patch.make_patches(src, dst, layout, layout.split(state, {}),
                                            route.removes, fresh=bool(fresh),
                                            chunk_bytes=chunk_bytes(budget))
    known = {item: {n: x for n, x in named.items() if not isinstance(x, jax.ShapeDtypeStruct)}
             for item, named in values.items()}
    carried = {transforms.key_path(k): x for k, x in jax.tree_util.tree_flatten_with_path(state)[0]
               if isinstance(x, StoredArray)}
    computation = surgery.computation(abstract, bool(fresh))
    return Streamed(leaves, abstract, computation, fresh, transforms.pack(computation.groups, limit),
                    outputs, where, patches, known, carried,
                    jax.tree_util.tree_map(lambda _: ocp.PLACEHOLDER, rest_meta),
                    transforms.signature_id(sig), budget, transforms.tree_bytes(state))

  choice = writers.choose(src, layout, route.removes, carried=bool(route.carried),
                          full_decode=full_decode, dst=dst, writers=allowed, streamed=True)
  if choice.writer == 'orbax_save':
    raise NotStreamed(choice.why_not_patched)
  return lay_out(choice.why_not_patched if choice.writer == 'fresh' else None)


class Run:
  """Runs a Streamed migration: restores, computes and writes each pack, keeping
  each written leaf's fingerprint (`prints`, by leaf path) and counting the
  compilations it made. Each write at the output happens inside a
  `writing()` section (the attempt's deadline: one given up writes no more)."""

  def __init__(self, src: epath.Path, layout: checkpoint.Layout, streamed: Streamed,
               surgery: transforms.Surgery, allow_nonfinite: bool,
               writing: Callable[[], ContextManager[Any]] = contextlib.nullcontext):
    self.src, self.layout, self.streamed, self.surgery = src, layout, streamed, surgery
    self.allow_nonfinite, self.writing = allow_nonfinite, writing
    self.prints: dict[str, transforms.Fingerprint] = {}
    self.compilations = 0
    # (item, param name) -> leaf path, of every leaf written as computed
    self.paths = {(p.item, n): path for p in streamed.patches for n, path in p.paths.items()}

  def write(self, writer: protocol.Writer,
            on_pack: Callable[[int, int], None] = lambda i, n: None) -> None:
    """Every pack to `writer` (begun): first the values known from the start (those
    beside the surgery's tree, in a fresh tree), then each pack's outputs.
    `on_pack(i, n)` is told as pack i of n begins."""
    streamed = self.streamed
    self._write({item: dict(arrays) for item, arrays in streamed.known.items() if arrays}, writer)
    streamed.known.clear()  # written: not held through the packs
    for i, pack in enumerate(streamed.packs):
      on_pack(i, len(streamed.packs))
      if pack.over:
        self._write_slabs(pack.groups[0], writer)
      else:
        self._write(self._compute(pack), writer)
      release_freed_memory()

  def _write(self, arrays: dict[str, dict[str, Any]], writer: protocol.Writer) -> None:
    """Bring `arrays` ({item: {name: array}}) to the host, fingerprint them,
    refuse non-finite ones unless allowed, and write them. The device arrays
    go as they are brought over: a host copy kept in a jax.Array's cache
    would keep it alive past its pack."""
    for item, named in arrays.items():
      for name in named:
        named[name] = np.asarray(named[name])
        if (item, name) in self.paths:
          self._check(self.paths[item, name], transforms.fingerprint(named[name]))
    with self.writing():
      writer.write_pack(arrays)

  def _check(self, path: str, fingerprint: transforms.Fingerprint) -> None:
    finite.refuse_nonfinite({path: fingerprint}, self.allow_nonfinite)
    self.prints[path] = fingerprint

  def _compute(self, pack: transforms.Pack) -> dict[str, dict[str, Any]]:
    """The pack's outputs, by item and name: its inputs restored together,
    each group's function run on them."""
    streamed, out = self.streamed, {}
    functions = []
    for group in pack.groups:
      shardings = [streamed.outputs[o].sharding for o in group.outputs]
      function, reads, fresh = streamed.computation.function(group, shardings)
      functions.append((group, function, reads))
      self.compilations += fresh
    restored = self._restore({i for _, _, reads in functions for i in reads})
    for group, function, reads in functions:
      results = function(*[restored.pop(i) for i in reads])  # donated: the inputs go
      for o, x in zip(group.outputs, results):
        item, name = streamed.where[o]
        out.setdefault(item, {})[name] = x
    return out

  def _restore(self, indices: set[int]) -> dict[int, jax.Array]:
    """The surgery's input leaves at `indices`, restored and placed."""
    streamed, surgery = self.streamed, self.surgery
    treedef = jax.tree_util.tree_structure(streamed.abstract)
    like = surgery.join(
        treedef.unflatten([m if i in indices else ocp.PLACEHOLDER
                           for i, m in enumerate(streamed.leaves)]),
        streamed.rest_placeholders)
    _, items = checkpoint.restore(self.src, like=self.layout.split(like, {}))
    tree, _ = surgery.split(self.layout.join(items))
    restored = treedef.flatten_up_to(tree)
    return {i: restored[i] for i in indices}

  def _slab_rows(self, group: transforms.Group, path: str) -> int:
    """How many leading rows of `group`'s one output go at once: whole
    chunks of it, with their input and encoding within the budget; a
    SurgeryError naming the leaf where it cannot go a slab at a time."""
    streamed, budget = self.streamed, self.streamed.budget
    try:
      if len(group.inputs) != 1 or len(group.outputs) != 1:
        raise transforms.SurgeryError('not one array read and one written')
      if why := streamed.computation.why_not_slabs(group):
        raise transforms.SurgeryError(why)
      out, source = streamed.outputs[group.outputs[0]], streamed.leaves[group.inputs[0]]
      item, name = streamed.where[group.outputs[0]]
      patch = next(p for p in streamed.patches if p.item == item)
      chunk_rows = next(a.chunk_shape for a in patch.arrays if a.param_name == name)[0]
      row_bytes = (transforms.tree_bytes(source) + 2 * transforms.tree_bytes(out)) // out.shape[0]
      if chunk_rows * row_bytes > pack_limit(budget):
        raise transforms.SurgeryError(f'{chunk_rows} row(s), one chunk deep, hold '
                                      f'{chunk_rows * row_bytes} bytes')
    except transforms.SurgeryError as e:
      raise too_large(path, group, budget, str(e)) from None
    return min(out.shape[0], pack_limit(budget) // row_bytes // chunk_rows * chunk_rows)

  def _write_slabs(self, group: transforms.Group, writer: protocol.Writer) -> None:
    """One leaf over the budget, a slab of its leading rows at a time."""
    streamed = self.streamed
    item, name = streamed.where[group.outputs[0]]
    path = self.paths.get((item, name), name)
    rows = self._slab_rows(group, path)
    size = streamed.outputs[group.outputs[0]].shape[0]
    source = streamed.leaves[group.inputs[0]]
    directory = epath.Path(source.directory)
    stored = checkpoint.open_stored(directory, source.name,
                                       *checkpoint.stored_format(directory))
    running = transforms.Fingerprinter()
    for start in range(0, size, rows):
      stop = min(size, start + rows)
      function, fresh = streamed.computation.slab_function(group, stop - start)
      self.compilations += fresh
      slab = np.asarray(function(stored[start:stop].read().result()))
      running.update(slab)
      with self.writing():
        writer.write_pack({item: {name: copy_patch.Slab(slab, start)}})
    self._check(path, running.result())
