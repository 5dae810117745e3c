"""Migrate one checkpoint: restore, run the shared surgery, save atomically.

`migrate_one` is the whole job for one checkpoint as a plain function, tested
without Beam; `MigrateFn` is the DoFn that calls it on a worker. Every outcome
is a record (ok, skipped, failed) and never an exception, so one bad
checkpoint cannot stop the others. A failure leaves nothing at the output: we
remove whatever the failed attempt left there.
"""
from __future__ import annotations

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
from pipeline import checkpoint_io, storage

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


def record(src: str, dst: str, status: str, **fields: Any) -> dict[str, Any]:
  base = {'src': src, 'dst': dst, 'status': status, 'error': None, 'bytes_in': 0,
          'bytes_out': 0, 'seconds': 0.0, 'signature': None, 'compiled': False, 'attempts': 1,
          'worker': f'{socket.gethostname()}:{os.getpid()}'}
  return {**base, **fields}


def remove_partial_output(dst: epath.Path) -> None:
  """Delete what an unfinished save left: Orbax's temporary siblings, and dst
  itself unless it is a committed checkpoint (on GCS the temporary is dst)."""
  for leftover in dst.parent.glob(f'{dst.name}.orbax-checkpoint-tmp-*'):
    leftover.rmtree()
  if dst.exists() and not checkpoint_io.is_checkpoint(dst):
    dst.rmtree()


def already_done(dst: epath.Path, spec_hash: str, overwrite: bool) -> bool:
  """True when dst holds this surgery's output. Otherwise clears the way for a
  new save (partial leftovers; an old output with --overwrite) or raises."""
  remove_partial_output(dst)
  if not dst.exists():
    return False
  prov = checkpoint_io.read_provenance(dst) or {}
  if prov.get('spec_hash') == spec_hash and not overwrite:
    return True
  if not overwrite:
    raise checkpoint_io.CheckpointError(
        f'{dst} already holds a checkpoint (spec hash {prov.get("spec_hash")}, '
        f'this spec {spec_hash}); pass --overwrite to replace it')
  dst.rmtree()
  return False


def _attempt(src: str, dst: str, surgery: transforms.Surgery, overwrite: bool
             ) -> dict[str, Any]:
  """One try at migrating `src` to `dst`: the record's fields, or an exception."""
  src_path, dst_path = epath.Path(src), epath.Path(dst)
  spec = surgery.spec
  if already_done(dst_path, spec.hash, overwrite):
    return {'status': 'skipped'}
  layout, items = checkpoint_io.restore(src_path)
  state = layout.join(items)
  bytes_in = transforms.tree_bytes(state)
  new_state, sig, compiled = surgery(state)
  provenance = {
      'src': src, 'spec_hash': spec.hash, 'spec': spec.canonical,
      'version': tool_version(),
      'time': datetime.datetime.now(datetime.timezone.utc).isoformat(),
  }
  checkpoint_io.save(dst_path, layout, layout.split(new_state, items), provenance)
  return {'status': 'ok', 'bytes_in': bytes_in, 'bytes_out': transforms.tree_bytes(new_state),
          'signature': sig, 'compiled': compiled}


def migrate_one(src: str, dst: str, surgery: transforms.Surgery, overwrite: bool = False,
                attempts: int = 3, backoff: float = 1.0) -> dict[str, Any]:
  """Migrate checkpoint `src` to `dst`; a record of what happened.

  Transient storage errors (HTTP 429/5xx, dropped connections) that outlive
  the storage libraries' own retries are retried here, `attempts` times in
  all with exponential backoff; anything else fails at once.
  """
  start = time.perf_counter()
  for attempt in range(1, attempts + 1):
    try:
      fields = _attempt(src, dst, surgery, overwrite)
      return record(src, dst, seconds=time.perf_counter() - start, attempts=attempt, **fields)
    except Exception as e:  # every failure becomes this checkpoint's record
      error = e
      try:
        remove_partial_output(epath.Path(dst))
      except Exception as cleanup:  # report both; the run goes on
        error = RuntimeError(f'{e}; and cleaning up {dst} failed: {cleanup}')
      if attempt == attempts or not storage.is_transient(e):
        break
      log.info('retrying %s after %s: %s', src, type(e).__name__, e)
      time.sleep(backoff * 2 ** (attempt - 1))
  return record(src, dst, 'failed', error=f'{type(error).__name__}: {error}',
                seconds=time.perf_counter() - start, attempts=attempt)


class MigrateFn(beam.DoFn):
  """Migrates each (src, dst) pair; yields its record and counts it in metrics."""

  def __init__(self, spec_text: str, overwrite: bool, gcs_endpoint: str | None = None):
    self.spec_text = spec_text
    self.overwrite = overwrite
    self.gcs_endpoint = gcs_endpoint

  def setup(self):
    storage.configure(self.gcs_endpoint)
    self.surgery = surgery_for(self.spec_text)
    show_progress()

  def process(self, pair):
    src, dst = pair
    rec = migrate_one(src, dst, self.surgery, self.overwrite)
    beam.metrics.Metrics.counter(METRICS, rec['status']).inc()
    beam.metrics.Metrics.counter(METRICS, 'bytes_read').inc(rec['bytes_in'])
    beam.metrics.Metrics.counter(METRICS, 'bytes_written').inc(rec['bytes_out'])
    beam.metrics.Metrics.counter(METRICS, 'compilations').inc(int(rec['compiled']))
    log.info('%-7s %s -> %s (%.1fs)%s', rec['status'], src, dst, rec['seconds'],
             f": {rec['error']}" if rec['error'] else '')
    yield rec
