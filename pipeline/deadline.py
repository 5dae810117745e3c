"""A deadline for one checkpoint's attempt, and the means to give it up.

A checkpoint that is not done after `--checkpoint_timeout` seconds fails by
name and frees its output's lease, so that a rerun can take it. Python cannot
stop a thread: the attempt (stuck, say, in a `python:` op that never
returns) goes on, so it checks its Deadline before each write and writes
nothing once it is cancelled, and waits for the worker's shared locks no
longer than the deadline allows.
"""
from __future__ import annotations

import contextlib
import threading
import time

from pipeline import lease


class CheckpointTimeout(TimeoutError):
  """A checkpoint's attempt ran past --checkpoint_timeout and was given up."""


class Deadline:
  """When one checkpoint's attempt must give up; `cancel` (from the worker's
  main thread) frees the output's lease the attempt holds."""

  def __init__(self, seconds: float):
    self.seconds = seconds
    self.at = time.monotonic() + seconds
    self.cancelled = threading.Event()
    self.lease: lease.Lease | None = None

  def expired(self, why: str = 'given up, its lease freed') -> CheckpointTimeout:
    return CheckpointTimeout(f'did not finish within {self.seconds:g} s (--checkpoint_timeout); {why}')

  def check(self) -> None:
    """Raise if the attempt was given up: it must write nothing more."""
    if self.cancelled.is_set():
      raise self.expired()

  @contextlib.contextmanager
  def hold(self, lock: threading.Lock):
    """`lock`, waited for no longer than the deadline allows (a stuck
    checkpoint may hold it forever)."""
    if not lock.acquire(timeout=max(0.0, self.at - time.monotonic())):
      raise self.expired('another checkpoint of this worker holds it up')
    try:
      yield
    finally:
      lock.release()

  def cancel(self) -> None:
    self.cancelled.set()
    if self.lease is not None:
      self.lease.release()
