"""A worker's memory stays flat over a night's checkpoints.

Instrumented, not timed: what Python allocates and keeps (tracemalloc) over
many reads of an OCDBT index, and over many whole migrations, is bounded by
a constant, not by how many there were. TensorStore's JSON results used to
keep every key and value (`storage.json_results`): 100 KB a checkpoint.
"""
from __future__ import annotations

import gc
import shutil
import sys
import tracemalloc

import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

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
  `warm` calls have filled what caches there are."""
  for i in range(warm):
    work(i)
  gc.collect()
  tracemalloc.start()
  try:
    before = tracemalloc.get_traced_memory()[0]
    for i in range(warm, warm + measured):
      work(i)
    gc.collect()
    return tracemalloc.get_traced_memory()[0] - before
  finally:
    tracemalloc.stop()


def test_released_results_hold_no_reference_too_many():
  spec = json_results.released(ts.KvStore.Spec({'driver': 'memory', 'path': 'x/'}).to_json())
  count = sys.getrefcount(spec['path'])  # not in the assert: pytest keeps what it shows
  assert count == 2  # the dict's and getrefcount's argument


def test_reading_an_ocdbt_index_2000_times_keeps_nothing(tmp_path):
  [tree] = _small_checkpoints(tmp_path, 1)
  kept = _kept(lambda _: storage.ocdbt_index(epath.Path(tree)), 50, 2000)
  assert kept < 50_000, f'{kept} bytes kept over 2000 reads'  # was 13 MB


def test_migrations_keep_no_memory_per_checkpoint(tmp_path):
  sources = _small_checkpoints(tmp_path, 260)
  surgery = worker.surgery_for(demo.SEED_SPEC)

  def migrate_one(i):
    assert migrate.migrate_one(sources[i], str(tmp_path / 'out' / str(i)), surgery)['status'] == 'ok'

  kept = _kept(migrate_one, 60, 200)
  assert kept < 400_000, f'{kept} bytes kept over 200 migrations'  # was 14 MB
