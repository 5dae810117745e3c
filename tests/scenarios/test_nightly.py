"""The hundredth night: a rerun that finds everything done is cheap, and
`_surgery/` stays small however many runs there were.

Runs go through `launch.migrate_all`, as `ckpt-surgery run` does, in this
process (few checkpoints run in-process); on gs:// against the GCS test
server, whose proxy counts every request it is sent.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from pipeline import launch, run as run_lib
from pipeline.demo import SEED_SPEC
from pipeline.migrate import Settings
from pipeline.report import read_report, run_dir, tidy
from pipeline.storage import files


def small_checkpoints(root: str, count: int) -> str:
  """`count` small Adam-like checkpoints at root/in/0.. (copies of one); the pattern."""
  first = epath.Path(f'{root}/in/0')
  params = {f'Dense_{i}': {'kernel': np.ones((4, 4), np.float32), 'bias': np.zeros(4, np.float32)}
            for i in range(3)}
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(first, {'params': params, 'opt_state': [{'mu': params, 'nu': params}]})
  checkpointer.wait_until_finished()
  for i in range(1, count):
    if files.is_gcs(root):
      bare = str(first).removeprefix('gs://')
      for obj in files.gcs().find(bare):
        files.gcs().cp_file(obj, f'{root}/in/{i}'.removeprefix('gs://') + obj[len(bare):])
    else:
      shutil.copytree(first, f'{root}/in/{i}')
  return f'{root}/in/*'


@pytest.fixture
def spec(tmp_path):
  path = tmp_path / 'spec.yaml'
  path.write_text(SEED_SPEC)
  return str(path)


def migrate_all(pattern, out, spec, **settings):
  return launch.migrate_all(pattern, out, spec, Settings(**settings), [])


def test_a_rerun_that_finds_all_done_skips_without_a_job(tmp_path, spec, monkeypatch, capsys):
  pattern, out = small_checkpoints(str(tmp_path), 3), str(tmp_path / 'out')
  assert migrate_all(pattern, out, spec) == 0
  capsys.readouterr()

  def refused(*args, **kwargs):
    raise AssertionError('a job started')
  monkeypatch.setattr(run_lib, 'run_migration', refused)
  assert migrate_all(pattern, out, spec) == 0
  said = capsys.readouterr().out
  assert '3 of 3 checkpoint(s) done already' in said and 'migrating 0 checkpoint(s)' in said
  records, summary = read_report(out)
  assert summary['skipped'] == 3 and {r['skipped_by'] for r in records} == {'launcher'}


def test_what_changed_since_goes_to_the_workers(tmp_path, spec, capsys):
  """An input written again, an output touched, an attempt's mark beside an
  output: each is left to a worker, which decides as it always has."""
  pattern, out = small_checkpoints(str(tmp_path), 4), str(tmp_path / 'out')
  assert migrate_all(pattern, out, spec) == 0
  os.utime(tmp_path / 'in' / '1' / '_METADATA', ns=(1, 1))  # the input changed
  os.utime(tmp_path / 'out' / '2' / '_METADATA', ns=(1, 1))  # the output touched
  (tmp_path / 'out' / '3.ckpt-surgery-attempt').write_text('direct')  # an attempt's mark
  code = migrate_all(pattern, out, spec)
  records = {r['dst'].rsplit('/', 1)[1]: r for r in read_report(out)[0]}
  assert code == 1  # the changed input needs --overwrite
  assert records['0'].get('skipped_by') == 'launcher'
  assert records['1']['status'] == 'failed' and 'changed' in records['1']['error']
  assert records['2']['status'] == 'skipped' and not records['2'].get('skipped_by')
  assert records['3']['status'] == 'ok'  # the dead attempt's output redone
  capsys.readouterr()
  # What the workers found is kept: the next rerun skips the untouched ones in the launcher.
  migrate_all(pattern, out, spec)
  records = {r['dst'].rsplit('/', 1)[1]: r for r in read_report(out)[0]}
  assert [n for n, r in sorted(records.items()) if r.get('skipped_by')] == ['0', '2', '3']


def test_overwrite_decides_on_the_workers(tmp_path, spec):
  pattern, out = small_checkpoints(str(tmp_path), 2), str(tmp_path / 'out')
  assert migrate_all(pattern, out, spec) == 0
  assert migrate_all(pattern, out, spec, overwrite=True) == 0
  assert not any(r.get('skipped_by') for r in read_report(out)[0])


def test_a_finished_run_keeps_a_few_files_and_old_runs_are_pruned(tmp_path, spec, capsys):
  pattern, out = small_checkpoints(str(tmp_path), 3), str(tmp_path / 'out')
  for _ in range(3):
    assert migrate_all(pattern, out, spec, keep_runs=2) == 0
  runs = sorted(os.listdir(tmp_path / 'out' / '_surgery' / 'runs'))
  assert len(runs) == 2 and 'removed 1 old run(s)' in capsys.readouterr().out
  for run in runs:  # launcher.json where a job ran here (the first run's, pruned)
    assert set(os.listdir(run_dir(out, run))) - {'launcher.json'} == {
        'report.html', 'report.jsonl', 'spec.yaml', 'summary.json'}
  assert sorted(os.listdir(tmp_path / 'out' / '_surgery')) == [
      'done.json', 'report.html', 'report.jsonl', 'runs', 'summary.json']


def test_the_run_that_tidies_is_the_newest_whatever_its_id(tmp_path):
  """Runs started in one second sort by their random letters: the one
  reporting now is kept, and the oldest of the others goes."""
  out = str(tmp_path / 'out')
  ids = ['20261203T191810Z-06ea36', '20261203T191810Z-73c720', '20261203T191810Z-c03a6e']
  for run in ids:
    run_dir(out, run).mkdir(parents=True)
    (run_dir(out, run) / 'summary.json').write_text('{}')
  assert tidy.tidy(out, ids[0], keep_runs=2) == [ids[1]]
  assert sorted(os.listdir(tmp_path / 'out' / '_surgery' / 'runs')) == [ids[0], ids[2]]


def test_keep_runs_0_keeps_every_run(tmp_path, spec):
  pattern, out = small_checkpoints(str(tmp_path), 1), str(tmp_path / 'out')
  for _ in range(3):
    assert migrate_all(pattern, out, spec, keep_runs=0) == 0
  assert len(os.listdir(tmp_path / 'out' / '_surgery' / 'runs')) == 3


def dead_pid() -> int:
  process = subprocess.Popen(['true'])
  process.wait()
  return process.pid


def test_a_dead_runs_records_are_compacted_by_the_next_run(tmp_path, spec):
  pattern, out = small_checkpoints(str(tmp_path), 2), str(tmp_path / 'out')
  assert migrate_all(pattern, out, spec) == 0
  latest = read_report(out)[0]
  dead, alive = '20261201T000000Z-dead00', '20261201T000001Z-alive0'
  for run, pid in ((dead, dead_pid()), (alive, os.getpid())):
    (run_dir(out, run) / 'records').mkdir(parents=True)
    (run_dir(out, run) / 'records' / 'a.json').write_text(json.dumps(latest[0]))
    (run_dir(out, run) / tidy.LAUNCHER_FILE).write_text(json.dumps(
        {**tidy._holder(), 'pid': pid, 'started': None, 'started_at': 0.0}))
  assert migrate_all(pattern, out, spec) == 0
  assert not (run_dir(out, dead) / 'records').exists()
  assert [r['src'] for r in read_report(out, dead)[0]] == [latest[0]['src']]
  assert (run_dir(out, alive) / 'records' / 'a.json').exists()  # it may be under way: left
  assert read_report(out)[1]['skipped'] == 2  # the latest report is the new run's


def test_a_skip_on_gcs_costs_no_request(gcs, bucket, spec, capsys):
  """A skip-all rerun, every request seen at the server: none names a
  checkpoint (the target is at most 3 a skip), and the run's own are a
  bounded few. (Totals are not compared between reruns of more and fewer
  checkpoints: the same metadata GET is sent once or twice from run to run,
  gcsfs's caches, noise of a few requests either way.)"""
  pattern, out = small_checkpoints(bucket, 3), f'{bucket}/out'
  assert migrate_all(pattern, out, spec) == 0
  gcs.reset_counters()
  assert migrate_all(pattern, out, spec) == 0
  sent = list(gcs.sent)
  assert gcs.reset_counters()['requests'] < 120, sent  # discovery, the report, its page, done.json
  assert not [s for s in sent if re.search(r'(in|out)(/|%2F)[0-2]', s)]
  records = read_report(out)[0]
  assert len(records) == 3 and {r['skipped_by'] for r in records} == {'launcher'}
  capsys.readouterr()
