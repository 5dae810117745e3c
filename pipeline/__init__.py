"""Beam glue for ckpt-surgery: discovery, checkpoint I/O, the DoFn, the report.

What an op does lives in `transforms`; this package moves checkpoints.
"""
import ctypes
import gc
import os

# A worker restores whole checkpoints next to Orbax's host buffers: JAX must
# not take most of each GPU's memory up front (read when a backend starts).
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

ARENAS = 2  # malloc arenas per process (see _limit_heap_arenas)


def _limit_heap_arenas(arenas: int = ARENAS) -> None:
  """Let glibc's malloc keep `arenas` heaps in this process, not up to 8 per
  core. It gives each thread that contends for the heap an arena of its own
  and keeps what is freed there, so with TensorStore's many I/O threads a
  worker's RSS grew by about a checkpoint's bytes with every checkpoint,
  though nothing leaked. With two, the next checkpoint reuses what the last
  one freed: measured on 32 checkpoints of 32 MB, peak RSS 0.7 GB where
  unlimited arenas reached 1.7 GB, and no malloc_trim after each
  checkpoint, whose page faults cost more time than the trim saved memory.
  Worker processes get it from MALLOC_ARENA_MAX, before their first thread
  (`cli.main` sets it for those it starts; deploy/Dockerfile on Dataflow): a
  worker imports us only once its runner's threads hold arenas. A user's
  MALLOC_ARENA_MAX wins; not glibc, nothing to do."""
  if 'MALLOC_ARENA_MAX' in os.environ:
    return
  try:
    ctypes.CDLL('libc.so.6').mallopt(-8, arenas)  # M_ARENA_MAX
  except (OSError, AttributeError):
    pass


_limit_heap_arenas()


def release_freed_memory() -> None:
  """Free what is no longer used, and hand what malloc holds freed back to
  the system (glibc's malloc_trim). A streamed checkpoint calls it after
  each pack. The collector first, of the young generations only (a full
  collection of a worker's objects costs about 0.1 s): a pack's restored
  arrays are left in reference cycles on the way, which only a collection
  frees. Then the trim, so what
  a pack freed is free for the other checkpoint in flight too, not kept in
  this one's heap: measured on 0.9 GB under a 512 MB budget, the process's
  RSS after the last pack was 0.07 to 0.10 GB over idle with it, 0.5 to 0.8
  GB without. Its cost, the next pack's buffers faulting in anew, is per
  pack, not per leaf.

  MigrateFn calls it every TRIM_EVERY checkpoints too. Over many small
  checkpoints on gs:// the heap in use is flat, but what TensorStore's and
  gcsfs's requests free between live blocks stayed resident, 14 KB a
  checkpoint (17 KB of RSS; 2 KB with a trim). A trim takes about 6 ms:
  every 50 checkpoints it is 0.1 ms each."""
  gc.collect(1)
  try:
    ctypes.CDLL('libc.so.6').malloc_trim(0)
  except (OSError, AttributeError):
    pass

import importlib

# Imported when first named (PEP 562): `ckpt-surgery plan` and `inspect` never
# import Beam, and a worker imports only the modules its DoFn needs.
_EXPORTS = {
    'DiscoveryError': 'pipeline.checkpoint.discovery', 'discover': 'pipeline.checkpoint.discovery',
    'MigrateFn': 'pipeline.migrate_fn', 'migrate_one': 'pipeline.migrate',
    'MigrateCheckpoints': 'pipeline.run', 'WriteReport': 'pipeline.run',
    'run_migration': 'pipeline.run',
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
