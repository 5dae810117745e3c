"""The command line end to end, on Beam's local runner with several worker processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest
from flax import serialization

from pipeline import launch, migrate, run as run_lib
from pipeline.demo import SEED_SPEC
from tests.conftest import mlp
from tests.forked_cli import cli


@pytest.fixture
def spec(tmp_path):
  path = tmp_path / 'spec.yaml'
  path.write_text(SEED_SPEC)
  return path


def read_report(out):
  lines = (out / '_surgery' / 'report.jsonl').read_text().splitlines()
  return [json.loads(l) for l in lines], json.loads((out / '_surgery' / 'summary.json').read_text())


def test_run_on_two_worker_processes(inputs, tmp_path, spec):
  out = tmp_path / 'out'
  result = cli('run', '--input', inputs / '*', '--output', out, '--spec', spec,
               '--direct_num_workers=2')
  assert result.returncode == 0, result.stderr
  records, summary = read_report(out)
  assert [r['status'] for r in records] == ['ok'] * 6
  for key in ('src', 'dst', 'status', 'error', 'bytes_in', 'bytes_out', 'seconds'):
    assert all(key in r for r in records)
  assert {k: summary[k] for k in ('ok', 'skipped', 'failed')} == {'ok': 6, 'skipped': 0, 'failed': 0}
  assert summary['bytes_read'] == summary['bytes_written'] == sum(r['bytes_in'] for r in records) > 0
  assert summary['seconds'] > 0
  workers = {r['worker'] for r in records}
  assert len(workers) == 2, workers  # the work spread over both processes
  assert 1 <= summary['compilations'] <= len(workers)  # once per signature per worker
  assert '6 ok, 0 skipped, 0 failed' in result.stdout
  assert sorted(p.name for p in out.iterdir()) == ['_surgery', 'run_a', 'run_b', 'run_c', 'run_d']
  # Run again: everything is already there.
  again = cli('run', '--input', inputs / '*', '--output', out, '--spec', spec)
  assert again.returncode == 0 and read_report(out)[1]['skipped'] == 6


def test_few_checkpoints_run_in_the_launchers_own_process(inputs, tmp_path, spec):
  """Fewer than IN_PROCESS_MAX checkpoints and no worker options: no worker
  processes; the table and the report as on workers."""
  out = tmp_path / 'out'
  run = subprocess.Popen([sys.executable, '-m', 'pipeline', 'run', '--input', str(inputs / '*'),
                          '--output', str(out), '--spec', str(spec)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  stdout, stderr = run.communicate(timeout=300)
  assert run.returncode == 0, stderr
  records, summary = read_report(out)
  assert [r['status'] for r in records] == ['ok'] * 6 and summary['ok'] == 6
  assert len({r['worker'] for r in records}) == 1  # the command's own process (see supervisor)
  assert summary['compilations'] == 1  # one process, one compilation per signature
  assert '6 ok, 0 skipped, 0 failed' in stdout
  assert stderr.count(' -> ') == 6  # each checkpoint's progress line, once


RELEASE_REPORT = threading.Event()


def report_step_that_hangs(records, **kwargs):
  """The job's last step, stuck (as on a dead worker) until a test lets it go."""
  RELEASE_REPORT.wait(120)
  raise RuntimeError('let go by the test')


def test_an_in_process_job_that_hangs_after_its_last_record_is_reported(
    inputs, tmp_path, spec, monkeypatch, capsys):
  """The launcher's grace period holds when the job runs in its own process:
  every record saved, the job stuck, the launcher reports from the records."""
  for attr, value in (('handlers', []), ('level', migrate.log.level),
                      ('propagate', migrate.log.propagate)):
    monkeypatch.setattr(migrate.log, attr, value)  # setup's progress handler, undone after
  monkeypatch.setattr(run_lib, '_write_report', report_step_that_hangs)
  monkeypatch.setattr(launch, 'JOB_GRACE_SECONDS', 0.5)
  out = tmp_path / 'out'
  RELEASE_REPORT.clear()
  try:
    code = launch.migrate_all(str(inputs / 'run_b'), str(out), str(spec), migrate.Settings(), [])
  finally:
    RELEASE_REPORT.set()
  captured = capsys.readouterr()
  assert code == 1
  assert 'the job had not ended 0.5 s after its last checkpoint' in captured.err
  assert '1 ok, 0 skipped, 0 failed' in captured.out
  records, summary = read_report(out)
  assert [r['status'] for r in records] == ['ok'] and summary['ok'] == 1
  assert records[0]['worker'].rsplit(':', 1)[1] == str(os.getpid())  # it ran here


def test_a_broken_checkpoint_fails_alone_exit_1(inputs, tmp_path, spec):
  for f in (inputs / 'run_c').glob('ocdbt.process_*/d/*'):
    f.write_bytes(b'truncated')
  out = tmp_path / 'out'
  result = cli('run', '--input', inputs / '*', '--output', out, '--spec', spec)
  assert result.returncode == 1, result.stderr
  records, summary = read_report(out)
  failed = [r for r in records if r['status'] == 'failed']
  assert [r['src'] for r in failed] == [str(inputs / 'run_c')] and failed[0]['error']
  assert summary['ok'] == 5 and summary['failed'] == 1
  assert not (out / 'run_c').exists()
  assert f"error: {inputs / 'run_c'}" in result.stdout


@pytest.mark.parametrize('spec_text, args, message', [
    ("ops: [{rename: {match: a}}]", [], "ops[0] (rename): missing field 'to'"),
    ("ops: [{frobnicate: {}}]", [], "ops[0]: unknown op 'frobnicate'"),
    (SEED_SPEC, ['--overwite'], 'unknown option --overwite'),
    (SEED_SPEC, ['--input-is-elsewhere'], 'unknown option'),
])
def test_usage_and_spec_errors_exit_2_before_touching_anything(inputs, tmp_path, spec_text, args, message):
  spec = tmp_path / 'bad.yaml'
  spec.write_text(spec_text)
  out = tmp_path / 'out'
  result = cli('run', '--input', inputs / '*', '--output', out, '--spec', spec, *args)
  assert result.returncode == 2 and message in result.stderr, result.stderr
  assert not out.exists()


def test_discovery_errors_exit_2(inputs, tmp_path, spec):
  result = cli('run', '--input', tmp_path / 'none' / '*', '--output', tmp_path / 'o', '--spec', spec)
  assert result.returncode == 2 and 'no committed checkpoint matches' in result.stderr
  result = cli('run', '--input', inputs / '*', '--output', inputs / 'run_b', '--spec', spec)
  assert result.returncode == 2 and 'overlaps input' in result.stderr
  result = cli('run', '--input', inputs / '*', '--output', tmp_path / 'o', '--spec', tmp_path / 'nope.yaml')
  assert result.returncode == 2 and 'cannot read spec' in result.stderr
  assert cli('run', '--input', inputs).returncode == 2  # argparse: --output missing


def test_inspect_shows_params_and_mirrors(inputs):
  result = cli('inspect', inputs / 'run_a' / '2')
  assert result.returncode == 0, result.stderr
  rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
  assert 'CheckpointManager step, items default' in result.stdout.splitlines()[0]
  assert rows['params/Dense_1/kernel'].split()[1:] == ['(256,', '10)', 'float32', '10,240', 'param']
  assert rows['opt_state/0/mu/Dense_1/kernel'].endswith('mirror')
  assert rows['opt_state/0/nu/Conv_0/bias'].endswith('mirror')
  assert not rows['opt_state/0/count'].endswith(('param', 'mirror'))


def test_inspect_takes_a_relative_path_and_the_spec_keys(inputs, tmp_path):
  result = cli('inspect', 'in/run_b', cwd=inputs.parent)  # Orbax refuses relative paths: made absolute
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith(f"{inputs / 'run_b'}  (single tree;")
  (tmp_path / 'other_keys').write_bytes(serialization.to_bytes({'weights': mlp(), 'step': 1}))
  spec = tmp_path / 'keys.yaml'
  spec.write_text("params: weights\nops: [{scale: {match: kernel, by: 2.0}}]\n")
  for args, role in [((), []), (('--spec', spec), ['param'])]:
    result = cli('inspect', tmp_path / 'other_keys', *args)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()[2:]}
    assert rows['weights/Dense_0/kernel'] == ['(3,', '4)', 'float32', '48', *role]
  result = cli('inspect', tmp_path / 'nowhere')
  assert result.returncode == 1 and f"error: {tmp_path / 'nowhere'}: does not exist" in result.stderr


def test_inspect_shows_provenance(inputs, tmp_path, spec):
  out = tmp_path / 'out'
  assert cli('run', '--input', inputs / 'run_b', '--output', out, '--spec', spec).returncode == 0
  result = cli('inspect', out / 'run_b')
  assert 'provenance: ' in result.stdout and str(inputs / 'run_b') in result.stdout


def test_demo_from_a_relative_workdir(tmp_path):
  """What `make demo` runs, on a fresh directory."""
  result = cli('demo', '--workdir', 'demo', '--count', '3', cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  assert '3 ok, 0 skipped, 0 failed' in result.stdout
  records, _ = read_report(tmp_path / 'demo' / 'out')
  assert [r['src'][len(str(tmp_path)):] for r in records] == [
      '/demo/in/run_a/1', '/demo/in/run_a/2', '/demo/in/run_b']


def test_console_script_is_installed():
  bin_dir = os.path.dirname(sys.executable)
  result = subprocess.run([os.path.join(bin_dir, 'ckpt-surgery'), '--help'], capture_output=True, text=True)
  assert result.returncode == 0 and 'run' in result.stdout and 'inspect' in result.stdout


def test_help_and_a_usage_error_import_no_jax():
  """`--help` answers at once: the pipeline (JAX, Orbax, Beam) is imported by
  the command that needs it, once its arguments are parsed."""
  script = ('import sys; from pipeline import cli; codes = [cli.main(["--help"]), '
            'cli.main(["run", "--input", "x"])]; '
            'print(codes, [m for m in ("jax", "orbax", "apache_beam", "tensorstore", "transforms") '
            'if m in sys.modules])')
  result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, check=True)
  assert result.stdout.splitlines()[-1] == '[0, 2] []', result.stdout + result.stderr
