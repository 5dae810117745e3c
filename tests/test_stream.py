"""Streaming: a checkpoint over the memory budget is migrated a pack of
dependency groups at a time, holding no more than the budget, into outputs
that restore bit for bit as the unbounded path's; a leaf over the budget
streams a slab at a time where its computation allows it, and fails by
name where not; a kill mid-stream leaves nothing a rerun takes as done."""
from __future__ import annotations

import json
import signal
import subprocess
import sys

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from pipeline import checkpoint, migrate, storage
from pipeline.compute import stream, worker
from pipeline.write import copy_patch, outputs
from tests.conftest import mlp, trained
from tests.test_copy_through import restored_bits

NORMALIZE = "ops: [{rename: {match: '^Dense_0/', to: 'Linear_0/'}}, {normalize: {match: 'kernel$'}}]"
CAST = "ops: [{cast: {match: '.*', dtype: bfloat16, opt_state: follow}}]"
RENAME = "ops: [{rename: {match: '^Dense_0/', to: 'Linear_0/'}}]"
STACK = r"ops: [{stack: {match: '^Dense_([1-4])/(.*)$', to: 'layers/\2', axis: 0}}]"
SIZES = (8, 32, 32, 32, 32, 32, 4)  # Dense_1 to Dense_4 alike: one compilation serves them
BUDGET = 24 << 10  # bytes (packs of half that): several packs of this tree's ~60 KB


def write(path, layout: str, use_ocdbt: bool = True, sizes=SIZES) -> None:
  """An Adam checkpoint: a PyTree tree, or a CheckpointManager step of
  params, opt_state and a JSON item."""
  params, opt_state = trained(optax.adam(1e-2), mlp(sizes))
  if layout == 'pytree':
    ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=use_ocdbt)).save(
        path, {'params': params, 'opt_state': opt_state, 'step': 3})
    return
  handler = ocp.CompositeCheckpointHandler(
      params=ocp.PyTreeCheckpointHandler(use_ocdbt=use_ocdbt),
      opt_state=ocp.PyTreeCheckpointHandler(use_ocdbt=use_ocdbt), meta=ocp.JsonCheckpointHandler())
  ocp.Checkpointer(handler).save(path, args=ocp.args.Composite(
      params=ocp.args.PyTreeSave(params), opt_state=ocp.args.PyTreeSave(opt_state),
      meta=ocp.args.JsonSave({'step': 3})))


def migrated(src, dst, spec, **settings):
  worker.WORKER.clear()
  return migrate.migrate_one(str(src), str(dst), worker.surgery_for(spec),
                             migrate.Settings(**settings), attempts=1)


@pytest.fixture
def restores(monkeypatch):
  """The array bytes each restore of an input reads, in order, and as each
  pack is written (negated) the bytes of every array alive in the process,
  but those alive before the test (what earlier tests' modules hold)."""
  calls = []
  real_restore, real_pack = checkpoint.restore, copy_patch.write_pack
  before = sum(x.nbytes for x in jax.live_arrays())

  def restore(path, like=None, devices=None):
    if like is not None and 'in' in str(path).split('/')[-1]:
      arrays = [x for x in jax.tree_util.tree_leaves(like)
                if checkpoint.is_array(x) and not checkpoint.skipped(x)]
      calls.append(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in arrays))
    return real_restore(path, like, devices)

  def write_pack(work, patches, arrays):
    calls.append(-max(0, sum(x.nbytes for x in jax.live_arrays()) - before))
    return real_pack(work, patches, arrays)

  monkeypatch.setattr(checkpoint, 'restore', restore)
  monkeypatch.setattr(copy_patch, 'write_pack', write_pack)
  return calls


@pytest.mark.parametrize('layout,use_ocdbt', [('pytree', True), ('pytree', False), ('step', True)])
@pytest.mark.parametrize('spec,settings,path,budget', [
    (NORMALIZE, {}, 'copy_and_patch', BUDGET), (CAST, {}, 'full', BUDGET),
    (STACK, {}, 'copy_and_patch', 80 << 10),  # a stacked leaf and its 4 sources are one group: 32 KB
    (RENAME, {'full_decode': True}, 'full', BUDGET)], ids=['normalize', 'cast', 'stack', 'full_decode'])
def test_streamed_outputs_equal_the_unbounded_paths(tmp_path, layout, use_ocdbt, spec, settings,
                                                    path, budget, restores):
  src = tmp_path / 'in'
  write(src, layout, use_ocdbt)
  whole = migrated(src, tmp_path / 'whole', spec, **settings)
  assert whole['status'] == 'ok' and whole['packs'] == 0, whole['error']
  restores.clear()
  rec = migrated(src, tmp_path / 'streamed', spec, memory_budget=budget, **settings)
  assert (rec['status'], rec['write_path']) == ('ok', path), rec['error']
  assert rec['packs'] > 2 and rec['memory_budget'] == budget
  assert restored_bits(tmp_path / 'streamed', layout) == restored_bits(tmp_path / 'whole', layout)
  # One pack at a time: each restore of the input's arrays reads at most a
  # pack's share of the budget, each pack is written before the next is
  # read, and no more than a pack's arrays are alive as it is written.
  limit = stream.pack_limit(budget)
  reads = [c for c in restores if c > 0]
  assert reads and max(reads) <= limit
  assert all(a <= 0 for a, b in zip(restores, restores[1:]) if b > 0)
  assert all(-c <= limit for c in restores if c <= 0), (limit, str(restores))


def test_layers_alike_share_one_compilation(tmp_path):
  """Normalizing 6 kernels of 3 shapes compiles 3 group functions, not 6:
  Dense_1 to Dense_4 are alike. A second checkpoint compiles nothing."""
  write(tmp_path / 'a', 'pytree')
  write(tmp_path / 'b', 'pytree')
  worker.WORKER.clear()
  surgery = worker.surgery_for(NORMALIZE)
  settings = migrate.Settings(memory_budget=BUDGET)
  first = migrate.migrate_one(str(tmp_path / 'a'), str(tmp_path / 'out' / 'a'), surgery, settings)
  second = migrate.migrate_one(str(tmp_path / 'b'), str(tmp_path / 'out' / 'b'), surgery, settings)
  assert first['status'] == second['status'] == 'ok', (first['error'], second['error'])
  assert first['packs'] > 1 and (first['compilations'], second['compilations']) == (3, 0)
  assert first['compiled'] and not second['compiled']


def test_a_leaf_over_the_budget_is_cast_a_slab_at_a_time(tmp_path, monkeypatch):
  """A 256 KB kernel under a 64 KB budget: cast, scaled and padded (along
  its second axis) in slabs of whole chunks, bit for bit as the unbounded path."""
  src = tmp_path / 'in'
  write(src, 'pytree', sizes=(512, 128, 4))
  spec = ("ops: [{scale: {match: 'Dense_0/kernel', by: 0.5}}, "
          "{pad: {match: 'Dense_0/kernel', axis: 1, to: 160, mirror_init: zeros}}, "
          "{cast: {match: '.*', dtype: bfloat16, opt_state: follow}}]")
  whole = migrated(src, tmp_path / 'whole', spec)
  slabs = []
  real = copy_patch.write_pack

  def write_pack(work, patches, arrays):
    slabs.extend((n, x.start, len(x.value)) for named in arrays.values() for n, x in named.items()
                 if isinstance(x, copy_patch.Slab))
    return real(work, patches, arrays)

  monkeypatch.setattr(copy_patch, 'write_pack', write_pack)
  rec = migrated(src, tmp_path / 'streamed', spec, memory_budget=64 << 10)
  assert rec['status'] == whole['status'] == 'ok', (rec['error'], whole['error'])
  names = {n for n, _, _ in slabs}
  assert 'params.Dense_0.kernel' in names and len(slabs) > 2 * len(names)
  rows = sorted((start, n) for name, start, n in slabs if name == 'params.Dense_0.kernel')
  assert [s for s, _ in rows] == list(np.cumsum([0] + [n for _, n in rows[:-1]]))
  assert sum(n for _, n in rows) == 512
  assert restored_bits(tmp_path / 'streamed', 'pytree') == restored_bits(tmp_path / 'whole', 'pytree')
  kernel = ocp.PyTreeCheckpointer().restore(tmp_path / 'streamed')['params']['Dense_0']['kernel']
  assert kernel.shape == (512, 160) and kernel.dtype == np.dtype('bfloat16')
  zarray = json.loads(storage.ocdbt_index(tmp_path / 'streamed')[b'params.Dense_0.kernel/.zarray'])
  assert zarray['chunks'][1:] == [160] and all(s % zarray['chunks'][0] == 0 for s, _ in rows)


@pytest.mark.parametrize('fault', ['misaligned', 'dropped'])
def test_a_slab_out_of_place_fails_the_checkpoint(tmp_path, monkeypatch, fault):
  """Slabs that are not whole chunks, or a slab that never reaches the
  writer, fail the checkpoint by name and leave nothing at dst: a chunk
  partly written would otherwise restore as fill values."""
  src, out = tmp_path / 'in', tmp_path / 'out'
  write(src, 'pytree', sizes=(512, 128, 4))
  if fault == 'misaligned':
    real_rows = stream.Run._slab_rows
    monkeypatch.setattr(stream.Run, '_slab_rows', lambda self, *a: real_rows(self, *a) - 1)
  else:
    real_pack, seen = copy_patch.write_pack, []

    def drop_the_second_slab(work, patches, arrays):
      if any(isinstance(x, copy_patch.Slab) for named in arrays.values() for x in named.values()):
        seen.append(1)
        if len(seen) == 2:
          return None
      return real_pack(work, patches, arrays)

    monkeypatch.setattr(copy_patch, 'write_pack', drop_the_second_slab)
  rec = migrated(src, out / 'x', CAST, memory_budget=64 << 10)
  assert rec['status'] == 'failed' and 'VerificationError' in rec['error'], rec['error']
  assert 'params.Dense_0.kernel' in rec['error'] or 'Dense_0' in rec['error'], rec['error']
  assert list(out.iterdir()) == []


def test_a_leaf_over_the_budget_that_cannot_stream_fails_by_name(tmp_path):
  src, out = tmp_path / 'in', tmp_path / 'out'
  write(src, 'pytree', sizes=(512, 128, 4))
  before = {p.name for p in src.iterdir()}
  rec = migrated(src, out / 'x', "ops: [{normalize: {match: 'Dense_0/kernel'}}]",
                 memory_budget=64 << 10)
  assert rec['status'] == 'failed'
  assert 'params/Dense_0/kernel' in rec['error'] and 'budget of 65536 bytes' in rec['error'], rec['error']
  assert '524288 bytes' in rec['error'] and 'not elementwise' in rec['error'], rec['error']
  assert list(out.iterdir()) == [] and {p.name for p in src.iterdir()} == before


KILLED = """
import os, signal, sys
from pipeline import migrate
from pipeline.compute import worker
from pipeline.write import copy_patch
real, packs = copy_patch.write_pack, []
def die_on_the_third(*args):
  packs.append(1)
  if len(packs) == 3:
    os.kill(os.getpid(), signal.SIGKILL)
  return real(*args)
copy_patch.write_pack = die_on_the_third
migrate.migrate_one(sys.argv[1], sys.argv[2], worker.surgery_for(sys.argv[3]),
                    migrate.Settings(memory_budget=int(sys.argv[4])))
"""


@pytest.mark.parametrize('spec', [NORMALIZE, CAST], ids=['copy_and_patch', 'fresh'])
def test_kill_9_mid_stream_leaves_nothing_a_rerun_takes_as_done(tmp_path, spec):
  src, dst = tmp_path / 'in', tmp_path / 'out' / 'x'
  write(src, 'pytree')
  dst.parent.mkdir()
  killed = subprocess.run([sys.executable, '-c', KILLED, str(src), str(dst), spec, str(BUDGET)])
  assert killed.returncode == -signal.SIGKILL
  assert not checkpoint.is_checkpoint(dst) and not dst.exists()
  rec = migrated(src, dst, spec, memory_budget=BUDGET)
  assert rec['status'] == 'ok' and rec['packs'] > 2, rec['error']
  assert sorted(p.name for p in dst.parent.iterdir()) == ['x']  # the killed attempt's work is gone
  assert outputs.provenance(dst)['src'] == str(src)


def test_the_default_budget_shares_a_cores_memory(monkeypatch):
  monkeypatch.setattr(stream.os, 'cpu_count', lambda: 4)
  budget = stream.default_budget(2)
  assert stream.default_budget(1) >= 2 * budget - 1 and budget >= stream.MIN_BUDGET


def test_plan_and_run_under_a_budget_from_the_command_line(tmp_path):
  """`plan --memory_budget` says how `run` holds each signature, and that a
  leaf over the budget that cannot go in slabs would fail; `run` streams
  under the budget it is given, on worker processes, and the summary
  reports the budget and each worker's peak."""
  from tests.test_cli import cli, read_report  # pylint: disable=g-import-not-at-top
  for name in ('a', 'b'):
    write(tmp_path / 'in' / name, 'pytree')
  spec = tmp_path / 'spec.yaml'
  spec.write_text(NORMALIZE)
  planned = cli('plan', '--input', tmp_path / 'in' / '*', '--spec', spec, '--memory_budget', '24KiB')
  assert planned.returncode == 0, planned.stderr
  assert 'memory: streamed under the budget of 24.6 KB: ' in planned.stdout, planned.stdout
  assert 'a worker needs about' in planned.stdout
  spec.write_text("ops: [{normalize: {match: 'kernel$'}}]")
  refused = cli('plan', '--input', tmp_path / 'in' / '*', '--spec', spec, '--memory_budget', '2KB',
                '--json')
  (group,) = json.loads(refused.stdout)['groups']
  assert refused.returncode == 1 and 'not elementwise' in group['error'], group
  assert {o['path'] for o in group['over_budget'] if not o['slabs']} >= {'params/Dense_1/kernel'}
  spec.write_text(CAST)
  out = tmp_path / 'out'
  ran = cli('run', '--input', tmp_path / 'in' / '*', '--output', out, '--spec', spec,
            '--memory_budget', '24KiB', '--direct_running_mode=multi_processing',
            '--direct_num_workers=2')
  assert ran.returncode == 0, ran.stderr
  records, summary = read_report(out)
  assert [r['packs'] > 2 for r in records] == [True, True]
  assert summary['streamed'] == 2 and summary['memory_budget'] == 24 << 10
  assert set(summary['peak_rss_over_idle_by_worker']) == {r['worker'] for r in records}
  assert 'streamed under a budget of 24.6 KB' in ran.stdout
