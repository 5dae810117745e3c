"""Errors that name their cause (issue 21): what went wrong reads as what went
wrong, not as a library's traceback or a symptom three steps later."""
from __future__ import annotations

import os
import shutil

from pipeline.demo import SEED_SPEC
from tests.test_cli import cli


def write(tmp_path, text, name='spec.yaml'):
  (tmp_path / name).write_text(text)
  return tmp_path / name


def test_a_bad_group_reference_is_a_usage_error_for_run_and_plan(inputs, tmp_path):
  spec = write(tmp_path, "ops: [{rename: {match: '^Dense_(\\d+)/', to: 'Linear_\\9/'}}]")
  for command in (['run', '--output', tmp_path / 'out'], ['plan']):
    result = cli(command[0], '--input', inputs / 'run_b', '--spec', spec, *command[1:])
    assert result.returncode == 2, result.stderr
    assert "ops[0] (rename): field 'to'" in result.stderr and 'Traceback' not in result.stderr
  assert not (tmp_path / 'out').exists()


def test_an_unreadable_data_file_is_named(samples, tmp_path):
  src = tmp_path / 'ckpt'
  shutil.copytree(samples / 'in' / 'run_b', src)
  data = sorted((src / 'd').iterdir())[0]
  data.unlink()
  data.symlink_to(tmp_path / 'gone')  # unreadable to any user, root too
  result = cli('inspect', src)
  assert result.returncode == 1
  assert f'{os.path.relpath(data, src)} cannot be read (No such file or directory)' in result.stderr
  spec = write(tmp_path, SEED_SPEC)
  result = cli('run', '--input', src, '--output', tmp_path / 'out', '--spec', spec)
  assert result.returncode == 1
  assert f'No such file or directory: {str(data)!r}' in result.stdout  # named as run meets it


def test_a_bucket_that_refuses_writes_is_refused_up_front(gcs, inputs, bucket, tmp_path):
  spec = write(tmp_path, SEED_SPEC)
  gcs.read_only.add(bucket.removeprefix('gs://'))
  try:
    result = cli('run', '--input', inputs / 'run_b', '--output', f'{bucket}/out', '--spec', spec)
  finally:
    gcs.read_only.clear()
  assert result.returncode == 2, result.stdout + result.stderr
  assert f'cannot write the report under {bucket}/out/_surgery' in result.stderr
  assert 'Forbidden' in result.stderr and 'Traceback' not in result.stderr
