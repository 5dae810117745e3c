"""A worker's memory stays flat over a night's checkpoints.

Instrumented, not timed: what Python allocates and keeps (tracemalloc) over
many reads of an OCDBT index, and over many whole migrations, is bounded by
a constant, not by how many there were. TensorStore's JSON results used to
keep every key and value (`storage.json_results`): 100 KB a checkpoint.
"""
from __future__ import annotations

import gc
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import tracemalloc
import warnings

import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from etils import epath

import pipeline
from pipeline import demo, migrate, storage
from pipeline.compute import worker
from pipeline.storage import json_results


def _small_checkpoints(root, count):
  first = root / 'in' / '0'
  params = {f'Dense_{i}': {'kernel': np.ones((4, 4), np.float32), 'bias': np.zeros(4, np.float32)}
            for i in range(3)}
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(epath.Path(first), {'params': params, 'opt_state': [{'mu': params, 'nu': params}]})
  checkpointer.wait_until_finished()
  for i in range(1, count):
    shutil.copytree(first, root / 'in' / str(i))
  return [str(root / 'in' / str(i)) for i in range(count)]


def _kept(work, warm, measured):
  """Bytes Python still holds after `measured` more calls of `work`, once
  `warm` calls have filled what caches there are: the smaller of two
  windows of `measured` // 2 calls each. A leak is in both; a table that
  doubles once (the interpreter's interned names: 3.7 MB on Python 3.13)
  is one allocation, in one window. Without logging or warnings: pytest
  keeps every record and warning it captures until the test ends (at INFO,
  Orbax's lines alone are 5 KB a migration), which is the test's memory,
  not a worker's."""
  for i in range(warm):
    work(i)
  gc.collect()
  logging.disable(logging.CRITICAL)
  grown = []
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    tracemalloc.start()
    try:
      for start in (warm, warm + measured // 2):
        before = tracemalloc.get_traced_memory()[0]
        for i in range(start, start + measured // 2):
          work(i)
        gc.collect()
        grown.append(tracemalloc.get_traced_memory()[0] - before)
    finally:
      tracemalloc.stop()
      logging.disable(logging.NOTSET)
  return min(grown)


def test_released_results_hold_no_reference_too_many():
  spec = json_results.released(ts.KvStore.Spec({'driver': 'memory', 'path': 'x/'}).to_json())
  count = sys.getrefcount(spec['path'])  # not in the assert: pytest keeps what it shows
  assert count == 2  # the dict's and getrefcount's argument


def test_reading_an_ocdbt_index_2000_times_keeps_nothing(tmp_path):
  [tree] = _small_checkpoints(tmp_path, 1)
  kept = _kept(lambda _: storage.ocdbt_index(epath.Path(tree)), 50, 2000)
  assert kept < 25_000, f'{kept} bytes kept over 1000 reads'  # was 6.5 MB


def kept_over_migrations(root: str, warm: int, measured: int) -> int:
  """What `_kept` says of `warm` then `measured` migrations under `root`."""
  sources = _small_checkpoints(pathlib.Path(root), warm + measured)
  surgery = worker.surgery_for(demo.SEED_SPEC)

  def migrate_one(i):
    assert migrate.migrate_one(sources[i], f'{root}/out/{i}', surgery)['status'] == 'ok'

  return _kept(migrate_one, warm, measured)


def test_migrations_keep_no_memory_per_checkpoint(tmp_path):
  """In a process of its own, as a worker is: what the suite's earlier
  tests and pytest's own captures hold is no checkpoint's."""
  measured = subprocess.run(
      [sys.executable, '-c', 'from tests.test_memory import kept_over_migrations; '
       f'print(kept_over_migrations({str(tmp_path)!r}, 50, 150))'],
      capture_output=True, text=True, check=True, cwd=pathlib.Path(__file__).parent.parent)
  kept = int(measured.stdout.split()[-1])
  # Was 5 MB; now 20 KB on Python 3.11, 130 KB on 3.13 (asyncio's small objects there).
  assert kept < 500_000, f'{kept} bytes kept over 75 migrations'


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason="glibc's malloc_trim")
def test_freed_memory_between_live_blocks_goes_back_to_the_system():
  """What a worker frees stays resident under glibc until trimmed: on gs://
  14 KB a checkpoint, with the heap in use flat (`release_freed_memory`,
  which MigrateFn calls every TRIM_EVERY checkpoints)."""
  def resident():
    return int(pathlib.Path('/proc/self/statm').read_text().split()[1]) * os.sysconf('SC_PAGE_SIZE')

  blocks = [bytes(3000) for _ in range(50_000)]  # 150 MB through malloc, not Python's own pools
  above = bytes(3000)  # allocated after them: the heap's top stays in use, so free() cannot trim it
  del blocks
  before = resident()
  pipeline.release_freed_memory()
  assert before - resident() > 75_000_000 and above
