"""A worker process's own state and helpers, kept from one checkpoint to the next.

Each spec's compiled Surgery (so compilations outlive bundles) and the
read and save locks live in `WORKER`; the progress log, the process's
peak memory, daemon threads for checkpoints in flight, and the watch that
ends a worker whose launcher died are here too. No Beam.
"""
from __future__ import annotations

import concurrent.futures
import importlib.metadata
import logging
import os
import resource
import threading
import time
from typing import Any

import transforms

log = logging.getLogger('ckpt_surgery')


class WorkerState:
  """What a worker process keeps from one checkpoint to the next: each
  spec's Surgery (so compilations outlive bundles), and two locks. One
  checkpoint at a time reads and operates, and one at a time saves: the
  next one's read overlaps the last one's save (and Orbax's handlers are
  shared by every save in the process). `clear()` forgets it all."""

  def __init__(self):
    self.clear()

  def clear(self) -> None:
    self.surgeries: dict[str, transforms.Surgery] = {}
    self.reading = threading.Lock()
    self.saving = threading.Lock()

  def surgery_for(self, spec_text: str) -> transforms.Surgery:
    spec = transforms.load_spec(spec_text)
    return self.surgeries.setdefault(spec.hash, transforms.Surgery(spec))

  def reset_after_timeout(self, spec_text: str) -> transforms.Surgery:
    """A worker whose checkpoint was given up may have a thread stuck
    forever holding the read lock (a streamed checkpoint's, the save lock
    too) and the surgery's compile lock: later checkpoints get fresh ones
    (and compile afresh), so one stuck op fails one checkpoint, not every
    one after it."""
    self.reading, self.saving = threading.Lock(), threading.Lock()
    spec = transforms.load_spec(spec_text)
    self.surgeries[spec.hash] = transforms.Surgery(spec)
    return self.surgeries[spec.hash]


WORKER = WorkerState()  # this process's


def surgery_for(spec_text: str) -> transforms.Surgery:
  """The process-wide Surgery of a spec, so compilations outlive bundles."""
  return WORKER.surgery_for(spec_text)


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


def peak_rss() -> int:
  """This process's peak resident set so far, in bytes."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux counts KiB


def in_daemon_thread(fn: Any, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
  """fn(*args, **kwargs) in a thread of its own; its future. A daemon thread:
  one stuck past its checkpoint's deadline (a `python:` op that never returns)
  must not keep the worker from exiting, as a pool's threads would."""
  future: concurrent.futures.Future = concurrent.futures.Future()

  def target():
    try:
      future.set_result(fn(*args, **kwargs))
    except BaseException as e:  # pylint: disable=broad-except
      future.set_exception(e)

  threading.Thread(target=target, daemon=True, name='migrate').start()
  return future


def exit_when_orphaned(poll: float = 1.0) -> None:
  """End this worker process soon after the process that started it dies (a
  killed launcher), instead of working on and holding leases."""
  parent = os.getppid()

  def watch():
    while os.getppid() == parent:
      time.sleep(poll)
    os._exit(1)  # pylint: disable=protected-access

  threading.Thread(target=watch, daemon=True, name='orphan-watch').start()
