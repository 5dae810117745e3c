"""Migrate one checkpoint: restore, run the shared surgery, save atomically.

`migrate_one` is the whole job for one checkpoint as a plain function, tested
without Beam; `migrate_fn.MigrateFn` is the DoFn that calls it on a worker. Every outcome
is a record (ok, skipped, failed) and never an exception, so one bad
checkpoint cannot stop the others. An attempt holds the output's lease while
it touches the output, and a failure leaves nothing there: it removes
whatever it left.
"""
from __future__ import annotations

import dataclasses
import datetime
import time
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from etils import epath

import transforms
from pipeline import checkpoint, storage
from pipeline.checkpoint import discovery, identity
from pipeline.compute import finite, stream
from pipeline.compute.deadline import Deadline
from pipeline.compute.worker import WORKER, log, tool_version
from pipeline.report import record, tidy
from pipeline.verify import verification
from pipeline.write import copy_patch, lease, outputs, protocol, writers


@dataclasses.dataclass(frozen=True)
class Settings:
  """How to treat each checkpoint of a run (from the command line)."""
  overwrite: bool = False        # replace outputs written with another spec
  allow_nonfinite: bool = False  # write outputs with NaN or inf
  gcs_endpoint: str | None = None  # a GCS emulator, for workers to use too
  full_decode: bool = False      # restore and rewrite every leaf, even untouched ones
  in_flight: int = 2             # checkpoints a worker holds at once (one reads as one writes)
  memory_budget: int = 0         # bytes per checkpoint in flight (0: stream.default_budget)
  checkpoint_timeout: float = 7200.0  # seconds before a checkpoint fails and its lease is freed
  output: str = ''               # the run's PREFIX and id: where workers save each record
  run: str = ''
  launcher: int = 0              # the launching process's pid
  writers: tuple[str, ...] = writers.WRITERS  # those outputs may be written by (tests narrow it)
  keep_runs: int = tidy.KEEP_RUNS  # runs whose reports are kept under PREFIX/_surgery (0: all)


# What a migration's record holds of its output, recorded in the output's
# provenance too: an attempt that finds this run's own output (a retried
# bundle, after a worker died having committed it) records the same, so a
# run's totals do not depend on which worker lived. What moved (bytes
# uploaded or copied server-side) is known only after the commit: not kept.
RECORDED = ('bytes_in', 'bytes_out', 'bytes_carried', 'signature', 'compiled', 'compilations',
            'digest', 'write_path', 'why_not_patched', 'memory_budget', 'why_not_streamed', 'packs')


def _done(src: str, dst: epath.Path, spec: transforms.Spec, run: str,
          input_now: str) -> dict[str, Any] | None:
  """The record's fields where dst holds our verified migration of this very
  source, as it is now (`input_now`, its identity), under this spec:
  'skipped'; or 'ok' where this run wrote it (a retried bundle), with what
  the attempt that wrote it recorded. Else None. The mark first: an
  attempt under way may remove dst."""
  if outputs.sibling(dst, outputs.ATTEMPT).exists():
    return None
  try:
    recorded = outputs.provenance(dst)
  except outputs.NotOurs:
    return None
  if recorded is None or (recorded.get('spec_hash'), recorded.get('src'),
                          recorded.get('input_identity')) != (spec.hash, src, input_now):
    return None
  if run and recorded.get('run') == run:
    return {**recorded.get('record', {}), 'status': 'ok'}
  return {'status': 'skipped'}


def _another(recorded: dict[str, Any], src: str, spec: transforms.Spec) -> str:
  """What the migration recorded at an output is, where it is not this one."""
  if recorded.get('src') != src:
    return f"another source, {recorded.get('src')}"
  if recorded.get('spec_hash') != spec.hash:
    return f"another spec (spec hash {recorded.get('spec_hash')}, this spec {spec.hash})"
  if not recorded.get('input_identity'):
    return ('this source, written by an earlier ckpt-surgery that recorded no identity of its '
            'input, so it cannot be proven to be of the input as it is now')
  return ('this source as it was before it changed (its files were written again since: '
          're-saved at the same path?)')


def _identified(fields: dict[str, Any], input_identity: str,
                output_identity: str | None) -> dict[str, Any]:
  """A record's fields with what its input and output were (the run's done
  file keeps them: `report.done`)."""
  return {**fields, 'input_identity': input_identity, 'output_identity': output_identity}


def _attempt(src: str, dst: str, surgery: transforms.Surgery, settings: Settings,
             deadline: Deadline) -> dict[str, Any]:
  """One try at migrating `src` to `dst`: the record's fields, or an exception."""
  if why := discovery.refused_names(src, dst):
    raise checkpoint.CheckpointError(why)  # before anything is read or written
  src_path = epath.Path(src)
  return attempt_at(
      src, dst, surgery.spec, settings, deadline, lambda: identity.identity(src_path),
      lambda target, input_now: write_migration(src_path, target, surgery, settings, deadline,
                                                input_now))


def attempt_at(src: str, dst: str, spec: transforms.Spec, settings: Settings, deadline: Deadline,
               identify: Callable[[], str], write: Callable[[epath.Path, str], dict[str, Any]]
               ) -> dict[str, Any]:
  """One try at making dst from `src` (a checkpoint, or a merge's group)
  under `spec`: the record's fields, or an exception. `identify()` is what
  the input is now (`identity`); `write(target, identity)` writes the
  output at target (empty) and verifies it, its record's fields.

  Everything that touches dst happens under its lease, so a concurrent attempt
  at the same checkpoint (a retried bundle) waits instead of colliding, and
  leftovers of ours found under the lease are a dead attempt's (see
  `outputs`). What is at dst and not ours fails this checkpoint untouched; a
  committed output of another source or spec, or of this source before it
  changed (`identity`), needs --overwrite, and is replaced only once its
  successor is verified beside it. Every write is a section of the
  deadline's (see `deadline`).
  """
  dst_path, overwrite = epath.Path(dst), settings.overwrite
  input_now = identify()
  if not overwrite:
    output_before = identity.identity(dst_path)
    if done := _done(src, dst_path, spec, settings.run, input_now):
      lease.clear_stale(dst_path)  # a killed attempt's, left beside the output it committed
      # The output's identity, for the run's done file, only where it did not
      # change while its provenance was read: without the lease, another
      # attempt may be replacing it.
      unchanged = identity.identity(dst_path) == output_before
      return _identified(done, input_now, output_before if unchanged else None)  # no lease: cheap
  with lease.claim(dst_path, wait=min(3600.0, deadline.left())) as held:
    deadline.lease = held
    with deadline.writing():
      outputs.recover(dst_path)
    recorded = outputs.provenance(dst_path)
    if recorded is not None and not overwrite:
      if done := _done(src, dst_path, spec, settings.run, input_now):
        return _identified(done, input_now, identity.identity(dst_path))  # finished meanwhile
      raise checkpoint.CheckpointError(
          f'{dst} already holds the migration of {_another(recorded, src, spec)}; pass '
          '--overwrite to replace it')
    with deadline.writing():
      target = outputs.mark(dst_path, beside=recorded is not None)
    try:
      done = write(target, input_now)
      if identify() != input_now:
        raise checkpoint.CheckpointError(
            f'{src} changed while it was migrated (its files were written meanwhile); its '
            'output is not kept: run again once it is written')
      with deadline.writing():
        outputs.publish(dst_path, target)
      return _identified(done, input_now, identity.identity(dst_path))
    except Exception as e:
      if deadline.cancelled.is_set():
        raise  # given up: its lease may be another attempt's now; a rerun recovers
      try:
        with deadline.writing():
          outputs.recover(dst_path)
      except Exception as cleanup:  # report both
        raise RuntimeError(f'{e}; and cleaning up {dst} failed: {cleanup}') from e
      raise


def _copy_through(src: epath.Path, layout: checkpoint.Layout, meta: dict[str, Any],
                  surgery: transforms.Surgery, budget: int | None = None
                  ) -> tuple[dict[str, Any], Any, str, bool, str | None] | None:
  """(restored items, migrated state, signature, compiled, how the surgery
  removes data or None) with every leaf
  the surgery leaves untouched as a StoredArray, restoring only what the
  computed leaves read; None where copy-through does not apply: nothing
  untouched, or a scalar among params and opt_state."""
  placed = stream.placed_input(layout, meta, surgery)
  leaves, treedef, rest_meta, rest_arrays, _, abstract, _ = placed
  if abstract is None:
    return None
  route, sig = surgery.route(abstract)
  if not route.carried and not rest_arrays:
    return None
  verification.check_recorded(src, layout, meta, budget=budget)  # carried leaves are not read below
  stand_in = placed.stand_in()
  needed = set(route.needed)
  like = surgery.join(
      treedef.unflatten([m if i in needed else ocp.PLACEHOLDER for i, m in enumerate(leaves)]),
      jax.tree_util.tree_map(lambda m: ocp.PLACEHOLDER if checkpoint.is_array(m) else m, rest_meta))
  _, items = checkpoint.restore(src, like=layout.split(like, {}))
  tree, rest = surgery.split(layout.join(items))
  restored = treedef.flatten_up_to(tree)
  compute, compiled = surgery.route_function(abstract)
  new_tree = route.assemble(compute([restored[i] for i in route.needed]),
                            [stand_in(leaves[j]) for _, j in sorted(route.carried.items())])
  rest = jax.tree_util.tree_map(lambda x, m: stand_in(m) if x is ocp.PLACEHOLDER else x,
                                rest, rest_meta)
  return items, surgery.join(new_tree, rest), transforms.signature_id(sig), compiled, route.removes


def write_migration(src: epath.Path, dst: epath.Path, surgery: transforms.Surgery,
                    settings: Settings, deadline: Deadline, input_identity: str,
                    origin: dict[str, Any] | None = None) -> dict[str, Any]:
  """Restore, operate, check, write at dst (empty) the cheapest way that
  applies (copy-and-patch, copy-through, full save), verify; a pack at a
  time where what the surgery computes exceeds the memory budget (`stream`).
  `origin`: what the output's provenance says it was made of, where src is
  a stage of its making (a merge's sum: the group's name and inputs)."""
  budget = settings.memory_budget or stream.default_budget(settings.in_flight)
  why_not_streamed, zero_fills = None, False
  with deadline.hold(WORKER.reading):
    layout = checkpoint.read_layout(src)
    if layout.msgpack:  # one file, read once and whole: no metadata, no stored chunks to copy
      _, items = checkpoint.restore(src)
      trees_in = checkpoint.abstract(items)  # taken before the surgery donates the arrays
      if transforms.tree_bytes(trees_in) > budget:
        why_not_streamed = 'a Flax msgpack file is read whole'
      migrated = (items, *surgery(layout.join(items)), None)
    else:
      meta = checkpoint.item_metadata(src, layout)
      trees_in = checkpoint.trees(meta)
      # A zero fill is checked on the whole state, before the compiled surgery runs.
      zero_fills = bool(surgery.zero_fills(surgery.split(layout.join(trees_in))[0]))
      whole = settings.full_decode or zero_fills
      try:
        if whole and not settings.full_decode:
          raise stream.NotStreamed(copy_patch.ZERO_FILLS)
        streamed = stream.prepare(src, dst, layout, meta, surgery, budget, settings.full_decode,
                               settings.writers)
      except (stream.NotStreamed, copy_patch.NotPatchable) as e:
        streamed, why_not_streamed = None, str(e)
      if streamed:
        return _write_streamed(src, dst, layout, meta, streamed, surgery, settings, deadline,
                               input_identity, origin)
      migrated = None if whole else _copy_through(src, layout, meta, surgery, budget)
      if migrated is None:
        _, items = checkpoint.restore(src, like=trees_in)
        verification.check_recorded(src, layout, meta, layout.join(items))
        migrated = (items, *surgery(layout.join(items)), None)
  items, new_state, sig, compiled, removes = migrated
  prints = transforms.fingerprints(new_state)
  finite.refuse_nonfinite(prints, settings.allow_nonfinite)
  carried = {transforms.key_path(k): x for k, x in jax.tree_util.tree_flatten_with_path(new_state)[0]
             if isinstance(x, checkpoint.StoredArray)}
  provenance = {**output_provenance(src, surgery.spec, prints, carried, settings, input_identity),
                **(origin or {})}
  done = output_fields(trees_in, transforms.tree_bytes(new_state), carried, sig, compiled,
                       provenance)
  done.update(memory_budget=budget, why_not_streamed=why_not_streamed)
  written = layout.split(new_state, items)
  del migrated, items, new_state  # `written` holds the only references: dropped after saving
  choice = writers.choose(src, layout, removes, carried=bool(carried), zero_fills=zero_fills,
                          full_decode=settings.full_decode, dst=dst, written=written,
                          writers=settings.writers)
  done['write_path'], done['why_not_patched'] = choice.write_path, choice.why_not_patched
  provenance['record'] = {k: done[k] for k in RECORDED if k in done}
  writer = protocol.open_writer(choice, src, dst, layout, done['bytes_out'])
  pack = choice.values if choice.patches else written
  del written, choice  # the pack, then the writer, hold the arrays: let go once written
  with deadline.hold(WORKER.saving), deadline.writing():
    writer.begin()
    writer.write_pack(pack)
    del pack
    writer.finish(provenance)
    moved = writer.commit()
  done.update(moved._asdict())
  writer.verify(prints)  # if it fails, the attempt's recovery removes dst
  return done


def output_provenance(src: epath.Path | str, spec: transforms.Spec,
                      prints: dict[str, transforms.Fingerprint], carried: dict[str, Any],
                      settings: Settings, input_identity: str) -> dict[str, Any]:
  """What an output records of its making, in its _CHECKPOINT_METADATA."""
  return {
      'src': str(src), 'input_identity': input_identity,
      'spec_hash': spec.hash, 'spec': spec.canonical,
      'version': tool_version(),
      'time': datetime.datetime.now(datetime.timezone.utc).isoformat(),
      'digest': transforms.digest(prints),
      'checksums': {p: f.checksum for p, f in prints.items()},
      'carried': sorted(carried),  # stored bytes copied, values never decoded
      'run': settings.run,
  }


def output_fields(trees_in: Any, bytes_out: int, carried: dict[str, Any], sig: str | None,
                  compiled: int, provenance: dict[str, Any]) -> dict[str, Any]:
  """The record's fields of a migration about to be written."""
  arrays_in = [x for x in jax.tree_util.tree_leaves(trees_in) if checkpoint.is_array(x)]
  return {'status': 'ok', 'bytes_in': transforms.tree_bytes(arrays_in),
          'bytes_out': bytes_out,
          'bytes_carried': transforms.tree_bytes(list(carried.values())),
          'signature': sig, 'compiled': bool(compiled), 'compilations': int(compiled),
          'digest': provenance['digest']}


def _write_streamed(src: epath.Path, dst: epath.Path, layout: checkpoint.Layout,
                    meta: dict[str, Any], streamed: stream.Streamed, surgery: transforms.Surgery,
                    settings: Settings, deadline: Deadline, input_identity: str,
                    origin: dict[str, Any] | None) -> dict[str, Any]:
  """Write `streamed` at dst a pack at a time, verify. Called holding the
  read lock, which it keeps while it reads and writes in turn: the other
  checkpoint in flight waits to read instead of holding a budget's worth
  beside it. Each write is a section of the deadline's, so one given up
  writes no more; the commit takes the save lock, as other saves do."""
  verification.check_recorded(src, layout, meta, budget=stream.pack_limit(streamed.budget))
  run = stream.Run(src, layout, streamed, surgery, settings.allow_nonfinite, deadline.writing)
  writer = protocol.PatchWriter(src, dst, layout, streamed.patches)  # the writer that takes packs
  with deadline.writing():
    writer.begin()
  run.write(writer, on_pack=pack_progress(src))
  provenance = {**output_provenance(src, surgery.spec, run.prints, streamed.carried, settings,
                                    input_identity), **(origin or {})}
  done = output_fields(checkpoint.trees(meta), streamed.bytes_out, streamed.carried,
                       streamed.signature, run.compilations, provenance)
  done.update(write_path='full' if streamed.fresh_tree else 'copy_and_patch',
              why_not_patched=streamed.fresh, packs=len(streamed.packs),
              memory_budget=streamed.budget)
  return commit_verified(writer, done, provenance, run.prints, deadline)


def pack_progress(name: str | epath.Path) -> Callable[[int, int], None]:
  """What a long write says as pack i of n begins: a line every ten packs."""
  return lambda i, n: log.info('  %s: pack %d of %d', name, i + 1, n) if (i + 1) % 10 == 0 else None


def commit_verified(writer: protocol.Writer, done: dict[str, Any], provenance: dict[str, Any],
                    prints: dict[str, transforms.Fingerprint], deadline: Deadline
                    ) -> dict[str, Any]:
  """Finish and commit a written output (under the save lock), verify it:
  the record's fields `done`, with what moved. Its provenance keeps what the
  record says of it (`RECORDED`)."""
  provenance['record'] = {k: done[k] for k in RECORDED if k in done}
  with deadline.hold(WORKER.saving), deadline.writing():
    writer.finish(provenance)
    moved = writer.commit()
  writer.verify(prints)
  done.update(moved._asdict())
  return done


def migrate_one(src: str, dst: str, surgery: transforms.Surgery,
                settings: Settings = Settings(), attempts: int = 3, backoff: float = 1.0,
                deadline: Deadline | None = None) -> dict[str, Any]:
  """Migrate checkpoint `src` to `dst`; a record of what happened (`retried`)."""
  deadline = deadline or Deadline(settings.checkpoint_timeout)
  return retried(src, dst, lambda: _attempt(src, dst, surgery, settings, deadline), deadline,
                 attempts, backoff)


def retried(src: str, dst: str, attempt: Callable[[], dict[str, Any]], deadline: Deadline,
            attempts: int = 3, backoff: float = 1.0) -> dict[str, Any]:
  """The record of `attempt()` (its fields) making dst from `src`.

  Transient storage errors (HTTP 429/5xx, dropped connections) that outlive
  the storage libraries' own retries are retried here, `attempts` times in
  all with exponential backoff; anything else fails at once.
  """
  start = time.perf_counter()
  for count in range(1, attempts + 1):
    try:
      deadline.check()
      return record(src, dst, seconds=time.perf_counter() - start, attempts=count, **attempt())
    except Exception as e:  # every failure becomes this checkpoint's record
      error = e
      if count == attempts or deadline.cancelled.is_set() or not storage.is_transient(e):
        break
      log.info('retrying %s after %s: %s', src, type(e).__name__, e)
      time.sleep(backoff * 2 ** (count - 1))
  return record(src, dst, 'failed', error=describe(error),
                seconds=time.perf_counter() - start, attempts=count)


# What storage libraries' error codes mean for a checkpoint's files.
_CAUSES = {'OUT_OF_RANGE': 'a data file is shorter than its index says: truncated',
           'DATA_LOSS': 'a data file or index is corrupt',
           'NOT_FOUND': 'a file the checkpoint names is missing',
           'PERMISSION_DENIED': 'permission denied'}


def describe(error: BaseException) -> str:
  """An error in one line a user can act on: its type, its first line (not a
  storage library's 60-line spec dump), and what its code means."""
  if 'See full TensorStore details' in str(error) and error.__cause__ is not None:
    error = error.__cause__  # Orbax's wrapper: the cause names the array and the file
  lines = str(error).strip().splitlines()
  text = f'{type(error).__name__}: {lines[0][:400] if lines else ""}'.rstrip(': ')
  cause = next((c for code, c in _CAUSES.items() if code in (lines[0] if lines else '')), None)
  return f'{text} ({cause})' if cause else text

