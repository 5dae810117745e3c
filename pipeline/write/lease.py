"""One attempt at a time per output: a lease object beside it, claimed atomically.

Beam runs a bundle at least once, so two attempts at one checkpoint can run at
the same time (a retry beside a straggler). Before touching an output path an
attempt claims `<output>.ckpt-surgery-lease` with TensorStore's conditional
write (create only if absent: an exclusive create on local disk, a
generation-0 precondition on GCS), so exactly one attempt writes and the
others wait for it. The holder refreshes the lease every `heartbeat` seconds;
a lease is stale, and may be broken, when its holder is a dead process on
this host (gone, a zombie, or its pid another process's since), when it has not been refreshed for `stale_after` seconds (a
killed run on another machine), or when it is empty or garbage.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import threading
import time
import uuid

import tensorstore as ts
from etils import epath

from pipeline import storage
from pipeline.storage import files

SUFFIX = '.ckpt-surgery-lease'
_NO_VALUE = b'\x02'  # TensorStore's generation of a key that does not exist


def _kvstore(directory: epath.Path) -> ts.KvStore:
  return storage.open_store(directory).result()


_PROC = os.path.exists('/proc/self/stat')  # Linux: each process's state and start time


def _process(pid: int) -> tuple[str, str] | None:
  """(state, start time in clock ticks since boot) of process `pid` on this
  host, from /proc (where `_PROC`); None where there is no such process."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      fields = f.read().rsplit(')', 1)[1].split()  # after the command name, which may hold spaces
  except FileNotFoundError:
    return None
  return fields[0], fields[19]


def alive_here(holder: dict) -> bool:
  """Whether the process `holder` names (see `holder`) may be alive: on
  another host, always (only time can tell)."""
  if holder.get('host') != socket.gethostname():
    return True  # another machine: only the heartbeat can tell
  if _PROC:
    # Gone; exited but not reaped (a container whose init does not reap); or
    # its pid now another process's (a pid is soon reused: pid_max may be 32768).
    found = _process(holder['pid'])
    return (found is not None and found[0] not in ('Z', 'X')
            and holder.get('started') in (None, found[1]))
  try:  # no /proc: whether the pid is in use is all the kernel says
    os.kill(holder['pid'], 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass
  return True


@dataclasses.dataclass
class Lease:
  """A held lease; `release()` (or the context manager) gives it up."""
  store: ts.KvStore
  key: str
  generation: bytes
  heartbeat: float
  _stop: threading.Event = dataclasses.field(default_factory=threading.Event)

  def __post_init__(self):
    self._lock = threading.Lock()
    threading.Thread(target=self._beat, daemon=True).start()

  def _beat(self):
    while not self._stop.wait(self.heartbeat):
      with self._lock:
        if self._stop.is_set():
          return
        stamp = self.store.write(self.key, _body(), if_equal=self.generation).result()
        if stamp.generation:
          self.generation = stamp.generation

  def release(self) -> None:
    with self._lock:
      self._stop.set()
      self.store.write(self.key, None, if_equal=self.generation).result()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()


def holder() -> dict:
  """This process, as `alive_here` can later tell whether it still lives."""
  started = _process(os.getpid())[1] if _PROC else None
  return {'host': socket.gethostname(), 'pid': os.getpid(), 'started': started}


def _body() -> bytes:
  return json.dumps({**holder(), 'attempt': uuid.uuid4().hex, 'time': time.time()}).encode()


def _break_if_stale(store: ts.KvStore, key: str, stale_after: float, local: bool) -> None:
  held = store.read(key).result()
  if held.state != 'value':
    if local:
      # A process killed inside TensorStore's write or delete of a local key
      # leaves the key's `.__lock` file; a delete of the absent key takes
      # that lock as TensorStore does and removes the file. GCS has none.
      store.write(key, None, if_equal=_NO_VALUE).result()
    return  # released just now
  try:
    holder = json.loads(held.value)
    fresh = alive_here(holder) and time.time() - float(holder['time']) < stale_after
  except (ValueError, TypeError, KeyError, AttributeError):  # empty or garbage: not an attempt of ours
    fresh = False
  if not fresh:
    store.write(key, None, if_equal=held.stamp.generation).result()


def try_claim(dst: epath.Path, stale_after: float = 300.0, heartbeat: float = 30.0
              ) -> Lease | None:
  """The lease on `dst`, or None while a live attempt holds it. Breaks stale ones."""
  store = _kvstore(dst.parent)
  key = dst.name + SUFFIX
  stamp = store.write(key, _body(), if_equal=_NO_VALUE).result()
  if stamp.generation:
    return Lease(store, key, stamp.generation, heartbeat)
  _break_if_stale(store, key, stale_after, not files.is_gcs(dst))
  return None


def clear_stale(dst: epath.Path, stale_after: float = 300.0) -> None:
  """Remove a stale lease beside `dst` (a killed run's, left beside an output
  it had committed); a live one stays."""
  _break_if_stale(_kvstore(dst.parent), dst.name + SUFFIX, stale_after, not files.is_gcs(dst))


def claim(dst: epath.Path, wait: float = 3600.0, poll: float = 0.5, **kwargs) -> Lease:
  """Wait (up to `wait` seconds) for the lease on `dst`, then hold it."""
  deadline = time.monotonic() + wait
  while True:
    lease = try_claim(dst, **kwargs)
    if lease is not None:
      return lease
    if time.monotonic() > deadline:
      raise TimeoutError(f'{dst} is being written by another attempt that held its '
                         f'lease for over {wait:.0f} s')
    time.sleep(poll)
