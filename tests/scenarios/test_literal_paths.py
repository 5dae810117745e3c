"""Paths are names, not patterns (issue 21): checkpoints named as sweeps name
them (`[ ] * ? # % ~` and spaces) migrate, or are refused up front, locally and
on gs://; in no case is anything outside the run's own outputs and markers
deleted or written. Each run is checked by a listing of every file or object
under the test's root, with its MD5, before and after; decoys stand beside
each name where a glob of the name would find them."""
from __future__ import annotations

import hashlib
import os
import shutil

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from etils import epath

from pipeline import checkpoint
from pipeline.checkpoint import discovery
from pipeline.demo import SEED_SPEC
from pipeline.storage import files
from tests.conftest import mlp, trained
from tests.test_cli import cli

NAMES = ['run[1]', 'run*x', 'run?x', 'run#x', 'run%41x', 'run~x', 'run x']
GCS_REFUSED = {'run[1]', 'run*x', 'run?x', 'run#x'}  # GCS tools do not keep these as written
DECOYS = ['run1', 'runZx']  # what `run[1]` and `run?x` / `run*x` name as globs
DROP_SPEC = "ops:\n  - drop: {match: '^Dense_1/bias$'}\n"
SCALE_SPEC = "ops:\n  - scale: {match: 'kernel$', by: 0.5}\n"


def listing(root) -> dict[str, str]:
  """{path under root: MD5 of its bytes} of every file (or gs:// object)."""
  root = str(root)
  if files.is_gcs(root):
    bare = root.removeprefix('gs://')
    return {p[len(bare) + 1:]: info['md5Hash'] for p, info in
            files.gcs().find(bare, detail=True).items() if info.get('type') == 'file'}
  out = {}
  for d, _, names in os.walk(root):
    for name in names:
      with open(os.path.join(d, name), 'rb') as f:
        out[os.path.relpath(os.path.join(d, name), root)] = hashlib.md5(f.read()).hexdigest()
  return out


def changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
  return {p for p in set(before) | set(after) if before.get(p) != after.get(p)}


def ours(path: str, outputs: list[str]) -> bool:
  """Under one of the run's own outputs, its markers, or its report."""
  return path.startswith('out/_surgery/') or any(
      path == o or path.startswith((o + '/', o + '.ckpt-surgery-')) for o in outputs)


def restored(path) -> dict:
  return ocp.PyTreeCheckpointer().restore(epath.Path(str(path)))


def same_tree(a, b) -> bool:
  return all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(np.array_equal, a, b)))


def spec_file(tmp_path, text, name):
  path = tmp_path / name
  path.write_text(text)
  return path


DECOY_FILES = [f'{d}/{decoy}/{f}' for d in ('in', 'out') for decoy in DECOYS
               for f in ('100/notes.txt', '100.orbax-checkpoint-tmp/mine', '100.ckpt-surgery-attempt')]


@pytest.fixture
def named(samples, tmp_path):
  """in/<name>/100 for every name, and in/plain/100, copies of one
  checkpoint; a user's files (no checkpoints) where a glob of a name, or of
  its output's temporaries and markers, would find them."""
  root = tmp_path / 'root'
  for name in [*NAMES, 'plain']:
    shutil.copytree(samples / 'in' / 'run_b', root / 'in' / name / '100')
  for decoy in DECOY_FILES:
    (root / decoy).parent.mkdir(parents=True, exist_ok=True)
    (root / decoy).write_text('a user file')
  return root


def test_local_names_migrate_every_way_and_touch_nothing_else(named, tmp_path):
  root, out = named, named / 'out'
  outputs = [f'out/{n}/100' for n in [*NAMES, 'plain']]
  runs = [(SEED_SPEC, []), (DROP_SPEC, []), (SEED_SPEC, ['--full_decode'])]
  for i, (text, extra) in enumerate(runs):
    if i:
      for n in [*NAMES, 'plain']:
        files.remove_tree(epath.Path(out / n))
    spec = spec_file(tmp_path, text, f'spec{i}.yaml')
    before = listing(root)
    result = cli('run', '--input', root / 'in' / '*', '--output', out, '--spec', spec, *extra)
    assert result.returncode == 0, result.stdout + result.stderr
    after = listing(root)
    assert all(ours(p, outputs) for p in changed(before, after)), sorted(
        p for p in changed(before, after) if not ours(p, outputs))
    plain = restored(out / 'plain' / '100')
    for n in NAMES:
      dst = out / n / '100'
      assert checkpoint.is_checkpoint(epath.Path(dst)), (n, result.stdout)
      assert same_tree(restored(dst), plain), n
    assert not [p for p in after if ('.orbax-checkpoint-tmp' in p or '.ckpt-surgery-' in p)
                and p not in DECOY_FILES]  # nothing of ours left but the outputs
  # A rerun skips them all; another spec with --overwrite swaps each in.
  before = listing(root)
  again = cli('run', '--input', root / 'in' / '*', '--output', out, '--spec', spec)
  assert again.stdout.count('skipped') >= len(NAMES), again.stdout
  swap = cli('run', '--input', root / 'in' / '*', '--output', out, '--overwrite',
             '--spec', spec_file(tmp_path, SCALE_SPEC, 'scale.yaml'))
  after = listing(root)
  assert all(ours(p, outputs) for p in changed(before, after))
  plain = restored(out / 'plain' / '100')
  for n in NAMES:
    assert same_tree(restored(out / n / '100'), plain), swap.stdout
  assert plain['params']['Dense_0']['kernel'][0, 0] == (
      restored(root / 'in' / 'plain' / '100')['params']['Dense_0']['kernel'][0, 0] * 0.5)


@pytest.fixture
def gcs_named(bucket):
  """The same names on gs://: those GCS keeps as written saved by Orbax;
  the others copied object by object from one saved there (Orbax's own
  save to gs:// garbles them). A small state: the names are what is tested,
  and the emulator serves one request at a time."""
  params, opt_state = trained(optax.adam(1e-3), mlp((8, 16, 4)))
  state = {'params': params, 'opt_state': opt_state}
  for name in ['plain', *sorted(set(NAMES) - GCS_REFUSED)]:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(epath.Path(f'{bucket}/in/{name}/100'), state)
    checkpointer.wait_until_finished()
  source = f'{bucket}/in/plain/100'
  for name in GCS_REFUSED:
    for obj in files.gcs().find(source):
      files.gcs().cp_file(obj, f'{bucket}/in/{name}/100' + obj[len(source.removeprefix('gs://')):])
  for decoy in DECOY_FILES:
    files.gcs().pipe_file(f'{bucket}/{decoy}', b'a user file')
  return bucket


def test_gcs_names_migrate_or_are_refused_by_name(gcs_named, tmp_path):
  bucket = gcs_named
  migrated = sorted(set(NAMES) - GCS_REFUSED)
  outputs = [f'out/{n}/100' for n in [*migrated, 'plain']]
  before = listing(bucket)
  result = cli('run', '--input', f'{bucket}/in/*', '--output', f'{bucket}/out',
               '--spec', spec_file(tmp_path, SEED_SPEC, 'seed.yaml'))
  assert result.returncode == 1, result.stdout + result.stderr
  after = listing(bucket)
  assert all(ours(p, outputs) for p in changed(before, after)), sorted(
      p for p in changed(before, after) if not ours(p, outputs))
  assert not any(p.startswith(tuple(f'out/{n}' for n in GCS_REFUSED)) for p in after)
  for n in GCS_REFUSED:
    assert f'in/{n}/100 holds' in result.stdout and 'GCS tools' in result.stdout
  plain = restored(f'{bucket}/out/plain/100')
  for n in migrated:
    assert same_tree(restored(f'{bucket}/out/{n}/100'), plain), n
  before = listing(bucket)
  swap = cli('run', '--input', f'{bucket}/in/*', '--output', f'{bucket}/out', '--overwrite',
             '--spec', spec_file(tmp_path, SCALE_SPEC, 'scale.yaml'))
  assert swap.returncode == 1
  after = listing(bucket)
  assert all(ours(p, outputs) for p in changed(before, after))
  plain = restored(f'{bucket}/out/plain/100')
  for n in migrated:
    assert same_tree(restored(f'{bucket}/out/{n}/100'), plain), n


def test_an_output_prefix_with_glob_characters_is_a_name_or_refused(inputs, tmp_path, bucket):
  spec = spec_file(tmp_path, SEED_SPEC, 'seed.yaml')
  refused = cli('run', '--input', inputs / 'run_b', '--output', tmp_path / 'out[1]', '--spec', spec)
  assert refused.returncode == 2 and 'glob characters' in refused.stderr
  assert not (tmp_path / 'out[1]').exists()
  (tmp_path / 'out[1]').mkdir()
  (tmp_path / 'out1').mkdir()  # what a glob of it names
  taken = cli('run', '--input', inputs / 'run_b', '--output', tmp_path / 'out[1]', '--spec', spec)
  assert taken.returncode == 0, taken.stderr
  assert checkpoint.is_checkpoint(epath.Path(tmp_path / 'out[1]' / 'run_b'))
  assert list((tmp_path / 'out1').iterdir()) == []
  # On gs://, `?` in the output prefix, which a glob would read as the input's run1.
  files.gcs().pipe_file(f'{bucket}/run1/100/_METADATA', b'{}')
  before = listing(bucket)
  gs = cli('run', '--input', inputs / 'run_b', '--output', f'{bucket}/run?', '--spec', spec)
  assert gs.returncode == 2 and "'?'" in gs.stderr
  assert listing(bucket) == before


def test_a_home_relative_output_is_under_home(inputs, tmp_path):
  home = tmp_path / 'home'
  home.mkdir()
  spec = spec_file(tmp_path, SEED_SPEC, 'seed.yaml')
  result = cli('run', '--input', inputs / 'run_b', '--output', '~/v2', '--spec', spec,
               cwd=tmp_path, env={**os.environ, 'HOME': str(home)})
  assert result.returncode == 0, result.stderr
  assert checkpoint.is_checkpoint(epath.Path(home / 'v2' / 'run_b'))
  assert not (tmp_path / '~').exists()


def test_a_name_too_long_for_the_temporaries_beside_it_is_refused(samples, tmp_path):
  longest = discovery.NAME_MAX - discovery.LONGEST_SUFFIX
  for name in ('a' * longest, 'b' * (longest + 1)):
    shutil.copytree(samples / 'in' / 'run_b', tmp_path / 'in' / name)
  spec = spec_file(tmp_path, SEED_SPEC, 'seed.yaml')
  result = cli('run', '--input', tmp_path / 'in' / '*', '--output', tmp_path / 'out', '--spec', spec)
  assert result.returncode == 1
  assert f'its name is {longest + 1} bytes' in result.stdout
  assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['_surgery', 'a' * longest]
