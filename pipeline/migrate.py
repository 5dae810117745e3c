"""Migrate one checkpoint: restore, run the shared surgery, save atomically.

`migrate_one` is the whole job for one checkpoint as a plain function, tested
without Beam; `MigrateFn` is the DoFn that calls it on a worker. Every outcome
is a record (ok, skipped, failed) and never an exception, so one bad
checkpoint cannot stop the others. An attempt holds the output's lease while
it touches the output, and a failure leaves nothing there: it removes
whatever it left.
"""
from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import logging
import os
import socket
import time
from typing import Any

import apache_beam as beam
from etils import epath

import transforms
from pipeline import checkpoint_io, lease, storage

log = logging.getLogger('ckpt_surgery')
METRICS = 'ckpt_surgery'
_SURGERIES: dict[str, transforms.Surgery] = {}  # one per spec per process


def show_progress() -> None:
  """One line per checkpoint on the worker's stderr, whatever the worker's log
  level; not propagated, so the runner does not relay it a second time."""
  if not log.handlers:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter('%(message)s'))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def tool_version() -> str:
  try:
    return importlib.metadata.version('ckpt-surgery')
  except importlib.metadata.PackageNotFoundError:
    return 'unknown'


def surgery_for(spec_text: str) -> transforms.Surgery:
  """The process-wide Surgery of a spec, so compilations outlive bundles."""
  spec = transforms.load_spec(spec_text)
  return _SURGERIES.setdefault(spec.hash, transforms.Surgery(spec))


@dataclasses.dataclass(frozen=True)
class Settings:
  """How to treat each checkpoint of a run (from the command line)."""
  overwrite: bool = False        # replace outputs written with another spec
  allow_nonfinite: bool = False  # write outputs with NaN or inf
  gcs_endpoint: str | None = None  # a GCS emulator, for workers to use too


def record(src: str, dst: str, status: str, **fields: Any) -> dict[str, Any]:
  base = {'src': src, 'dst': dst, 'status': status, 'error': None, 'bytes_in': 0,
          'bytes_out': 0, 'seconds': 0.0, 'signature': None, 'compiled': False, 'attempts': 1,
          'digest': None,
          'worker': f'{socket.gethostname()}:{os.getpid()}'}
  return {**base, **fields}


def remove_partial_output(dst: epath.Path) -> None:
  """Delete what an unfinished save left: Orbax's temporary siblings, and dst
  itself unless it is a committed checkpoint (on GCS the temporary is dst)."""
  for leftover in dst.parent.glob(f'{dst.name}.orbax-checkpoint-tmp-*'):
    leftover.rmtree()
  if dst.exists() and not checkpoint_io.is_checkpoint(dst):
    dst.rmtree()


def committed_spec_hash(dst: epath.Path) -> str | None:
  """The spec hash a committed output at dst records ('' if none); None if no
  committed output is there."""
  if not checkpoint_io.is_checkpoint(dst):
    return None
  return (checkpoint_io.read_provenance(dst) or {}).get('spec_hash', '')


def _attempt(src: str, dst: str, surgery: transforms.Surgery, settings: Settings
             ) -> dict[str, Any]:
  """One try at migrating `src` to `dst`: the record's fields, or an exception.

  Everything that touches dst happens under its lease, so a concurrent attempt
  at the same checkpoint (a retried bundle) waits instead of colliding, and
  leftovers found under the lease are a dead attempt's, safe to remove.
  """
  src_path, dst_path = epath.Path(src), epath.Path(dst)
  spec, overwrite = surgery.spec, settings.overwrite
  if not overwrite and committed_spec_hash(dst_path) == spec.hash:
    lease.clear_stale(dst_path)  # a killed attempt's, left beside the output it committed
    return {'status': 'skipped'}  # without taking the lease: nightly reruns stay cheap
  with lease.claim(dst_path):
    remove_partial_output(dst_path)
    existing = committed_spec_hash(dst_path)
    if existing is not None:
      if existing == spec.hash and not overwrite:
        return {'status': 'skipped'}  # another attempt finished it meanwhile
      if not overwrite:
        raise checkpoint_io.CheckpointError(
            f'{dst} already holds a checkpoint (spec hash {existing or "none"}, '
            f'this spec {spec.hash}); pass --overwrite to replace it')
    try:
      return _write(src_path, dst_path, surgery, settings, replace=existing is not None)
    except Exception as e:
      try:
        remove_partial_output(dst_path)
      except Exception as cleanup:  # report both
        raise RuntimeError(f'{e}; and cleaning up {dst} failed: {cleanup}') from e
      raise


class VerificationError(RuntimeError):
  """What was committed is not what was computed; the output was removed."""


def _write(src: epath.Path, dst: epath.Path, surgery: transforms.Surgery,
           settings: Settings, replace: bool = False) -> dict[str, Any]:
  """Restore, operate, check, save, verify. With `replace`, the old output at
  dst is removed only once the new state is computed and checked, so an input
  that cannot be read or migrated leaves the old output as it was."""
  layout, items = checkpoint_io.restore(src)
  state = layout.join(items)
  bytes_in = transforms.tree_bytes(state)
  new_state, sig, compiled = surgery(state)
  prints = transforms.fingerprints(new_state)
  nonfinite = sorted(p for p, f in prints.items() if not f.finite)
  if nonfinite and not settings.allow_nonfinite:
    raise transforms.SurgeryError(
        f'the surgery made non-finite values (NaN or inf) in {len(nonfinite)} leaf(s): '
        f'{", ".join(nonfinite[:5])}{" ..." if len(nonfinite) > 5 else ""}; '
        'pass --allow_nonfinite to write them anyway')
  spec = surgery.spec
  provenance = {
      'src': str(src), 'spec_hash': spec.hash, 'spec': spec.canonical,
      'version': tool_version(),
      'time': datetime.datetime.now(datetime.timezone.utc).isoformat(),
      'digest': transforms.digest(prints),
      'checksums': {p: f.checksum for p, f in prints.items()},
  }
  written = layout.split(new_state, items)
  if replace:
    dst.rmtree()
  checkpoint_io.save(dst, layout, written, provenance)
  try:
    verify(dst, written, prints)
  except Exception:
    dst.rmtree()  # committed but wrong (or unreadable): not an output
    raise
  return {'status': 'ok', 'bytes_in': bytes_in, 'bytes_out': transforms.tree_bytes(new_state),
          'signature': sig, 'compiled': compiled, 'digest': provenance['digest']}


def verify(dst: epath.Path, written: dict[str, Any], prints: dict[str, transforms.Fingerprint]
           ) -> None:
  """Reopen what was committed at dst: it must hold the arrays of `written`
  (the items as saved: paths, shapes, dtypes), reading back `prints`' checksums."""
  expected = checkpoint_io.array_specs(written)
  layout, items = checkpoint_io.restore(dst, written=written)
  got = checkpoint_io.array_specs(items)
  if got != expected:
    differ = sorted(set(got.items()) ^ set(expected.items()))[:3]
    raise VerificationError(f'{dst}: committed arrays differ from what was computed: {differ}')
  back = transforms.fingerprints(layout.join(items))
  bad = sorted(p for p, f in prints.items() if p not in back or back[p].checksum != f.checksum)
  if bad:
    raise VerificationError(f'{dst}: committed data differ from what was computed in {bad[:5]}')


def migrate_one(src: str, dst: str, surgery: transforms.Surgery,
                settings: Settings = Settings(), attempts: int = 3, backoff: float = 1.0
                ) -> dict[str, Any]:
  """Migrate checkpoint `src` to `dst`; a record of what happened.

  Transient storage errors (HTTP 429/5xx, dropped connections) that outlive
  the storage libraries' own retries are retried here, `attempts` times in
  all with exponential backoff; anything else fails at once.
  """
  start = time.perf_counter()
  for attempt in range(1, attempts + 1):
    try:
      fields = _attempt(src, dst, surgery, settings)
      return record(src, dst, seconds=time.perf_counter() - start, attempts=attempt, **fields)
    except Exception as e:  # every failure becomes this checkpoint's record
      error = e
      if attempt == attempts or not storage.is_transient(e):
        break
      log.info('retrying %s after %s: %s', src, type(e).__name__, e)
      time.sleep(backoff * 2 ** (attempt - 1))
  return record(src, dst, 'failed', error=f'{type(error).__name__}: {error}',
                seconds=time.perf_counter() - start, attempts=attempt)


class MigrateFn(beam.DoFn):
  """Migrates each (src, dst) pair; yields its record and counts it in metrics.

  It never raises: whatever escapes migrate_one becomes a failed record too,
  so the report is the run's dead-letter sink. (Not Beam's
  with_exception_handling: the DaskRunner routes a ParDo's main and tagged
  outputs all to the tagged one, so a multi-output DoFn breaks there.)
  """

  def __init__(self, spec_text: str, settings: Settings):
    self.spec_text = spec_text
    self.settings = settings

  def setup(self):
    storage.configure(self.settings.gcs_endpoint)
    self.surgery = surgery_for(self.spec_text)
    show_progress()

  def process(self, pair):
    src, dst = pair
    try:
      rec = migrate_one(src, dst, self.surgery, self.settings)
    except Exception as e:  # a bug past migrate_one's own handling
      rec = record(src, dst, 'failed', error=f'{type(e).__name__}: {e}')
    beam.metrics.Metrics.counter(METRICS, rec['status']).inc()
    beam.metrics.Metrics.counter(METRICS, 'bytes_read').inc(rec['bytes_in'])
    beam.metrics.Metrics.counter(METRICS, 'bytes_written').inc(rec['bytes_out'])
    beam.metrics.Metrics.counter(METRICS, 'compilations').inc(int(rec['compiled']))
    log.info('%-7s %s -> %s (%.1fs)%s', rec['status'], src, dst, rec['seconds'],
             f": {rec['error']}" if rec['error'] else '')
    yield rec
