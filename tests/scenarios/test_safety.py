"""Safe to run twice: concurrent attempts, leases, untouched inputs."""
from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from pipeline import migrate
from pipeline.compute import worker
from pipeline.demo import SEED_SPEC
from pipeline.write import lease, outputs
from tests.test_cli import cli

ATTEMPT = '''
import json, sys
from pipeline import migrate
from pipeline.compute import worker
print(json.dumps(migrate.migrate_one(sys.argv[1], sys.argv[2], worker.surgery_for(sys.argv[3]))))
'''


def concurrent_attempts(src: str, dst: str, n: int = 3) -> list[dict]:
  """n processes migrating the same checkpoint at the same moment."""
  procs = [subprocess.Popen([sys.executable, '-c', ATTEMPT, src, dst, SEED_SPEC],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
           for _ in range(n)]
  return [json.loads(p.communicate(timeout=300)[0].splitlines()[-1]) for p in procs]


def siblings(dst: epath.Path) -> list[str]:
  return sorted(p.name for p in dst.parent.iterdir())


@pytest.mark.parametrize('where', ['local', 'gcs'])
def test_concurrent_attempts_write_once_and_agree(request, inputs, tmp_path, where):
  if where == 'gcs':
    request.getfixturevalue('gcs')
    src = request.getfixturevalue('gcs_samples') + '/run_b'
    dst = request.getfixturevalue('bucket') + '/out/run_b'
  else:
    src, dst = str(inputs / 'run_b'), str(tmp_path / 'out' / 'run_b')
  records = concurrent_attempts(src, dst)
  assert sorted(r['status'] for r in records) == ['ok', 'skipped', 'skipped'], records
  out = epath.Path(dst)
  assert siblings(out) == ['run_b']  # no temporaries, no lease left behind
  restored = ocp.PyTreeCheckpointer().restore(out)
  before = ocp.PyTreeCheckpointer().restore(epath.Path(src))
  kernel = np.asarray(before['params']['Dense_1']['kernel'])
  np.testing.assert_allclose(restored['params']['Dense_1']['kernel'], kernel / np.linalg.norm(kernel), rtol=1e-6)


def test_a_live_lease_is_respected_and_a_dead_ones_is_broken(tmp_path):
  dst = epath.Path(tmp_path) / 'out'
  held = lease.try_claim(dst)
  assert held is not None and lease.try_claim(dst) is None
  with pytest.raises(TimeoutError, match='being written by another attempt'):
    lease.claim(dst, wait=0.3, poll=0.1)
  held.release()
  # A holder that was killed: a process of this host that no longer exists.
  dead = subprocess.Popen([sys.executable, '-c', 'from etils import epath; from pipeline.write import lease; '
                           f'lease.try_claim(epath.Path({str(dst)!r})); import os; os._exit(0)'])
  dead.wait()
  assert siblings(dst) == ['out' + lease.SUFFIX]
  with lease.claim(dst, wait=5, poll=0.1):
    pass
  assert siblings(dst) == []  # released: nothing left beside the output


def test_a_lease_not_refreshed_goes_stale(tmp_path):
  dst = epath.Path(tmp_path) / 'out'
  held = lease.try_claim(dst, heartbeat=3600)
  held._stop.set()  # a holder on another machine that stopped beating
  assert lease.try_claim(dst, stale_after=3600) is None
  time.sleep(0.2)
  assert lease.try_claim(dst, stale_after=0.1) is None  # breaks it...
  assert lease.try_claim(dst, stale_after=0.1) is not None  # ...then claims


def digest(tree) -> str:
  h = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(tree)):
    dirs.sort()
    for name in sorted(files):
      path = os.path.join(root, name)
      h.update(path.encode())
      h.update(str(os.stat(path).st_mode).encode())
      with open(path, 'rb') as f:
        h.update(f.read())
  return h.hexdigest()


def test_inputs_are_never_written(inputs, tmp_path):
  """Not one byte, and no write is even attempted: the input tree is read-only."""
  spec = tmp_path / 'spec.yaml'
  spec.write_text(SEED_SPEC)
  for root, dirs, files in os.walk(inputs):
    for name in dirs + files:
      path = os.path.join(root, name)
      os.chmod(path, os.stat(path).st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
  os.chmod(inputs, 0o555)
  before = digest(inputs)  # contents, names and modes
  try:
    result = cli('run', '--input', inputs / '*', '--output', tmp_path / 'out', '--spec', spec)
    assert result.returncode == 0, result.stderr
    again = cli('run', '--input', inputs / '*', '--output', tmp_path / 'out', '--spec', spec,
                '--overwrite')
    assert again.returncode == 0, again.stderr
    assert digest(inputs) == before
  finally:
    for root, dirs, files in os.walk(inputs):
      os.chmod(root, 0o755)


def test_nonfinite_results_fail_unless_allowed(inputs, tmp_path):
  spec = "ops: [{scale: {match: '^Dense_1/kernel$', by: .inf}}]"
  worker.WORKER.clear()
  rec = migrate.migrate_one(str(inputs / 'run_b'), str(tmp_path / 'o' / 'run_b'), worker.surgery_for(spec))
  assert rec['status'] == 'failed'
  assert 'non-finite values (NaN or inf) in 1 leaf(s): params/Dense_1/kernel' in rec['error']
  assert not (tmp_path / 'o' / 'run_b').exists()
  rec = migrate.migrate_one(str(inputs / 'run_b'), str(tmp_path / 'o' / 'run_b'), worker.surgery_for(spec),
                            migrate.Settings(allow_nonfinite=True))
  assert rec['status'] == 'ok'


@pytest.mark.parametrize('writer', ['copy_and_patch', 'full'])
def test_an_output_that_does_not_read_back_as_computed_is_removed(inputs, tmp_path, monkeypatch,
                                                                   writer):
  """A writer that commits something else than what was computed (a bug, a
  bad disk) is caught by reading the output back, and the output removed."""
  from pipeline.write import copy_patch, orbax_save
  real_save, real_pack = orbax_save.save, copy_patch.write_pack
  changed = lambda kernel: kernel.at[0, 0].add(1.0)  # the leaf the seed's surgery computes

  def corrupting_save(path, layout, items, provenance):
    state = layout.join(items)
    state['params']['Dense_1']['kernel'] = changed(state['params']['Dense_1']['kernel'])
    real_save(path, layout, layout.split(state, items), provenance)

  def corrupting_pack(work, patches, arrays):
    (named,) = arrays.values()
    named['params.Dense_1.kernel'] = changed(named['params.Dense_1.kernel'])
    return real_pack(work, patches, arrays)

  monkeypatch.setattr(orbax_save, 'save', corrupting_save)
  monkeypatch.setattr(copy_patch, 'write_pack', corrupting_pack)
  worker.WORKER.clear()
  rec = migrate.migrate_one(str(inputs / 'run_b'), str(tmp_path / 'o' / 'run_b'),
                            worker.surgery_for(SEED_SPEC),
                            migrate.Settings(full_decode=writer == 'full'), attempts=1)
  assert rec['write_path'] is None  # failed records name no writer
  assert rec['status'] == 'failed' and 'VerificationError' in rec['error']
  assert 'params/Dense_1/kernel' in rec['error']
  assert sorted(p.name for p in (tmp_path / 'o').iterdir()) == []


def test_provenance_records_the_digest(inputs, tmp_path):
  from pipeline import checkpoint
  worker.WORKER.clear()
  rec = migrate.migrate_one(str(inputs / 'run_b'), str(tmp_path / 'o' / 'run_b'), worker.surgery_for(SEED_SPEC))
  provenance = checkpoint.read_provenance(epath.Path(tmp_path / 'o' / 'run_b'))
  assert provenance['digest'] == rec['digest'] and provenance['checksums']
  assert len(provenance['checksums']) + len(provenance['carried']) > 10
  assert {'src', 'spec_hash', 'spec', 'version', 'time'} <= set(provenance)
  shown = cli('inspect', tmp_path / 'o' / 'run_b').stdout
  assert f'"digest": "{rec["digest"]}"' in shown and 'leaves"' in shown


FAULTS = os.path.join(os.path.dirname(__file__), 'faults')


def start_run(inputs, out, spec, slow_commit: float) -> subprocess.Popen:
  env = {**os.environ, 'PYTHONPATH': FAULTS + os.pathsep + os.environ.get('PYTHONPATH', ''),
         'CKPT_SURGERY_TEST_SLOW_COMMIT': str(slow_commit)}
  return subprocess.Popen(
      [sys.executable, '-m', 'pipeline', 'run', '--input', str(inputs / '*'), '--output', str(out),
       '--spec', str(spec), '--direct_num_workers=2'],
      env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


NAMES = ['run_a/1', 'run_a/2', 'run_a/3', 'run_b', 'run_c', 'run_d']


def committed(out) -> set[str]:
  from pipeline import checkpoint
  return {n for n in NAMES if checkpoint.is_checkpoint(epath.Path(out) / n)}


def assert_whole(dst: epath.Path) -> None:
  """dst reads back with exactly the checksums its provenance recorded for
  the leaves it computed, and holds the leaves it carried."""
  import transforms
  from pipeline import checkpoint
  provenance = checkpoint.read_provenance(dst)
  recorded = provenance['checksums']
  layout, items = checkpoint.restore(dst)
  back = transforms.fingerprints(layout.join(items))
  assert set(back) == set(recorded) | set(provenance['carried'])
  assert {p: back[p].checksum for p in recorded} == recorded


@pytest.mark.parametrize('kill_when', ['before the first commit', 'between commits', 'mid-write'])
def test_kill_9_then_rerun_finishes_everything_once(inputs, tmp_path, kill_when):
  """kill -9 of the whole run (launcher and workers), then the same command:
  every checkpoint ends migrated and verified, none written twice."""
  spec = tmp_path / 'spec.yaml'
  spec.write_text(SEED_SPEC)
  out = tmp_path / 'out'
  run = start_run(inputs, out, spec, slow_commit=2.0)
  deadline = time.time() + 120
  while time.time() < deadline:
    done = committed(out)
    writing = any(out.glob('**/*.orbax-checkpoint-tmp*')) if out.exists() else False
    if ((kill_when == 'before the first commit' and writing and not done)
        or (kill_when == 'between commits' and 1 <= len(done) < 6)
        or (kill_when == 'mid-write' and done and writing)):
      break
    time.sleep(0.05)
  else:
    pytest.fail(f'never reached {kill_when}: {run.communicate()[0][-2000:]}')
  os.killpg(run.pid, 9)
  run.wait()
  assert len(committed(out)) < 6, 'the run finished before it was killed'
  # Committed and verified: the attempt's mark is gone. One committed but not
  # yet verified when the kill came is redone, not taken as done.
  before = {n for n in committed(out) if not outputs.sibling(out / n, outputs.ATTEMPT).exists()}
  stamps = {p: ocp.metadata.get_step_metadata(out / p.removesuffix('/commit_success.txt')).commit_timestamp_nsecs
            for p in before}
  again = cli('run', '--input', inputs / '*', '--output', out, '--spec', spec)
  assert again.returncode == 0, again.stdout + again.stderr
  records = [json.loads(l) for l in (out / '_surgery' / 'report.jsonl').read_text().splitlines()]
  statuses = {r['src'][len(str(inputs)) + 1:]: r['status'] for r in records}
  assert sorted(statuses) == ['run_a/1', 'run_a/2', 'run_a/3', 'run_b', 'run_c', 'run_d']
  assert set(statuses.values()) <= {'ok', 'skipped'}
  assert sum(s == 'skipped' for s in statuses.values()) == len(before)  # kept, not rewritten
  for p, stamp in stamps.items():
    assert ocp.metadata.get_step_metadata(out / p.removesuffix('/commit_success.txt')).commit_timestamp_nsecs == stamp
  leftovers = [p.name for p in out.glob('**/*') if 'orbax-checkpoint-tmp' in p.name or '.ckpt-surgery-' in p.name]
  assert leftovers == []
  for name in NAMES:  # every output is whole: it reads back as it was computed
    assert_whole(epath.Path(out) / name)


def test_broken_input_zoo_fails_alone_on_the_multiprocess_runner(inputs, tmp_path):
  """Each broken input is a failed record with its error; the good ones migrate."""
  import jax.numpy as jnp
  from tests.conftest import mlp, trained
  import optax
  for f in (inputs / 'run_b').glob('ocdbt.process_*/d/*'):
    f.write_bytes(f.read_bytes()[:20])                       # truncated array data
  (inputs / 'run_c' / '_METADATA').unlink()                  # missing metadata
  (inputs / 'run_a' / '4').mkdir()                           # an empty step directory
  params, opt_state = trained(optax.adam(1e-3), {'encoder': mlp()})  # the rule finds no
  ocp.PyTreeCheckpointer().save(inputs / 'mlp', {'params': params, 'opt_state': opt_state})  # ^Dense_1
  state = ocp.PyTreeCheckpointer().restore(inputs / 'run_d')
  state['params']['Dense_1']['kernel'] = jnp.zeros_like(state['params']['Dense_1']['kernel'])
  ocp.PyTreeCheckpointer().save(inputs / 'zeros', state)     # normalize of zeros: NaN
  spec = tmp_path / 'spec.yaml'
  spec.write_text(SEED_SPEC)
  out = tmp_path / 'out'
  result = cli('run', '--input', inputs / '*', '--output', out, '--spec', spec, '--direct_num_workers=2')
  assert result.returncode == 1, result.stdout + result.stderr
  records = {r['src'][len(str(inputs)) + 1:]: r
             for r in map(json.loads, (out / '_surgery' / 'report.jsonl').read_text().splitlines())}
  errors = {name: r['error'] for name, r in records.items() if r['status'] == 'failed'}
  assert sorted(errors) == ['mlp', 'run_a/4', 'run_b', 'run_c', 'zeros']
  assert 'not an Orbax checkpoint' in errors['run_a/4']
  assert "ops[0] (normalize): match '^Dense_1/kernel$' matched no param path" in errors['mlp']
  assert 'non-finite values' in errors['zeros'] and 'params/Dense_1/kernel' in errors['zeros']
  assert errors['run_b'] and errors['run_c']
  assert sorted(n for n, r in records.items() if r['status'] == 'ok') == ['run_a/1', 'run_a/2', 'run_a/3', 'run_d']
  assert sorted(p.name for p in out.iterdir()) == ['_surgery', 'run_a', 'run_d']
  assert sorted(p.name for p in (out / 'run_a').iterdir()) == ['1', '2', '3']


def test_an_error_escaping_migrate_one_becomes_a_failed_record(inputs, tmp_path, monkeypatch):
  """The DoFn is its own dead-letter handler: nothing that goes wrong is lost."""
  import apache_beam as beam
  from pipeline import run as run_lib

  def broken(src, *args, **kwargs):
    if src.endswith('run_c'):
      raise KeyError('a bug past the record machinery')
    return migrate.record(src, 'x', 'ok')

  monkeypatch.setattr(migrate, 'migrate_one', broken)
  pairs = [(str(inputs / n), str(tmp_path / n)) for n in ('run_b', 'run_c')]
  with beam.Pipeline(runner=run_lib.local_runner(beam.options.pipeline_options.PipelineOptions([]))) as p:
    records = p | beam.Create(pairs) | run_lib.MigrateCheckpoints(SEED_SPEC)
    got = records | beam.Map(lambda r: (r['src'][-5:], r['status'], r['error']))
    from apache_beam.testing.util import assert_that, equal_to
    assert_that(got, equal_to([('run_b', 'ok', None),
                               ('run_c', 'failed', "KeyError: 'a bug past the record machinery'")]))


def test_nightly_rerun_migrates_only_what_is_new_and_a_changed_spec_needs_overwrite(inputs, samples, tmp_path):
  spec = tmp_path / 'spec.yaml'
  spec.write_text(SEED_SPEC)
  out = tmp_path / 'out'
  assert cli('run', '--input', inputs / '*', '--output', out, '--spec', spec).returncode == 0
  # Overnight: training wrote step 4; and the old inputs' array data is
  # garbage, which proves a skip reads no input arrays. (Its names, sizes and
  # times are kept: the inputs' identity is unchanged, as it would be for a
  # flipped bit no listing sees.)
  with ocp.CheckpointManager(inputs / 'run_a') as manager:
    state = ocp.PyTreeCheckpointer().restore(inputs / 'run_a' / '3' / 'default')
    manager.save(4, args=ocp.args.StandardSave(state))
  for data in [*inputs.glob('*/ocdbt.process_*/d/*'), *inputs.glob('*/d/*'),
               *inputs.glob('run_a/[123]/default/ocdbt.process_*/d/*'),
               *inputs.glob('run_a/[123]/default/d/*')]:
    times = data.stat()
    data.write_bytes(b'\xff' * times.st_size)
    os.utime(data, ns=(times.st_atime_ns, times.st_mtime_ns))
  result = cli('run', '--input', inputs / '*', '--output', out, '--spec', spec)
  assert result.returncode == 0, result.stdout + result.stderr
  records = [json.loads(l) for l in (out / '_surgery' / 'report.jsonl').read_text().splitlines()]
  assert [(r['src'][len(str(inputs)) + 1:], r['status']) for r in records if r['status'] == 'ok'] == [('run_a/4', 'ok')]
  assert sum(r['status'] == 'skipped' for r in records) == 6
  # Another spec over the same outputs: refused per checkpoint, unless --overwrite.
  other = tmp_path / 'other.yaml'
  other.write_text("ops: [{scale: {match: 'kernel$', by: 0.5}}]")
  refused = cli('run', '--input', inputs / 'run_a', '--output', out, '--spec', other)
  assert refused.returncode == 1 and '--overwrite' in refused.stdout
  replaced = cli('run', '--input', inputs / 'run_a', '--output', out, '--spec', other, '--overwrite')
  assert replaced.returncode == 1  # steps 1-3 have no array data left to read
  statuses = [json.loads(l)['status'] for l in (out / '_surgery' / 'report.jsonl').read_text().splitlines()]
  assert statuses == ['failed', 'failed', 'failed', 'ok']
  from pipeline import checkpoint
  assert checkpoint.read_provenance(epath.Path(out / 'run_a' / '1'))['spec_hash'] != \
      checkpoint.read_provenance(epath.Path(out / 'run_a' / '4'))['spec_hash']
