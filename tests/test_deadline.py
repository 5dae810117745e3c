"""Deadline: a given-up attempt writes nothing more, and its lease is freed
only outside a write."""
from __future__ import annotations

import threading

import pytest

from pipeline.compute.deadline import CheckpointTimeout, Deadline


class FakeLease:
  """Stands in for a held lease: records its release."""

  def __init__(self):
    self.released = 0

  def release(self):
    self.released += 1


def test_a_cancel_outside_a_write_frees_the_lease_at_once_and_stops_writes():
  deadline = Deadline(60)
  deadline.lease = held = FakeLease()
  deadline.cancel()
  assert held.released == 1
  with pytest.raises(CheckpointTimeout, match=r'within 60 s \(--checkpoint_timeout\)'):
    with deadline.writing():
      pass


def test_a_cancel_during_a_write_frees_the_lease_when_the_write_ends():
  deadline = Deadline(60)
  deadline.lease = held = FakeLease()
  with deadline.writing():
    deadline.cancel()
    assert held.released == 0  # a write is never cut off with its lease gone
  assert held.released == 1
  with pytest.raises(CheckpointTimeout):
    deadline.check()


def test_a_lock_held_past_the_deadline_times_out_by_name():
  lock = threading.Lock()
  lock.acquire()
  deadline = Deadline(0.05)
  with pytest.raises(CheckpointTimeout, match='another checkpoint of this worker holds it up'):
    with deadline.hold(lock):
      pass
  lock.release()
  with Deadline(1).hold(lock):
    assert lock.locked()
  assert not lock.locked()
