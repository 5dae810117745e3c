"""Discovery of committed checkpoints, and where each one lands."""
from __future__ import annotations

import shutil

import pytest

from pipeline.checkpoint.discovery import DiscoveryError, destination, discover, fixed_prefix


@pytest.mark.parametrize('pattern, prefix', [
    ('gs://a/runs/*/ckpt/*', 'gs://a/runs/'),
    ('/x/ckpts/run7', '/x/ckpts/'),
    ('/x/ckpts/run[0-9]', '/x/ckpts/'),
    ('/x/ck?ts/run7', '/x/'),
])
def test_fixed_prefix(pattern, prefix):
  assert fixed_prefix(pattern) == prefix


def test_destination_examples_from_design():
  assert destination('gs://a/runs/r1/ckpt/100', 'gs://a/runs/*/ckpt/*', 'gs://b/v2') == 'gs://b/v2/r1/ckpt/100'
  assert destination('/c/ckpts/run7', '/c/ckpts/run7', '/out') == '/out/run7'
  assert destination('/c/ckpts/run7/100', '/c/ckpts/run7', '/out/') == '/out/run7/100'


def test_single_and_manager_checkpoints(inputs, tmp_path):
  pairs = discover(str(inputs / '*'), str(tmp_path / 'out'))
  assert [(s[len(str(inputs)):], d[len(str(tmp_path)):]) for s, d in pairs] == [
      ('/run_a/1', '/out/run_a/1'), ('/run_a/2', '/out/run_a/2'), ('/run_a/3', '/out/run_a/3'),
      ('/run_b', '/out/run_b'), ('/run_c', '/out/run_c'), ('/run_d', '/out/run_d')]
  # A CheckpointManager root without a glob: all its steps, under PREFIX/root/.
  pairs = discover(str(inputs / 'run_a'), str(tmp_path / 'out'))
  assert [d for _, d in pairs] == [str(tmp_path / 'out' / 'run_a' / s) for s in '123']


def test_uncommitted_directories_are_never_taken(inputs, tmp_path):
  shutil.copytree(inputs / 'run_b', inputs / 'run_e.orbax-checkpoint-tmp-1234')
  shutil.copytree(inputs / 'run_a' / '3', inputs / 'run_a' / '4.orbax-checkpoint-tmp-99')
  (inputs / 'run_c' / 'commit_success.txt').unlink()  # local commit is the rename:
  (inputs / 'empty').mkdir()                            # still taken; an empty dir is not
  sources = [s for s, _ in discover(str(inputs / '*'), str(tmp_path / 'out'))]
  names = [s[len(str(inputs)) + 1:] for s in sources]
  assert names == ['run_a/1', 'run_a/2', 'run_a/3', 'run_b', 'run_c', 'run_d']


def test_nothing_matched_and_overlap_are_refused(inputs, tmp_path):
  with pytest.raises(DiscoveryError, match='no committed checkpoint matches'):
    discover(str(tmp_path / 'nowhere' / '*'), str(tmp_path / 'out'))
  with pytest.raises(DiscoveryError, match='overlaps input'):
    discover(str(inputs / '*'), str(inputs / 'run_a'))
  with pytest.raises(DiscoveryError, match='overlaps input'):
    discover(str(inputs / '*'), str(inputs / 'run_b' / 'v2'))


def test_nothing_matched_says_why(inputs, tmp_path):
  def why(pattern):
    with pytest.raises(DiscoveryError, match='no committed checkpoint matches') as e:
      discover(str(pattern))
    return str(e.value).split(': ', 1)[1]
  assert why(tmp_path / 'nowhere') == f"{tmp_path / 'nowhere'} does not exist"
  assert why(tmp_path / 'nowhere' / '*') == f"{tmp_path / 'nowhere'}/ does not exist"
  (tmp_path / 'empty').mkdir()
  assert why(tmp_path / 'empty') == (
      f"{tmp_path / 'empty'} exists but holds no _CHECKPOINT_METADATA or _METADATA, "
      'no committed step directories and no Flax msgpack checkpoint files')
  assert why(tmp_path / 'empty' / '*') == 'nothing matches it'
  (tmp_path / 'notes.txt').write_text('hello')
  assert why(tmp_path / 'notes.txt') == (
      f"{tmp_path / 'notes.txt'} is a file but not a Flax msgpack checkpoint "
      '(it does not begin with a msgpack map keyed by strings)')
  (inputs / 'run_b' / 'commit_success.txt').unlink()
  (inputs / 'run_b').rename(inputs / 'run_b.orbax-checkpoint-tmp-7')
  assert why(inputs / 'run_b.orbax-checkpoint-tmp-7') == (
      f"{inputs / 'run_b.orbax-checkpoint-tmp-7'} is an uncommitted (temporary or unfinished) checkpoint")


def test_a_pattern_that_exists_as_written_is_that_path(inputs, tmp_path):
  shutil.copytree(inputs / 'run_b', tmp_path / 'sweep' / 'run[1]')
  shutil.copytree(inputs / 'run_c', tmp_path / 'sweep' / 'run1')
  pairs = discover(str(tmp_path / 'sweep' / 'run[1]'), str(tmp_path / 'out'))
  assert pairs == [(str(tmp_path / 'sweep' / 'run[1]'), str(tmp_path / 'out' / 'run[1]'))]
  # As a pattern it is a pattern: run[1] names run1.
  pairs = discover(str(tmp_path / 'sweep' / 'run[12]'), str(tmp_path / 'out'))
  assert pairs == [(str(tmp_path / 'sweep' / 'run1'), str(tmp_path / 'out' / 'run1'))]
