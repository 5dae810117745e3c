"""Exit codes from what happened (issue 21): exit 0 only from a command that
finished and whose report says nothing failed."""
from __future__ import annotations

import errno
import json

import pytest
from etils import epath

from pipeline import launch
from pipeline import report
from tests.test_cli import cli


@pytest.fixture
def spec_of(tmp_path):
  def make(fn):
    path = tmp_path / f'{fn}.yaml'
    path.write_text(f"ops:\n  - python: {{fn: 'tests.fix_heads:{fn}'}}\n")
    return path
  return make


def test_an_op_that_ends_the_process_with_0_is_no_success(inputs, tmp_path, spec_of):
  out = tmp_path / 'out'
  result = cli('run', '--input', inputs / '*', '--output', out, '--spec', spec_of('exits_the_process'))
  assert result.returncode == 1, result.stdout + result.stderr
  assert 'the process ended, exit status 0' in result.stderr
  records = [json.loads(l) for l in (out / '_surgery' / 'report.jsonl').read_text().splitlines()]
  assert len(records) == 6 and all(r['status'] == 'failed' for r in records)
  assert all('unfinished' in r['error'] for r in records)
  assert result.stdout.count('failed ') >= 6  # the table names each checkpoint


def test_plan_of_an_op_that_exits_is_no_success(inputs, spec_of):
  for fn in ('exits_quietly', 'exits_the_process'):
    result = cli('plan', '--input', inputs / 'run_b', '--spec', spec_of(fn))
    assert result.returncode != 0, (fn, result.stdout, result.stderr)


def test_help_and_usage_errors_keep_their_codes():
  assert cli('--help').returncode == 0
  assert cli('run', '--input', 'x').returncode == 2


def outage(*args, **kwargs):
  raise ConnectionError('storage is down (simulated: every request fails)')


def test_the_launcher_reports_what_it_can_through_a_storage_outage(monkeypatch, tmp_path, capsys):
  pairs = [('gs://b/in/a', 'gs://b/out/a'), ('gs://b/in/b', 'gs://b/out/b')]
  for name in ('read_report', 'count_records', 'saved_records', 'write_report', 'save_spec'):
    monkeypatch.setattr(report, name, outage)
  code = launch.report_run(pairs, str(tmp_path / 'out'), 'RUN', 0.0, 'ops: []',
                               trouble='the job failed')
  printed = capsys.readouterr()
  assert code == 1
  assert 'gs://b/in/a' in printed.out and 'gs://b/in/b' in printed.out  # the table, all the same
  assert 'cannot read the records' in printed.err and 'storage is down' in printed.err
  assert 'report:' not in printed.out  # no path to a report that was not written


def test_a_full_disk_leaves_no_part_files(monkeypatch, tmp_path):
  def full(self, text):
    with open(self, 'w') as f:
      f.write(text[:1])
    raise OSError(errno.ENOSPC, 'No space left on device')
  monkeypatch.setattr(epath.Path, 'write_text', full)
  with pytest.raises(OSError):
    report.write_whole(epath.Path(tmp_path / 'report.jsonl'), 'x' * 100)
  assert list(tmp_path.iterdir()) == []
