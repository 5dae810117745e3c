"""A deadline for one checkpoint's attempt, and the means to give it up.

A checkpoint that is not done after `--checkpoint_timeout` seconds fails by
name and frees its output's lease, so that a rerun can take it. Python cannot
stop a thread: the attempt (stuck, say, in a `python:` op that never
returns) goes on, so every write it makes at the output is a `writing`
section, entered only while it is not given up, and a lease is freed only
outside one; it waits for the worker's shared locks no longer than the
deadline allows.
"""
from __future__ import annotations

import contextlib
import threading
import time

from pipeline.write import lease


class CheckpointTimeout(RuntimeError):  # not a TimeoutError: that would be retried as transient
  """A checkpoint's attempt ran past --checkpoint_timeout and was given up."""


class Deadline:
  """When one checkpoint's attempt must give up; `cancel` (from the worker's
  main thread) frees the output's lease the attempt holds, at once, or when
  the write under way ends: a write is never cut off with the lease gone."""

  def __init__(self, seconds: float):
    self.seconds = seconds
    self.at = time.monotonic() + seconds
    self.cancelled = threading.Event()
    self.lease: lease.Lease | None = None
    self._state = threading.Lock()
    self._writing = 0

  def left(self) -> float:
    return max(0.0, self.at - time.monotonic())

  def timeout_error(self, why: str = 'given up, its lease freed') -> CheckpointTimeout:
    return CheckpointTimeout(f'did not finish within {self.seconds:g} s (--checkpoint_timeout); {why}')

  def check(self) -> None:
    """Raise if the attempt was given up: it must write nothing more."""
    if self.cancelled.is_set():
      raise self.timeout_error()

  @contextlib.contextmanager
  def writing(self):
    """A section that writes at the output: entered only while the attempt is
    not given up; its lease is held until the section ends."""
    with self._state:
      self.check()
      self._writing += 1
    try:
      yield
    finally:
      with self._state:
        self._writing -= 1
        if self.cancelled.is_set() and not self._writing:
          self._free()

  @contextlib.contextmanager
  def hold(self, lock: threading.Lock):
    """`lock`, waited for no longer than the deadline allows (a stuck
    checkpoint may hold it forever)."""
    if not lock.acquire(timeout=self.left()):
      raise self.timeout_error('another checkpoint of this worker holds it up')
    try:
      yield
    finally:
      lock.release()

  def cancel(self) -> None:
    with self._state:
      self.cancelled.set()
      if not self._writing:
        self._free()

  def _free(self) -> None:
    if self.lease is not None:
      self.lease.release()
