"""Merge one group: K checkpoints into one output, a pack of leaves at a time.

A merge's output is its newest input, patched (copy-and-patch): each leaf
the merge averages (the float leaves of params and of the collections
beside them; of the optimizer state too with `opt_state: mean`) is computed
and written; every other leaf is the newest input's, carried as stored (its
optimizer state with `opt_state: latest`; integer leaves such as step
counters). Where copy-and-patch does not apply (the output on another
storage than the newest input; `opt_state: drop`, which removes data) the
output is a fresh tree, and the newest input's own leaves are read and
written again too.

Nothing is held whole, and what is held does not grow with the number of
inputs. Computed leaves are packed under half the memory budget
(`stream.pack_limit`), each counted with its float32 (or float64) sum, one
input's piece and the result (`held_bytes`). For each pack in turn, the
inputs' pieces are restored an input at a time (oldest first) and added to
the sums (`transforms.merge.Running`: the documented order, so the bits are
reproducible); the results are fingerprinted, refused where not finite,
and written. A leaf over a pack goes a slab of rows at a time (whole output
chunks), its rows read from each input in turn through TensorStore.

Before any array is read, every input must have the newest input's leaves,
shapes and dtypes in the part merged (`transforms.merge.check_same_tree`),
else the group fails naming the input and the leaf. The output's provenance
lists every input with its step, weight and identity; a rerun whose inputs,
weights and spec are unchanged finds it done (`migrate.attempt_at`). Each
input's entry also digests the fingerprints of what was read of it
(`read_digest`, as `transforms.digest` makes a tree's): the values merged,
not only the files' listing.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

import transforms
from transforms import merge as merging
from pipeline import checkpoint, release_freed_memory
from pipeline.checkpoint import StoredArray, discovery, identity
from pipeline.checkpoint.merge_groups import MergeGroup
from pipeline.compute import finite, stream
from pipeline.compute.deadline import Deadline
from pipeline.compute.worker import WORKER
from pipeline.migrate import (Settings, attempt_at, commit_verified, output_fields,
                             output_provenance, pack_progress, retried, write_migration)
from pipeline.verify import verification
from pipeline.storage import files
from pipeline.write import copy_patch, outputs, protocol, writers

MSGPACK = 'a Flax msgpack file, read only whole: a merge reads Orbax checkpoints, a pack at a time'
DROPS = 'drops the optimizer state (merge: opt_state: drop)'  # `Route.removes`, said of a merge


def merged_part(surgery: transforms.Surgery, merge: merging.Merge, state: Any) -> dict[str, Any]:
  """The part of a state a merge combines: what the surgery changes (params,
  their collections), the optimizer state only where it is merged too."""
  tree, _ = surgery.split(state)
  return {k: v for k, v in tree.items() if k != surgery.spec.opt_state or merge.opt_state == 'mean'}


class Input(NamedTuple):
  """One input of a merge, from its metadata."""
  src: epath.Path
  layout: checkpoint.Layout
  meta: dict[str, Any]      # item -> Orbax's tree metadata (`checkpoint.item_metadata`)
  leaves: dict[str, Any]    # leaf path in the state -> its metadata

  @property
  def state(self) -> Any:
    return self.layout.join(checkpoint.trees(self.meta))


def read_input(src: str) -> Input:
  path = epath.Path(src)
  layout = checkpoint.read_layout(path)
  if layout.msgpack:
    raise merging.MergeError(f'{src}: {MSGPACK}')
  meta = checkpoint.item_metadata(path, layout)
  return Input(path, layout, meta, transforms.leaf_paths(layout.join(checkpoint.trees(meta))))


def marked(state: Any) -> Any:
  """`state` with each leaf replaced by its leaf path."""
  return jax.tree_util.tree_map_with_path(lambda keys, _: transforms.key_path(keys), state)


def merged_leaves(surgery: transforms.Surgery, merge: merging.Merge, state: Any) -> dict[str, Any]:
  """{leaf path: metadata} of the arrays of `state` (leaf metadata) the merge reads."""
  leaves = transforms.leaf_paths(state)
  paths = jax.tree_util.tree_leaves(merged_part(surgery, merge, marked(state)))
  return {p: leaves[p] for p in paths if checkpoint.is_array(leaves[p])}


def check_inputs(inputs: list[Input], surgery: transforms.Surgery,
                 merge: merging.Merge) -> set[str]:
  """The paths of the leaves averaged (floats of the merged part), once
  every input is proven to hold the newest's tree there; MergeError naming
  the input and leaf where one does not."""
  newest = inputs[-1]
  for other in inputs[:-1]:
    if other.layout.trees != newest.layout.trees:
      raise merging.MergeError(f'{other.src}: its tree items {other.layout.trees} are not '
                               f'{newest.src}\'s {newest.layout.trees}')
  trees = [(str(i.src), {p: merging.Leaf(tuple(m.shape), np.dtype(m.dtype))
                         for p, m in merged_leaves(surgery, merge, i.state).items()})
           for i in inputs]
  merging.check_same_tree(trees)
  return {p for p, leaf in trees[-1][1].items() if merging.is_averaged(leaf.dtype)}


class Computed(NamedTuple):
  """One output leaf the merge writes: from each input's piece (averaged),
  or the newest's alone (a fresh tree's own leaves)."""
  item: str
  name: str                 # Orbax's param name in the item
  path: str                 # its leaf path (the key of its fingerprint)
  sources: tuple[Any, ...]  # the inputs' leaf metadata, oldest first
  first: int                # the index of the input of sources[0]
  weights: np.ndarray

  @property
  def nbytes(self) -> int:
    out = self.sources[-1]
    return held_bytes(out.shape, out.dtype)


def held_bytes(shape: tuple[int, ...], dtype: Any) -> int:
  """What merging a leaf holds at once, however many inputs it has: the sum
  (float32 or float64), one input's piece, and at the end the result."""
  dtype = np.dtype(dtype)
  return int(np.prod(shape)) * (2 * dtype.itemsize + merging.accumulating(dtype).itemsize)


class MergeLayout(NamedTuple):
  """A group's merge laid out from its inputs' metadata."""
  patches: list[copy_patch.TreePatch]
  known: dict[str, dict[str, Any]]  # item -> {param name: value written from the start}
  computed: list[Computed]
  carried: dict[str, StoredArray]   # leaf path -> the newest's leaf, copied as stored
  fresh: str | None                 # why a fresh tree (None: copy-and-patch)
  bytes_out: int


def _output_state(newest: Input, surgery: transforms.Surgery, averaged: set[str],
                  fresh: bool) -> Any:
  """The output's state: an averaged leaf (every leaf, in a fresh tree) as
  its abstract form, to be computed; another array as the newest's stored
  leaf; a number saved as a scalar as the newest holds it."""
  like = {item: jax.tree_util.tree_map(
      lambda m: ocp.PLACEHOLDER if checkpoint.is_array(m) else m, tree)
      for item, tree in checkpoint.trees(newest.meta).items()}
  _, items = checkpoint.restore(newest.src, like=like)
  placed = stream.placed_input(newest.layout, newest.meta, surgery)
  stand_in = placed.stand_in()

  def leaf(keys, m, value):
    if not checkpoint.is_array(m):
      return value
    if fresh or transforms.key_path(keys) in averaged:
      return jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=placed.place(m))
    return stand_in(m)
  state = jax.tree_util.tree_map_with_path(leaf, newest.state, newest.layout.join(items))
  if surgery.spec.merge.opt_state == 'drop':
    tree, rest = surgery.split(state)
    state = surgery.join({k: v for k, v in tree.items() if k != surgery.spec.opt_state}, rest)
  return state


def lay_out(inputs: list[Input], dst: epath.Path, group: MergeGroup, surgery: transforms.Surgery,
            averaged: set[str], budget: int, allowed: tuple[str, ...]) -> MergeLayout:
  """The merge of `inputs` at dst: copy-and-patch of the newest input where
  it applies, else a fresh tree; CheckpointError where neither does."""
  newest = inputs[-1]
  drop = surgery.spec.merge.opt_state == 'drop'
  choice = writers.choose(newest.src, newest.layout, DROPS if drop else None,
                          carried=True, dst=dst, writers=allowed, streamed=True)
  fresh = choice.why_not_patched if choice.writer == 'fresh' else None
  if choice.writer == 'patch':
    try:
      return _lay_out(inputs, dst, group, surgery, averaged, budget, None)
    except copy_patch.NotPatchable as e:  # a format only the patches themselves check
      if 'fresh' not in allowed:
        raise
      fresh = str(e)
  if fresh is None:
    raise checkpoint.CheckpointError(
        f'{newest.src}: a merge is written by copy-and-patch or as a fresh tree, and neither '
        f'applies: {choice.why_not_patched}')
  return _lay_out(inputs, dst, group, surgery, averaged, budget, fresh)


def _lay_out(inputs: list[Input], dst: epath.Path, group: MergeGroup,
             surgery: transforms.Surgery, averaged: set[str], budget: int,
             fresh: str | None) -> MergeLayout:
  newest = inputs[-1]
  state = _output_state(newest, surgery, averaged, fresh is not None)
  removes = DROPS if surgery.spec.merge.opt_state == 'drop' else None
  patches, values = copy_patch.make_patches(
      newest.src, dst, newest.layout, newest.layout.split(state, {}), removes,
      fresh=fresh is not None, chunk_bytes=chunk_bytes(budget))
  paths = {(item, checkpoint.param_name(keys)): path
           for item, tree in newest.layout.split(marked(state), {}).items()
           if item in newest.layout.trees
           for keys, path in jax.tree_util.tree_flatten_with_path(tree)[0]}
  weights = np.asarray(group.weights, np.float64)
  computed = []
  for item, named in values.items():
    for name, value in named.items():
      if isinstance(value, jax.ShapeDtypeStruct):
        path = paths[item, name]
        merged = path in averaged
        computed.append(Computed(
            item, name, path, tuple(i.leaves[path] for i in (inputs if merged else inputs[-1:])),
            0 if merged else len(inputs) - 1, weights if merged else np.ones(1)))
  known = {item: {n: x for n, x in named.items() if not isinstance(x, jax.ShapeDtypeStruct)}
           for item, named in values.items()}
  carried = {transforms.key_path(k): x for k, x in jax.tree_util.tree_flatten_with_path(state)[0]
             if isinstance(x, StoredArray)}
  return MergeLayout(patches, known, computed, carried, fresh, transforms.tree_bytes(state))


def chunk_bytes(budget: int) -> int:
  """The chunks a merged leaf is stored in: small enough that a slab of two
  of them fits a pack with what merging it holds, a piece and a sum up to
  twice as wide (bfloat16 summed in float32) per output byte."""
  return min(stream.chunk_bytes(budget), max(1 << 10, stream.pack_limit(budget) // 8))


def packs(computed: list[Computed], limit: int) -> list[list[Computed]]:
  """The computed leaves in packs of at most `limit` bytes held (in order);
  a leaf over it alone, to go in slabs."""
  out, held = [], limit + 1
  for leaf in computed:
    if leaf.nbytes + held > limit:
      out.append([])
      held = 0
    out[-1].append(leaf)
    held += leaf.nbytes
  return out


class MergeRun:
  """Computes and writes a laid-out merge, pack by pack, keeping each
  written leaf's fingerprint (`prints`, by leaf path) and each input's
  leaves' as read (`read`, by input, then leaf path: what the output's
  provenance digests)."""

  def __init__(self, inputs: list[Input], laid: MergeLayout, budget: int, allow_nonfinite: bool,
               writing: Callable[[], Any]):
    self.inputs, self.laid, self.budget = inputs, laid, budget
    self.allow_nonfinite, self.writing = allow_nonfinite, writing
    self.prints: dict[str, transforms.Fingerprint] = {}
    self.read: list[dict[str, transforms.Fingerprint]] = [{} for _ in inputs]

  def write(self, writer: protocol.Writer, on_pack: Callable[[int, int], None]) -> int:
    """Every value to `writer` (begun); the number of packs."""
    with self.writing():
      writer.write_pack({item: dict(v) for item, v in self.laid.known.items() if v})
    limit = stream.pack_limit(self.budget)
    planned = packs(self.laid.computed, limit)
    for i, pack in enumerate(planned):
      on_pack(i, len(planned))
      if pack[0].nbytes > limit:
        self._write_slabs(pack[0], writer, limit)
      else:
        self._write(self._combine(pack), writer)
      release_freed_memory()
    return len(planned)

  def _check(self, leaf: Computed, fingerprint: transforms.Fingerprint) -> None:
    finite.refuse_nonfinite({leaf.path: fingerprint}, self.allow_nonfinite)
    self.prints[leaf.path] = fingerprint

  def _write(self, arrays: dict[str, dict[str, np.ndarray]], writer: protocol.Writer) -> None:
    with self.writing():
      writer.write_pack(arrays)

  def _combine(self, pack: list[Computed]) -> dict[str, dict[str, np.ndarray]]:
    """Each leaf of the pack, read an input at a time (one restore each) into its sum."""
    running = {(c.item, c.name): merging.Running(c.weights) for c in pack}
    for index, source in enumerate(self.inputs):
      if wanted := {(c.item, c.name): c.path for c in pack if c.first <= index}:
        self._add(source, wanted, running, self.read[index])
    out: dict[str, dict[str, np.ndarray]] = {}
    for leaf in pack:
      value = running.pop((leaf.item, leaf.name)).result()
      self._check(leaf, transforms.fingerprint(value))
      out.setdefault(leaf.item, {})[leaf.name] = value
    return out

  @staticmethod
  def _add(source: Input, wanted: dict[tuple[str, str], str],
           running: dict[tuple[str, str], merging.Running],
           read: dict[str, transforms.Fingerprint]) -> None:
    """Add the `wanted` leaves ((item, name) -> leaf path) of one input to
    their sums, fingerprinting each as read; its pieces go on return."""
    like = {item: jax.tree_util.tree_map_with_path(
        lambda keys, m, item=item: m if (item, checkpoint.param_name(keys)) in wanted
        else ocp.PLACEHOLDER, tree) for item, tree in checkpoint.trees(source.meta).items()}
    _, items = checkpoint.restore(source.src, like=like)
    for item, tree in items.items():
      for keys, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if (key := (item, checkpoint.param_name(keys))) in wanted:
          piece = np.asarray(x)
          read[wanted[key]] = transforms.fingerprint(piece)
          running[key].add(piece)

  def _write_slabs(self, leaf: Computed, writer: protocol.Writer, limit: int) -> None:
    """One leaf over a pack, a slab of whole chunks of its leading rows at a time."""
    shape = tuple(leaf.sources[-1].shape)
    patch = next(p for p in self.laid.patches if p.item == leaf.item)
    chunk_rows = next(a.chunk_shape for a in patch.arrays if a.param_name == leaf.name)[0]
    row_bytes = leaf.nbytes // max(1, shape[0] if shape else 1)
    if not shape or chunk_rows * row_bytes > limit:
      raise transforms.SurgeryError(
          f'{leaf.path}: {leaf.nbytes} bytes (its {len(leaf.sources)} input piece(s), their sum '
          f'and the result) exceed the {limit} a pack may hold under the memory budget of '
          f'{self.budget} bytes, and one chunk of its rows does too; raise --memory_budget')
    rows = min(shape[0], limit // row_bytes // chunk_rows * chunk_rows)
    stores = []
    for m, source in zip(leaf.sources, self.inputs[leaf.first:]):
      stored = checkpoint.stored_formats(source.meta)[str(m.directory)]
      stores.append(checkpoint.open_stored(epath.Path(m.directory), m.name, *stored))
    printing, reading = transforms.Fingerprinter(), [transforms.Fingerprinter() for _ in stores]
    for start in range(0, shape[0], rows):
      stop = min(shape[0], start + rows)
      running = merging.Running(leaf.weights)
      for store, read in zip(stores, reading):  # an input at a time: the sum and one piece held
        piece = store[start:stop].read().result()
        read.update(piece)
        running.add(piece)
      slab = running.result()
      del running, piece
      printing.update(slab)
      self._write({leaf.item: {leaf.name: copy_patch.Slab(slab, start)}}, writer)
    self._check(leaf, printing.result())
    for index, read in enumerate(reading, leaf.first):
      self.read[index][leaf.path] = read.result()


def group_identity(group: MergeGroup, seen: dict[str, str]) -> str:
  """What a group's inputs are now, and its weights, as one digest; each
  input's identity left in `seen`."""
  seen.update({src: identity.identity(epath.Path(src)) for src in group.inputs})
  text = json.dumps({'inputs': [[src, seen[src]] for src in group.inputs],
                     'weights': list(group.weights)})
  return hashlib.sha256(text.encode()).hexdigest()[:32]


def _write(group: MergeGroup, dst: epath.Path, target: epath.Path, surgery: transforms.Surgery,
           settings: Settings, deadline: Deadline, input_identity: str,
           seen: dict[str, str]) -> dict[str, Any]:
  """The group's merge at target (empty: dst, or its --overwrite twin),
  verified; where the spec has ops, the merge is written beside dst first
  (`outputs.SUM`) and migrated to target by them, as any checkpoint is. The
  record's fields."""
  if not surgery.spec.ops:
    return _merge_at(group, target, surgery, settings, deadline, input_identity, seen)[0]
  summed = outputs.sibling(dst, outputs.SUM)
  _, inputs = _merge_at(group, summed, surgery, settings, deadline, input_identity, seen)
  done = write_migration(summed, target, surgery, settings, deadline, input_identity,
                         origin={'src': group.name, 'inputs': inputs})
  with deadline.writing():
    files.remove_tree(summed)
  return done


def _merge_at(group: MergeGroup, dst: epath.Path, surgery: transforms.Surgery, settings: Settings,
              deadline: Deadline, input_identity: str,
              seen: dict[str, str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """Merge the group's inputs at dst (empty), verify: the record's fields,
  and the provenance's entry of each input."""
  budget = settings.memory_budget or stream.default_budget(settings.in_flight)
  allowed = tuple(w for w in settings.writers if w in writers.STREAMING)
  with deadline.hold(WORKER.reading):
    inputs = [read_input(src) for src in group.inputs]
    averaged = check_inputs(inputs, surgery, surgery.spec.merge)
    for source in inputs:  # an input we wrote still holds what we recorded
      verification.check_recorded(source.src, source.layout, source.meta,
                                  budget=stream.pack_limit(budget))
    laid = lay_out(inputs, dst, group, surgery, averaged, budget, allowed)
    writer = protocol.PatchWriter(inputs[-1].src, dst, inputs[-1].layout, laid.patches)
    with deadline.writing():
      writer.begin()
    run = MergeRun(inputs, laid, budget, settings.allow_nonfinite, deadline.writing)
    count = run.write(writer, on_pack=pack_progress(group.name))
  provenance = output_provenance(group.name, surgery.spec, run.prints, laid.carried, settings,
                                 input_identity)
  provenance['inputs'] = [
      {'src': src, 'step': step, 'weight': weight, 'input_identity': seen[src],
       'read_digest': transforms.digest(read)}
      for src, step, weight, read in zip(group.inputs, group.steps, group.weights, run.read)]
  read = [m for c in laid.computed for m in c.sources]
  done = output_fields({'': read}, laid.bytes_out, laid.carried, None, 0, provenance)
  done.update(write_path='full' if laid.fresh else 'copy_and_patch', why_not_patched=laid.fresh,
              packs=count, memory_budget=budget)
  return commit_verified(writer, done, provenance, run.prints, deadline), provenance['inputs']


def _attempt(group: MergeGroup, dst: str, surgery: transforms.Surgery, settings: Settings,
             deadline: Deadline) -> dict[str, Any]:
  for src in group.inputs:
    if why := discovery.refused_names(src, dst):
      raise checkpoint.CheckpointError(why)  # before anything is read or written
  seen: dict[str, str] = {}
  return attempt_at(group.name, dst, surgery.spec, settings, deadline,
                    lambda: group_identity(group, seen),
                    lambda target, now: _write(group, epath.Path(dst), target, surgery, settings,
                                               deadline, now, seen))


def merge_one(name: str, dst: str, group: MergeGroup, surgery: transforms.Surgery,
              settings: Settings = Settings(), attempts: int = 3, backoff: float = 1.0,
              deadline: Deadline | None = None) -> dict[str, Any]:
  """Merge `group` (named `name`) to `dst`; its record (`migrate.retried`),
  which lists the inputs, their steps and weights."""
  deadline = deadline or Deadline(settings.checkpoint_timeout)
  rec = retried(name, dst, lambda: _attempt(group, dst, surgery, settings, deadline), deadline,
                attempts, backoff)
  return {**rec, 'inputs': list(group.inputs), 'steps': list(group.steps),
          'weights': list(group.weights)}
