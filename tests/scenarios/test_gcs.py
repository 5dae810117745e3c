"""gs:// in and out, against a real GCS-protocol server (gcp-storage-emulator).

The `gcs` fixture points this process at the server through
`pipeline.storage.use_gcs_emulator`, the function users call for their own
emulator; the CLI processes started here, and the local runner's workers,
inherit it.
"""
from __future__ import annotations

import asyncio
import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from etils import epath

from pipeline import migrate, storage
from pipeline.checkpoint import discovery
from pipeline.compute import worker
from pipeline.demo import SEED_SPEC
from tests.test_cli import cli


def report(prefix):
  out = epath.Path(prefix) / '_surgery'
  records = [json.loads(l) for l in (out / 'report.jsonl').read_text().splitlines()]
  return records, json.loads((out / 'summary.json').read_text())


def restore(path):
  return ocp.PyTreeCheckpointer().restore(epath.Path(str(path)))


def seed_applied(src, dst):
  """dst is src with the seed's normalize, by the guide's own steps."""
  before, after = restore(src), restore(dst)
  kernel = before['params']['Dense_1']['kernel']
  want = kernel / np.linalg.norm(np.asarray(kernel, np.float64)).astype(np.float32)
  np.testing.assert_allclose(after['params']['Dense_1']['kernel'], want, rtol=1e-6)
  same = jax.tree_util.tree_map(lambda a, b: np.array_equal(a, b), after['opt_state'], before['opt_state'])
  return all(jax.tree_util.tree_leaves(same))


def test_gs_to_gs_with_spec_on_gs(gcs_samples, bucket, tmp_path):
  spec = epath.Path(bucket) / 'specs' / 'seed.yaml'
  spec.parent.mkdir(parents=True, exist_ok=True)
  spec.write_text(SEED_SPEC)
  out = bucket + '/v2'
  result = cli('run', '--input', gcs_samples + '/*', '--output', out, '--spec', spec)
  assert result.returncode == 0, result.stderr
  records, summary = report(out)
  assert (summary['ok'], summary['failed']) == (4, 0)
  # Copy-through on GCS too: all but the normalized kernel carried as stored bytes.
  assert 0 < summary['bytes_carried'] < summary['bytes_written']
  assert sorted(r['dst'] for r in records) == [
      out + '/run_a/1', out + '/run_a/2', out + '/run_b', out + '/run_c']
  assert seed_applied(gcs_samples + '/run_b', out + '/run_b')
  # The CheckpointManager root on gs:// stays one, with its committed steps.
  with ocp.CheckpointManager(epath.Path(out) / 'run_a') as manager:
    assert manager.all_steps() == [1, 2]
  assert all((epath.Path(r['dst']) / 'commit_success.txt').exists() for r in records)


def test_local_to_gs_and_gs_to_local(inputs, gcs_samples, bucket, tmp_path):
  spec = tmp_path / 'spec.yaml'
  spec.write_text(SEED_SPEC)
  result = cli('run', '--input', inputs / 'run_b', '--output', bucket + '/up', '--spec', spec)
  assert result.returncode == 0, result.stderr
  assert seed_applied(inputs / 'run_b', bucket + '/up/run_b')
  result = cli('run', '--input', gcs_samples + '/run_a', '--output', tmp_path / 'down', '--spec', spec)
  assert result.returncode == 0, result.stderr
  assert sorted(p.name for p in (tmp_path / 'down' / 'run_a').iterdir()) == ['1', '2']
  assert seed_applied(gcs_samples + '/run_a/2/default', tmp_path / 'down' / 'run_a' / '2' / 'default')


def test_uncommitted_on_gcs_is_never_taken(gcs, bucket, gcs_samples):
  """On GCS the commit is commit_success.txt: without it, a directory is not done."""
  state = restore(gcs_samples + '/run_b')
  ocp.PyTreeCheckpointer().save(epath.Path(bucket) / 'runs' / 'done', state)
  ocp.PyTreeCheckpointer().save(epath.Path(bucket) / 'runs' / 'half', state)
  (epath.Path(bucket) / 'runs' / 'half' / 'commit_success.txt').unlink()
  assert [s for s, _ in discovery.discover(bucket + '/runs/*')] == [bucket + '/runs/done']


def test_transient_503s_are_survived_with_nothing_lost(gcs, gcs_samples, bucket, tmp_path):
  spec = tmp_path / 'spec.yaml'
  spec.write_text(SEED_SPEC)
  out = bucket + '/flaky'
  failed_before = gcs.failed
  print('faults injected:', end=' ')
  gcs.fail_every = 20  # every 20th request to the server answers 503
  try:
    result = cli('run', '--input', gcs_samples + '/run_b', '--output', out, '--spec', spec)
  finally:
    gcs.fail_every = 0
  print(gcs.failed - failed_before)
  assert gcs.failed - failed_before >= 3, 'the proxy injected too few faults to prove anything'
  assert result.returncode == 0, result.stderr
  records, summary = report(out)
  assert (summary['ok'], summary['failed']) == (1, 0)
  assert seed_applied(f'{gcs_samples}/run_b', f'{out}/run_b')


def test_missing_bucket_exits_2_before_any_write(gcs, gcs_samples, bucket, tmp_path):
  spec = tmp_path / 'spec.yaml'
  spec.write_text(SEED_SPEC)
  result = cli('run', '--input', 'gs://no-such-bucket/runs/*', '--output', bucket + '/o', '--spec', spec)
  assert result.returncode == 2
  assert 'input bucket gs://no-such-bucket does not exist' in result.stderr
  result = cli('run', '--input', gcs_samples + '/*', '--output', 'gs://no-such-out/v2', '--spec', spec)
  assert result.returncode == 2
  assert 'output bucket gs://no-such-out does not exist' in result.stderr
  assert not epath.Path(bucket + '/o').exists()


def test_transient_errors_are_retried_then_permanent_ones_fail(inputs, tmp_path, monkeypatch):
  """migrate_one retries what the storage libraries' own retries left over,
  whichever writer meets it."""
  from pipeline.write import copy_patch, orbax_save
  calls = []

  def flaky(write):
    def flaky_write(*args, **kwargs):
      calls.append(1)
      if len(calls) == 1:
        raise OSError('PUT returned HTTP 503: backend unavailable')
      return write(*args, **kwargs)
    return flaky_write

  def forbidden(*args, **kwargs):
    raise PermissionError('HTTP 403: caller does not have storage.objects.create access')

  for module, name in ((orbax_save, 'save'), (copy_patch, 'begin')):
    monkeypatch.setattr(module, name, flaky(getattr(module, name)))
  worker.WORKER.clear()
  rec = migrate.migrate_one(str(inputs / 'run_b'), str(tmp_path / 'o' / 'run_b'),
                            worker.surgery_for(SEED_SPEC), backoff=0.01)
  assert (rec['status'], rec['attempts']) == ('ok', 2)
  for module, name in ((orbax_save, 'save'), (copy_patch, 'begin')):
    monkeypatch.setattr(module, name, forbidden)
  rec = migrate.migrate_one(str(inputs / 'run_c'), str(tmp_path / 'o' / 'run_c'),
                            worker.surgery_for(SEED_SPEC), backoff=0.01)
  assert (rec['status'], rec['attempts']) == ('failed', 1) and '403' in rec['error']
  assert not (tmp_path / 'o' / 'run_c').exists()


@pytest.mark.parametrize('error, transient', [
    (OSError('HTTP 503 Service Unavailable'), True),
    (ValueError('UNAVAILABLE: connection reset by peer'), True),
    (ConnectionResetError(), True),
    (PermissionError('HTTP 403 Forbidden'), False),
    (FileNotFoundError('gs://b/x not found'), False),
])
def test_is_transient(error, transient):
  assert storage.is_transient(error) is transient


def test_half_written_output_on_gcs_is_redone_not_skipped(gcs, gcs_samples, bucket):
  """An output without commit_success.txt (a killed save) is not done: it is
  removed and written again, never reported as skipped."""
  src, dst = gcs_samples + '/run_c', bucket + '/half/run_c'
  worker.WORKER.clear()
  surgery = worker.surgery_for(SEED_SPEC)
  assert migrate.migrate_one(src, dst, surgery)['status'] == 'ok'
  (epath.Path(dst) / 'commit_success.txt').unlink()
  rec = migrate.migrate_one(src, dst, surgery)
  assert rec['status'] == 'ok', rec
  assert (epath.Path(dst) / 'commit_success.txt').exists()
  assert migrate.migrate_one(src, dst, surgery)['status'] == 'skipped'
  assert seed_applied(src, dst)


def test_overwrite_on_gcs_swaps_in_the_verified_output(gcs, gcs_samples, bucket):
  """--overwrite on gs://, where a rename is a copy and a delete: the new
  output replaces the old whole, and a swap killed halfway is rolled forward."""
  from pipeline import checkpoint
  from pipeline.write import outputs
  src, dst = gcs_samples + '/run_b', epath.Path(bucket + '/swap/run_b')
  worker.WORKER.clear()
  assert migrate.migrate_one(src, str(dst), worker.surgery_for(SEED_SPEC))['status'] == 'ok'
  other = worker.surgery_for(SEED_SPEC + "  - scale: {match: 'bias$', by: 2.0}\n")
  rec = migrate.migrate_one(src, str(dst), other, migrate.Settings(overwrite=True))
  assert rec['status'] == 'ok', rec['error']
  assert checkpoint.read_provenance(dst)['spec_hash'] == other.spec.hash
  assert sorted(p.name for p in dst.parent.iterdir()) == ['run_b']
  # Killed after the old output's removal began, before the new one was in place.
  new = outputs.sibling(dst, outputs.NEW)
  assert migrate.migrate_one(src, str(new), worker.surgery_for(SEED_SPEC))['status'] == 'ok'
  outputs.sibling(dst, outputs.ATTEMPT).write_text(outputs.SWAPPING)
  (dst / 'commit_success.txt').unlink()
  outputs.recover(dst)
  assert checkpoint.is_checkpoint(dst) and sorted(p.name for p in dst.parent.iterdir()) == ['run_b']
  assert checkpoint.read_provenance(dst)['spec_hash'] == worker.surgery_for(SEED_SPEC).spec.hash
  assert seed_applied(src, str(dst))


def test_writers_of_one_ocdbt_from_several_contexts_lose_nothing(bucket):
  """Orbax's handlers, and copy-through's copies, write one OCDBT tree each
  from its own TensorStore context; their manifest updates must all land."""
  base = {'driver': 'ocdbt', 'base': f'{bucket}/tree/'}

  async def write(writer):
    store = await ts.KvStore.open(base, context=ts.Context())
    for k in range(6):
      await store.write(f'w{writer}/k{k}', b'x')

  async def write_all():
    await asyncio.gather(*(write(w) for w in range(4)))
    return await (await ts.KvStore.open(base, context=ts.Context())).list()

  assert len(asyncio.run(write_all())) == 4 * 6
