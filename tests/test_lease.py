"""Leases: one attempt at a time per output; stale leases are broken."""
from __future__ import annotations

import json
import os
import socket
import time

import pytest
from etils import epath

from pipeline.write import lease


def lease_file(dst: epath.Path) -> epath.Path:
  return dst.parent / (dst.name + lease.SUFFIX)


def test_one_holder_at_a_time_and_a_release_lets_the_next_in(tmp_path):
  dst = epath.Path(tmp_path / 'out')
  held = lease.try_claim(dst)
  assert held is not None and lease.try_claim(dst) is None
  holder = json.loads(lease_file(dst).read_text())
  assert (holder['host'], holder['pid']) == (socket.gethostname(), os.getpid())
  held.release()
  assert not lease_file(dst).exists()
  with lease.claim(dst, wait=1, poll=0.01):
    assert lease_file(dst).exists()
  assert not lease_file(dst).exists()


def test_the_heartbeat_refreshes_the_lease(tmp_path):
  dst = epath.Path(tmp_path / 'out')
  with lease.try_claim(dst, heartbeat=0.05):
    first = json.loads(lease_file(dst).read_text())['time']
    time.sleep(0.3)
    assert json.loads(lease_file(dst).read_text())['time'] > first


@pytest.mark.parametrize('body', [
    b'', b'not json', json.dumps({'host': socket.gethostname(), 'pid': 2 ** 22 + 7, 'time': time.time()}).encode(),
    json.dumps({'host': socket.gethostname(), 'pid': os.getpid(), 'started': '0', 'time': time.time()}).encode(),
    json.dumps({'host': 'elsewhere', 'pid': 1, 'time': time.time() - 3600}).encode()],
    ids=['empty', 'garbage', 'dead_process_here', 'its_pid_reused_here', 'not_refreshed_elsewhere'])
def test_a_stale_lease_is_broken_and_a_live_one_is_not(tmp_path, body):
  dst = epath.Path(tmp_path / 'out')
  lease_file(dst).write_bytes(body)
  assert lease.try_claim(dst) is None  # this claim breaks it; the next takes it
  with lease.try_claim(dst) as held:
    assert held is not None
    lease.clear_stale(dst)  # a live lease stays
    assert lease_file(dst).exists()


def test_waiting_for_a_lease_held_too_long_fails_by_name(tmp_path):
  dst = epath.Path(tmp_path / 'out')
  with lease.try_claim(dst):
    with pytest.raises(TimeoutError, match='being written by another attempt'):
      lease.claim(dst, wait=0.1, poll=0.02)


def test_clearing_removes_the_lock_file_a_killed_write_left(tmp_path):
  """kill -9 inside TensorStore's delete of a released lease leaves `<key>.__lock`
  on local disk; the next run's clearing removes it and claims still work."""
  dst = epath.Path(tmp_path / 'out')
  lock = dst.parent / (dst.name + lease.SUFFIX + '.__lock')
  lock.write_bytes(b'')
  lease.clear_stale(dst)
  assert not lock.exists()
  with lease.try_claim(dst) as held:
    assert held is not None


def test_without_proc_a_pid_in_use_is_taken_as_alive(tmp_path, monkeypatch):
  """Where there is no /proc (macOS), only the kernel's word on the pid
  counts: a lease whose pid is in use stays, one whose pid is free goes."""
  monkeypatch.setattr(lease, '_PROC', False)
  dst = epath.Path(tmp_path / 'out')
  lease_file(dst).write_text(json.dumps({'host': socket.gethostname(), 'pid': os.getpid(),
                                         'started': '0', 'time': time.time()}))
  lease.clear_stale(dst)
  assert lease_file(dst).exists()
  lease_file(dst).write_text(json.dumps({'host': socket.gethostname(), 'pid': 2 ** 22 + 7,
                                         'time': time.time()}))
  lease.clear_stale(dst)
  assert not lease_file(dst).exists()
