"""The Beam DoFn that migrates each (src, dst) pair on a worker (`migrate_one`),
or merges each group of a merge spec, (name, dst, group) (`merge.merge_one`)."""
from __future__ import annotations

import collections
import concurrent.futures
import os
from typing import Any

import apache_beam as beam
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue
import jax

from pipeline import merge, migrate, release_freed_memory, report, storage
from pipeline.compute.deadline import Deadline
from pipeline.compute.worker import (WORKER, exit_when_orphaned, in_daemon_thread, log, peak_rss,
                                     show_progress, surgery_for)
from pipeline.migrate import Settings, describe
from pipeline.report import record

METRICS = 'ckpt_surgery'
SKIPS_PER_LINE = 100
TRIM_EVERY = 50  # checkpoints between two returns of freed memory (`release_freed_memory`)


class MigrateFn(beam.DoFn):
  """Migrates each (src, dst) pair; yields its record and counts it in metrics.

  `settings.in_flight` checkpoints (2) are in flight in each worker, each in
  a thread of its own: while one is written and verified, the next is read
  and operated on (`_write` lets one checkpoint at a time read), so storage
  and device stay busy. One past its deadline is given up (see Deadline).
  Records come out as checkpoints finish, the last ones from finish_bundle.

  It never raises: whatever escapes migrate_one becomes a failed record too,
  so the report is the run's dead-letter sink. (Not Beam's
  with_exception_handling: the DaskRunner routes a ParDo's main and tagged
  outputs all to the tagged one, so a multi-output DoFn breaks there.)
  """
  def __init__(self, spec_text: str, settings: Settings):
    self.spec_text = spec_text
    self.settings = settings

  def setup(self):
    if os.getpid() != self.settings.launcher:  # a worker process, not the launcher itself
      exit_when_orphaned()
    storage.configure(self.settings.gcs_endpoint)
    self.surgery = surgery_for(self.spec_text)
    show_progress()
    jax.local_devices()  # start the backend: part of the worker's footprint, not a checkpoint's
    self.idle_rss = peak_rss()  # the worker's own footprint before any checkpoint
    self.skipped = 0
    self.finished = 0

  def start_bundle(self):
    self.pending = collections.deque()

  def process(self, pair):
    deadline = Deadline(self.settings.checkpoint_timeout)
    work = merge.merge_one if self.surgery.spec.merge else migrate.migrate_one
    self.pending.append((pair, in_daemon_thread(
        work, *pair, self.surgery, self.settings, deadline=deadline), deadline))
    while len(self.pending) >= self.settings.in_flight or (self.pending and self.pending[0][1].done()):
      yield self._finish(*self.pending.popleft())

  def finish_bundle(self):
    while self.pending:
      yield WindowedValue(self._finish(*self.pending.popleft()), MIN_TIMESTAMP, [GlobalWindow()])

  def _give_up(self, pair: tuple[Any, ...], done: concurrent.futures.Future,
               deadline: Deadline) -> dict[str, Any]:
    """The record of a checkpoint past its deadline: given up (its lease
    freed), unless it finished just now."""
    src, dst = pair[:2]
    try:
      deadline.cancel()
    except Exception as e:  # freeing the lease failed: it goes stale on its own
      log.warning('could not free the lease of %s: %s', dst, e)
    if done.done():
      try:
        return done.result()
      except Exception:  # pylint: disable=broad-except
        pass
    self.surgery = WORKER.reset_after_timeout(self.spec_text)
    return record(src, dst, 'failed', seconds=deadline.seconds,
                  error=describe(deadline.timeout_error()))

  def _finish(self, pair: tuple[Any, ...], done: concurrent.futures.Future,
              deadline: Deadline) -> dict[str, Any]:
    """The record of a finished (or given up) checkpoint, counted (in the
    bundle's thread, where Beam's metrics live) and saved on its own."""
    src, dst = pair[:2]
    try:
      rec = done.result(timeout=deadline.left())
    except concurrent.futures.TimeoutError:
      rec = self._give_up(pair, done, deadline)
    except Exception as e:  # a bug past migrate_one's own handling
      rec = record(src, dst, 'failed', error=f'{type(e).__name__}: {e}')
    self.finished += 1
    if self.finished % TRIM_EVERY == 0:
      release_freed_memory()
    rec['peak_rss_over_idle'] = peak_rss() - self.idle_rss
    if self.settings.run:
      try:
        report.save_record(self.settings.output, self.settings.run, rec)
      except Exception as e:  # the report step still has it; only a dead worker would lose it
        log.warning('could not save the record of %s: %s', src, e)
    beam.metrics.Metrics.counter(METRICS, rec['status']).inc()
    beam.metrics.Metrics.counter(METRICS, 'bytes_read').inc(rec['bytes_in'])
    beam.metrics.Metrics.counter(METRICS, 'bytes_written').inc(rec['bytes_out'])
    beam.metrics.Metrics.counter(METRICS, 'bytes_carried').inc(rec['bytes_carried'])
    beam.metrics.Metrics.counter(METRICS, 'bytes_copied_server_side').inc(rec['bytes_copied_server_side'])
    beam.metrics.Metrics.counter(METRICS, 'bytes_uploaded').inc(rec['bytes_uploaded'])
    if rec['write_path']:
      beam.metrics.Metrics.counter(METRICS, rec['write_path']).inc()
    beam.metrics.Metrics.counter(METRICS, 'compilations').inc(rec['compilations'])
    self._say(rec)
    return rec

  def _say(self, rec: dict[str, Any]) -> None:
    """A line per checkpoint migrated or failed; one per SKIPS_PER_LINE skipped
    (a nightly rerun skips thousands)."""
    if rec['status'] == 'skipped':
      self.skipped += 1
      if self.skipped % SKIPS_PER_LINE == 0:
        log.info('skipped %d checkpoint(s) done already (%d on this worker)', SKIPS_PER_LINE,
                 self.skipped)
      return
    log.info('%-7s %s -> %s (%.1fs)%s', rec['status'], rec['src'], rec['dst'], rec['seconds'],
             f": {rec['error']}" if rec['error'] else '')
