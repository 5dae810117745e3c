"""A careless user and a hostile environment (issue 12): nothing of the user's
lost, nothing hangs, no report lies. One test per finding, numbered as there."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

import orbax.checkpoint as ocp
import pytest
from etils import epath

from pipeline import checkpoint, migrate, migrate_fn, report
from pipeline.checkpoint import discovery
from pipeline.compute import worker
from pipeline.demo import SEED_SPEC
from pipeline.verify import verification
from pipeline.write import copy_patch, lease, orbax_save, outputs
from tests import fix_heads
from tests.test_cli import cli
from tests.scenarios.test_safety import digest


@pytest.fixture
def spec_file(tmp_path):
  path = tmp_path / 'spec.yaml'
  path.write_text(SEED_SPEC)
  return path


def migrate_one(src, dst, spec=SEED_SPEC, **settings):
  return migrate.migrate_one(str(src), str(dst), worker.surgery_for(spec), migrate.Settings(**settings))


# 1, 2. Overlap by real path; an output inside an input root.

def test_an_output_that_is_a_symlink_into_the_inputs_is_refused(inputs, tmp_path, spec_file):
  before = digest(inputs)
  link = tmp_path / 'link'
  link.symlink_to(inputs)
  result = cli('run', '--input', inputs / 'run_b', '--output', link, '--spec', spec_file, '--overwrite')
  assert result.returncode == 2 and 'overlaps input' in result.stderr and 'resolves to' in result.stderr
  assert digest(inputs) == before  # not even a report or a lease was written there


def test_an_output_inside_an_input_checkpoint_manager_root_is_refused(inputs):
  with pytest.raises(discovery.DiscoveryError, match='overlaps input'):
    discovery.discover(str(inputs / 'run_a'), str(inputs / 'run_a' / '7'))


# 3. Only our own outputs are ever removed.

@pytest.mark.parametrize('overwrite', [False, True])
def test_what_is_not_ours_at_an_output_path_is_left_alone(inputs, tmp_path, overwrite):
  notes = tmp_path / 'out' / 'run_b'
  notes.mkdir(parents=True)
  (notes / 'notes.txt').write_text('my notes')
  rec = migrate_one(inputs / 'run_b', notes, overwrite=overwrite)
  assert rec['status'] == 'failed' and 'that ckpt-surgery did not write' in rec['error']
  assert (notes / 'notes.txt').read_text() == 'my notes'
  # A checkpoint of the user's own (no provenance of ours) is not replaced either.
  theirs = tmp_path / 'out' / 'run_c'
  ocp.PyTreeCheckpointer().save(theirs, {'params': {'w': 1.0}})
  rec = migrate_one(inputs / 'run_c', theirs, overwrite=overwrite)
  assert rec['status'] == 'failed' and 'holds a checkpoint ckpt-surgery did not write' in rec['error']
  assert ocp.PyTreeCheckpointer().restore(theirs)['params']['w'] == 1.0


# 4. --overwrite keeps the old output until the new one is verified.

def test_overwrite_keeps_the_old_output_when_the_new_one_cannot_be_written(inputs, tmp_path, monkeypatch):
  dst = tmp_path / 'out' / 'run_b'
  assert migrate_one(inputs / 'run_b', dst)['status'] == 'ok'
  old = digest(dst)

  def disk_full(path):
    epath.Path(path).mkdir(parents=True)
    (epath.Path(path) / 'partial').write_text('x')
    raise OSError(errno.ENOSPC, 'No space left on device')

  monkeypatch.setattr(orbax_save, 'save', lambda dst, *args: disk_full(dst))
  monkeypatch.setattr(copy_patch, 'begin', lambda src, dst, *args: disk_full(dst))
  other = SEED_SPEC + "  - scale: {match: 'bias$', by: 2.0}\n"
  rec = migrate_one(inputs / 'run_b', dst, other, overwrite=True)
  assert rec['status'] == 'failed' and 'No space left' in rec['error']
  assert digest(dst) == old
  assert sorted(p.name for p in dst.parent.iterdir()) == ['run_b']


@pytest.mark.parametrize('killed', ['old removed, new not moved', 'new half-written'])
def test_a_swap_killed_halfway_ends_whole(inputs, tmp_path, killed):
  """Killed while the verified new output replaces the old one: the rerun's
  recovery rolls the swap forward; killed while the new one was still being
  written, it keeps the old one. Either way one whole output, nothing else."""
  dst = epath.Path(tmp_path / 'out' / 'run_b')
  assert migrate_one(inputs / 'run_b', dst)['status'] == 'ok'
  old = digest(dst)
  new = outputs.sibling(dst, outputs.NEW)
  other = SEED_SPEC + "  - scale: {match: 'bias$', by: 2.0}\n"
  assert migrate_one(inputs / 'run_b', new, other)['status'] == 'ok'  # a verified new output
  if killed == 'old removed, new not moved':
    outputs.sibling(dst, outputs.ATTEMPT).write_text(outputs.SWAPPING)
    dst.rmtree()
  else:
    outputs.sibling(dst, outputs.ATTEMPT).write_text(outputs.BESIDE)
    (new / 'commit_success.txt').unlink(missing_ok=True)
  outputs.recover(dst)
  assert sorted(p.name for p in dst.parent.iterdir()) == ['run_b']
  assert checkpoint.is_checkpoint(dst)
  assert (digest(dst) == old) == (killed == 'new half-written')
  assert checkpoint.read_provenance(dst)['spec_hash'] == worker.surgery_for(
      SEED_SPEC if killed == 'new half-written' else other).spec.hash


# 5. Another source under the same name is not "skipped".

def test_another_source_at_the_same_output_fails_by_name(inputs, tmp_path):
  dst = tmp_path / 'out' / 'x'
  assert migrate_one(inputs / 'run_b', dst)['status'] == 'ok'
  rec = migrate_one(inputs / 'run_c', dst)
  assert rec['status'] == 'failed' and f"the migration of another source, {inputs / 'run_b'}" in rec['error']
  rec = migrate_one(inputs / 'run_c', dst, overwrite=True)
  assert rec['status'] == 'ok' and checkpoint.read_provenance(epath.Path(dst))['src'] == str(inputs / 'run_c')


# 6. Orbax's temporaries of ours, named `*.orbax-checkpoint-tmp`, are cleaned.

def test_orbax_temporaries_left_by_a_failed_attempt_are_removed(inputs, tmp_path):
  out = tmp_path / 'out'
  for name in ('run_b.orbax-checkpoint-tmp', 'run_b.orbax-checkpoint-tmp-1234'):
    (out / name).mkdir(parents=True)
  assert migrate_one(inputs / 'run_b', out / 'run_b')['status'] == 'ok'
  assert sorted(p.name for p in out.iterdir()) == ['run_b']


# 7, 8, 9. Exit codes and reports that tell the truth.

def test_each_run_has_its_own_report_and_exit_code(inputs, tmp_path, spec_file):
  out = tmp_path / 'out'
  first = cli('run', '--input', inputs / 'run_b', '--output', out, '--spec', spec_file)
  assert first.returncode == 0, first.stderr
  bad = tmp_path / 'bad.yaml'
  bad.write_text("ops: [{drop: {match: '^Nothing/'}}]\n")
  second = cli('run', '--input', inputs / 'run_c', '--output', out, '--spec', bad)
  assert second.returncode == 1
  runs = sorted((out / '_surgery' / 'runs').iterdir())
  assert len(runs) == 2
  statuses = [[r['status'] for r in report.read_report(str(out), r.name)[0]] for r in runs]
  assert sorted(statuses) == [['failed'], ['ok']]
  assert json.loads((out / '_surgery' / 'summary.json').read_text())['failed'] == 1  # the latest


def children(pid: int) -> list[str]:
  return subprocess.run(['pgrep', '-P', str(pid)], capture_output=True, text=True).stdout.split()


def workers_of(launcher: subprocess.Popen) -> list[str]:
  """The worker processes of a `ckpt-surgery run`: the children of its command
  process, which its launcher watches (see pipeline/supervisor)."""
  return [w for command in children(launcher.pid) for w in children(int(command))]


def test_a_worker_killed_mid_run_still_reports_every_finished_checkpoint(inputs, tmp_path, spec_file):
  out = tmp_path / 'out'
  env = {**os.environ, 'PYTHONPATH': os.path.join(os.path.dirname(__file__), 'faults'),
         'CKPT_SURGERY_TEST_SLOW_COMMIT': '1.5'}
  run = subprocess.Popen([sys.executable, '-m', 'pipeline', 'run', '--input', str(inputs / '*'),
                          '--output', str(out), '--spec', str(spec_file), '--direct_num_workers=2'],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 120
  while not list(out.glob('_surgery/runs/*/records/*.json')) and time.time() < deadline:
    time.sleep(0.1)
  workers = workers_of(run)
  os.kill(int(workers[0]), signal.SIGKILL)
  text = run.communicate(timeout=240)[0]  # ends: it does not hang
  assert run.returncode == 1, text
  (run_dir,) = (out / '_surgery' / 'runs').iterdir()
  records, _ = report.read_report(str(out), run_dir.name)
  assert len(records) == 6 and any(r['status'] == 'ok' for r in records)
  for r in records:
    assert r['status'] == 'ok' or 'unfinished' in r['error'] or r['status'] == 'failed'


def test_an_output_prefix_that_is_a_file_is_a_usage_error(inputs, tmp_path, spec_file):
  (tmp_path / 'out').write_text('')
  result = cli('run', '--input', inputs / 'run_b', '--output', tmp_path / 'out', '--spec', spec_file)
  assert result.returncode == 2 and 'is a file, not a directory' in result.stderr


# 10, 11. Nothing hangs; a garbage lease is stale.

def test_a_regex_that_backtracks_forever_fails_by_name_in_plan_and_run(tmp_path):
  spec = tmp_path / 'spec.yaml'
  spec.write_text("ops: [{rename: {match: '^(a|aa)+$', to: x}}]\n")
  long_name = {'params': {'a' * 60 + 'b': 1.0}}
  ocp.PyTreeCheckpointer().save(tmp_path / 'long', long_name)
  start = time.time()
  result = cli('plan', '--input', tmp_path / 'long', '--spec', spec)
  assert result.returncode == 1 and 'backtracks catastrophically' in result.stdout
  rec = migrate_one(tmp_path / 'long', tmp_path / 'out', spec.read_text())
  assert rec['status'] == 'failed' and 'ops[0] (rename): regex' in rec['error']
  assert time.time() - start < 60


def test_a_python_op_that_never_returns_times_out_and_frees_its_lease(inputs, tmp_path):
  fix_heads.RELEASE.clear()
  fn = migrate_fn.MigrateFn("ops: [{python: {fn: 'tests.fix_heads:never_returns'}}]",
                         migrate.Settings(checkpoint_timeout=3))
  fn.setup()
  fn.start_bundle()
  dst = tmp_path / 'out' / 'run_b'
  try:
    out = [*fn.process((str(inputs / 'run_b'), str(dst))),
           *fn.process((str(inputs / 'run_c'), str(tmp_path / 'out' / 'run_c'))),
           *[wv.value for wv in fn.finish_bundle()]]
    assert [r['status'] for r in out] == ['failed', 'failed']
    assert all('CheckpointTimeout' in r['error'] for r in out)
    held = lease.try_claim(epath.Path(dst))  # a rerun is not blocked
    assert held is not None
    held.release()
  finally:
    fix_heads.RELEASE.set()  # the stuck attempt goes on, and must write nothing
  time.sleep(2)
  assert not dst.exists()  # at most its marks are left, which a rerun clears
  assert all(p.name.endswith(outputs.ATTEMPT) for p in dst.parent.iterdir())
  assert migrate_one(inputs / 'run_b', dst)['status'] == 'ok'
  assert {p.name for p in dst.parent.iterdir()} - {'run_c' + outputs.ATTEMPT} == {'run_b'}


def test_workers_of_a_killed_launcher_exit(inputs, tmp_path, spec_file):
  env = {**os.environ, 'PYTHONPATH': os.path.join(os.path.dirname(__file__), 'faults'),
         'CKPT_SURGERY_TEST_SLOW_COMMIT': '3'}
  run = subprocess.Popen([sys.executable, '-m', 'pipeline', 'run', '--input', str(inputs / '*'),
                          '--output', str(tmp_path / 'out'), '--spec', str(spec_file),
                          '--direct_num_workers=2'], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
  deadline = time.time() + 120
  while not list((tmp_path / 'out').glob('**/*.orbax-checkpoint-tmp*')) and time.time() < deadline:
    time.sleep(0.1)
  workers = workers_of(run) + children(run.pid)
  assert len(workers) == 3  # two workers, and the command that started them
  run.kill()
  run.wait()
  deadline = time.time() + 30
  while any(os.path.exists(f'/proc/{w}') and 'Z' not in open(f'/proc/{w}/stat').read().split()[2]
            for w in workers) and time.time() < deadline:
    time.sleep(0.2)
  assert time.time() < deadline, 'orphaned workers kept running'


@pytest.mark.parametrize('garbage', [b'', b'not json', b'[1, 2]', b'{"pid": "x"}'])
def test_an_empty_or_garbage_lease_is_stale(tmp_path, garbage):
  dst = epath.Path(tmp_path) / 'out'
  (tmp_path / ('out' + lease.SUFFIX)).write_bytes(garbage)
  with lease.claim(dst, wait=5, poll=0.1):
    pass


# 13. Spec and usage errors are exit 2; YAML 1.1's `1e30` is a number.

@pytest.mark.parametrize('args, message', [
    (('--direct_num_workers=-1',), '--direct_num_workers=-1'),
    (('--runner=NoSuchRunner',), '--runner=NoSuchRunner'),
    (('--ove',), 'unknown option --ove'),
])
def test_bad_options_are_usage_errors(inputs, tmp_path, spec_file, args, message):
  result = cli('run', '--input', inputs / 'run_b', '--output', tmp_path / 'out', '--spec', spec_file, *args)
  assert result.returncode == 2 and message in result.stderr, result.stderr
  assert not (tmp_path / 'out').exists()


def test_spec_values_a_user_writes(inputs, tmp_path):
  spec = tmp_path / 'spec.yaml'
  spec.write_text("ops: [{reinit: {match: kernel, init: variance_scaling}}]\n")
  result = cli('plan', '--input', inputs / 'run_b', '--spec', spec)
  assert result.returncode == 2 and 'variance_scaling needs arguments' in result.stderr
  rec = migrate_one(inputs / 'run_b', tmp_path / 'out', "ops: [{scale: {match: 'bias$', by: 1e30}}]",
                    allow_nonfinite=True)
  assert rec['status'] == 'ok', rec['error']


# 12. Errors a user can act on: one line, naming the file and the cause.

@pytest.mark.parametrize('breakage, message', [
    ('truncated data file', 'OUT_OF_RANGE'),
    ('manifest deleted', 'manifest.ocdbt is missing'),
    ('garbage _METADATA', '_METADATA: unreadable or not JSON'),
    ('garbage _CHECKPOINT_METADATA', '_CHECKPOINT_METADATA: unreadable or not JSON'),
])
def test_broken_inputs_fail_in_one_line_naming_the_cause(inputs, tmp_path, breakage, message):
  src = inputs / 'run_b'
  if breakage == 'truncated data file':
    data = max(src.glob('ocdbt.process_*/d/*'), key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[:data.stat().st_size // 2])
  elif breakage == 'manifest deleted':
    (src / 'manifest.ocdbt').unlink()
  else:
    (src / breakage.split()[1]).write_text('garbage{')
  rec = migrate_one(src, tmp_path / 'out')
  assert rec['status'] == 'failed' and message in rec['error'] and '\n' not in rec['error']
  assert len(rec['error']) < 600


# 14. plan refuses what run refuses.

@pytest.mark.parametrize('shape, message', [
    ([0, 4], 'would have zero size'), ([1000000, 1000000], 'more than any worker holds'),
])
def test_plan_refuses_what_run_cannot_write(inputs, tmp_path, shape, message):
  from pipeline import plan
  import transforms  # pylint: disable=g-import-not-at-top
  spec = f"ops: [{{add: {{path: 'Extra/w', shape: {shape}}}}}]"
  result = plan.plan_checkpoints([str(inputs / 'run_b')], transforms.load_spec(spec))
  assert result['would_fail'] == 1 and message in result['groups'][0]['error']
  rec = migrate_one(inputs / 'run_b', tmp_path / 'out', spec)
  assert rec['status'] == 'failed' and message in rec['error']


# 15. A migration of a migration checks what the first one recorded.

def test_an_input_whose_data_changed_since_we_wrote_it_fails_by_name(inputs, tmp_path):
  first = epath.Path(tmp_path / 'first')
  assert migrate_one(inputs / 'run_b', first, SEED_SPEC, full_decode=True)['status'] == 'ok'
  meta = json.loads((first / '_CHECKPOINT_METADATA').read_text())
  checksums = meta['custom_metadata']['ckpt_surgery']['checksums']
  leaf = 'params/Dense_1/kernel'
  checksums[leaf] = '0' * 16  # as if its stored bytes had changed since
  (first / '_CHECKPOINT_METADATA').write_text(json.dumps(meta))
  again = "ops: [{scale: {match: 'bias$', by: 1.0}}]"
  for full_decode in (False, True):
    rec = migrate_one(first, tmp_path / f'second_{full_decode}', again, full_decode=full_decode)
    assert rec['status'] == 'failed' and f'{leaf} no longer match the checksums' in rec['error']


def test_a_report_that_cannot_be_written_is_known_before_work_starts(inputs, tmp_path, spec_file):
  (tmp_path / 'out').mkdir()
  (tmp_path / 'out' / '_surgery').write_text('in the way')
  result = cli('run', '--input', inputs / 'run_b', '--output', tmp_path / 'out', '--spec', spec_file)
  assert result.returncode == 2 and 'cannot write the report under' in result.stderr
  assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['_surgery']


def test_a_full_disk_at_the_end_still_shows_every_record(tmp_path, monkeypatch, capsys):
  """The job could not write its report: the launcher shows the saved records
  and says why, exit 1 (tested on its fallback; a full disk cannot be had here)."""
  from pipeline import launch
  out, run = str(tmp_path / 'out'), 'r1'
  report.save_record(out, run, migrate.record('a', 'out/a', 'ok'))

  def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, 'No space left on device')

  monkeypatch.setattr(report, 'write_report', disk_full)
  records, summary = launch.report_from_records([('a', 'out/a'), ('b', 'out/b')], out, run,
                                                     time.time(), 'FAILED')
  assert {r['src']: r['status'] for r in records} == {'a': 'ok', 'b': 'failed'}
  assert (summary['ok'], summary['failed']) == (1, 1)
  assert 'cannot write the report' in capsys.readouterr().err


def test_an_output_inside_the_root_of_globbed_steps_is_refused(inputs):
  with pytest.raises(discovery.DiscoveryError, match='overlaps input'):
    discovery.discover(str(inputs / 'run_a' / '*'), str(inputs / 'run_a' / '7'))


def test_one_stuck_checkpoint_does_not_hold_up_the_next(inputs, tmp_path):
  fix_heads.RELEASE.clear()
  fn = migrate_fn.MigrateFn("ops: [{python: {fn: 'tests.fix_heads:hangs_once'}}]",
                         migrate.Settings(checkpoint_timeout=4, in_flight=1))
  fn.setup()
  fn.start_bundle()
  try:
    out = [*fn.process((str(inputs / 'run_b'), str(tmp_path / 'out' / 'run_b'))),
           *fn.process((str(inputs / 'run_c'), str(tmp_path / 'out' / 'run_c'))),
           *[wv.value for wv in fn.finish_bundle()]]
  finally:
    fix_heads.RELEASE.set()
  assert [r['status'] for r in out] == ['failed', 'ok'], [r['error'] for r in out]


def test_a_given_up_attempt_writes_nothing_once_its_lease_is_free(inputs, tmp_path, monkeypatch):
  """Given up while it verifies (its lease freed), an attempt touches nothing
  afterwards: the next attempt's output, written meanwhile, stays whole."""
  import threading  # pylint: disable=g-import-not-at-top
  from pipeline.compute import deadline as deadline_module
  dst = epath.Path(tmp_path / 'out' / 'run_b')
  verifying, fail_it = threading.Event(), threading.Event()

  def stuck(real_verify):
    def stuck_verify(*args, **kwargs):
      if threading.current_thread().name == 'first':
        verifying.set()
        fail_it.wait()
        raise checkpoint.VerificationError('read back differently')
      return real_verify(*args, **kwargs)
    return stuck_verify

  for module, name in ((copy_patch, 'verify'), (verification, 'verify_saved')):  # every writer's
    monkeypatch.setattr(module, name, stuck(getattr(module, name)))
  given_up = deadline_module.Deadline(3600)
  first = []
  thread = threading.Thread(target=lambda: first.append(migrate_one_with(inputs, dst, given_up)),
                            name='first')
  thread.start()
  assert verifying.wait(60)
  given_up.cancel()
  assert migrate_one(inputs / 'run_b', dst)['status'] == 'ok'  # takes the freed lease
  whole = digest(dst)
  fail_it.set()
  thread.join(60)
  assert first[0]['status'] == 'failed'
  assert digest(dst) == whole and sorted(p.name for p in dst.parent.iterdir()) == ['run_b']


def test_a_lease_is_not_freed_in_the_middle_of_a_write():
  from pipeline.compute import deadline as deadline_module
  freed = []
  deadline = deadline_module.Deadline(3600)
  deadline.lease = type('Lease', (), {'release': lambda self: freed.append(1)})()
  with deadline.writing():
    deadline.cancel()
    assert not freed  # the save under way keeps it
  assert freed == [1]
  with pytest.raises(deadline_module.CheckpointTimeout):
    with deadline.writing():
      pass


def migrate_one_with(inputs, dst, deadline):
  return migrate.migrate_one(str(inputs / 'run_b'), str(dst), worker.surgery_for(SEED_SPEC),
                             deadline=deadline)
