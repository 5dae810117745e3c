"""Legacy Flax msgpack checkpoints as inputs: found, read whole, written as Orbax PyTree checkpoints."""
from __future__ import annotations

import json

import flax
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import serialization
from flax.training import checkpoints

from pipeline import checkpoint, migrate
from pipeline.checkpoint import discovery
from pipeline.compute import worker
from tests.conftest import mlp, trained
from tests.test_cli import cli, read_report
from transforms import flatten

RENAME_SPEC = r"ops: [{rename: {match: '^Dense_(\d+)/', to: 'Linear_\1/'}}]"
SCALE_SPEC = "ops: [{scale: {match: 'kernel$', by: 0.5}}]"


@pytest.fixture(scope='module')
def state():
  """{params, opt_state: Adam's after 2 steps, step}, as a training loop holds it."""
  params, opt_state = trained(optax.adam(1e-2), mlp())
  return {'params': params, 'opt_state': opt_state, 'step': 3}


def save_legacy(ckpt_dir, state, step):
  """`flax.training.checkpoints.save_checkpoint` as it was before Orbax: one
  msgpack file, `checkpoint_<step>` (flax 0.12.8 still does it when asked)."""
  flax.config.update('flax_use_orbax_checkpointing', False)
  try:
    with pytest.warns(DeprecationWarning):
      return checkpoints.save_checkpoint(ckpt_dir, state, step, keep=10)
  finally:
    flax.config.update('flax_use_orbax_checkpointing', True)


@pytest.fixture
def legacy(tmp_path, state):
  """old/state.msgpack (to_bytes), old/flax/checkpoint_{5,10} (save_checkpoint)."""
  old = tmp_path / 'old'
  (old / 'flax').mkdir(parents=True)
  (old / 'state.msgpack').write_bytes(serialization.to_bytes(state))
  for step in (5, 10):
    save_legacy(old / 'flax', state, step)
  return old


def surgery(text=RENAME_SPEC):
  worker.WORKER.clear()
  return worker.surgery_for(text)


def bits(tree):
  return {k: np.asarray(v).tobytes() for k, v in flatten(tree).items()}


def renamed(tree):
  return {k.replace('Dense_', 'Linear_'): v for k, v in bits(tree).items()}


def test_legacy_files_are_msgpack_and_found_by_content(legacy, tmp_path):
  assert sorted(p.name for p in (legacy / 'flax').iterdir()) == ['checkpoint_10', 'checkpoint_5']
  (legacy / 'flax' / 'checkpoint_tmp').write_bytes((legacy / 'state.msgpack').read_bytes())
  (legacy / 'flax' / 'events.out.tfevents.1').write_bytes(b'\x85\x00\x00\x00\x00\x00\x00\x00')
  (legacy / 'notes.txt').write_text('not a checkpoint')
  out = str(tmp_path / 'out')
  # A file: PREFIX + its name, whatever the name.
  assert discovery.discover(str(legacy / 'flax' / 'checkpoint_10'), out) == [
      (str(legacy / 'flax' / 'checkpoint_10'), out + '/checkpoint_10')]
  # A Flax checkpoint directory: its checkpoint_<step> files, by step, like a root's steps;
  # never the temporary of an unfinished save, nor other files.
  assert discovery.discover(str(legacy / 'flax'), out) == [
      (str(legacy / 'flax' / f'checkpoint_{s}'), f'{out}/flax/checkpoint_{s}') for s in (5, 10)]
  # A glob takes the msgpack files it matches (sorted by name) and passes over the rest.
  assert [s for s, _ in discovery.discover(str(legacy / '*'), out)] == [
      str(legacy / 'flax' / 'checkpoint_5'), str(legacy / 'flax' / 'checkpoint_10'),
      str(legacy / 'state.msgpack')]
  assert [s for s, _ in discovery.discover(str(legacy / 'flax' / '*'), out)] == [
      str(legacy / 'flax' / 'checkpoint_10'), str(legacy / 'flax' / 'checkpoint_5')]
  # A msgpack file whose name carries no step is taken too, after the stepped ones.
  assert discovery.discover(str(legacy), out) == [(str(legacy / 'state.msgpack'), out + '/old/state.msgpack')]
  (legacy / 'flax' / 'final.msgpack').write_bytes((legacy / 'state.msgpack').read_bytes())
  assert [s for s, _ in discovery.discover(str(legacy / 'flax'), out)] == [
      str(legacy / 'flax' / n) for n in ('checkpoint_5', 'checkpoint_10', 'final.msgpack')]
  # A directory with files, none of them taken: each says why.
  (tmp_path / 'other').mkdir()
  (tmp_path / 'other' / 'state.msgpack').write_text('{"not": "msgpack"}')
  (tmp_path / 'other' / 'checkpoint_tmp').write_bytes((legacy / 'state.msgpack').read_bytes())
  with pytest.raises(discovery.DiscoveryError) as e:
    discovery.discover(str(tmp_path / 'other'), out)
  assert (f"2 other file(s): {tmp_path / 'other' / 'checkpoint_tmp'} is the temporary file of an "
          f"unfinished Flax save; {tmp_path / 'other' / 'state.msgpack'} is a file but not a Flax "
          'msgpack checkpoint (it does not begin with a msgpack map keyed by strings)') in str(e.value)


@pytest.mark.parametrize('name', ['state.msgpack', 'flax/checkpoint_5'])
def test_migrate_one_renames_params_and_adam_moments_bit_exact(legacy, tmp_path, state, name):
  src, dst = legacy / name, tmp_path / 'out' / 'ckpt'
  written = src.read_bytes()
  rec = migrate.migrate_one(str(src), str(dst), surgery())
  assert rec['status'] == 'ok', rec['error']
  assert rec['bytes_in'] == rec['bytes_out'] > 0 and rec['bytes_carried'] == 0
  after = ocp.PyTreeCheckpointer().restore(dst)
  adam = state['opt_state'][0]
  assert bits(after['params']) == renamed(state['params'])
  assert bits(after['opt_state'][0]['mu']) == renamed(adam.mu)
  assert bits(after['opt_state'][0]['nu']) == renamed(adam.nu)
  assert np.asarray(after['opt_state'][0]['count']).tobytes() == np.asarray(adam.count).tobytes()
  assert after['step'] == 3
  # It restores typed, as an Orbax save of the typed state would.
  params = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, {
      k.replace('Dense_', 'Linear_'): v for k, v in state['params'].items()})
  target = {'params': params, 'opt_state': jax.eval_shape(optax.adam(1e-2).init, params), 'step': 0}
  typed = ocp.StandardCheckpointer().restore(dst, target)
  assert isinstance(typed['opt_state'][0], optax.ScaleByAdamState)
  assert checkpoint.read_provenance(dst)['src'] == str(src)
  # Inputs are never written, --overwrite included.
  assert migrate.migrate_one(str(src), str(dst), surgery(SCALE_SPEC),
                             migrate.Settings(overwrite=True))['status'] == 'ok'
  assert src.read_bytes() == written


def test_unreadable_msgpack_fails_by_name_and_leaves_nothing(legacy, tmp_path):
  src = legacy / 'flax' / 'checkpoint_5'
  src.write_bytes(src.read_bytes()[:200])  # still a msgpack map at its start
  rec = migrate.migrate_one(str(src), str(tmp_path / 'out' / 'checkpoint_5'), surgery())
  assert rec['status'] == 'failed'
  assert f'{src}: not a readable Flax msgpack checkpoint' in rec['error']
  assert not (tmp_path / 'out').exists() or list((tmp_path / 'out').iterdir()) == []


def test_cli_run_plan_and_inspect(legacy, tmp_path):
  spec = tmp_path / 'spec.yaml'
  spec.write_text(RENAME_SPEC)
  inputs = {p: p.read_bytes() for p in (legacy / 'flax').iterdir()}
  out = tmp_path / 'out'
  result = cli('run', '--input', legacy / 'flax', '--output', out, '--spec', spec)
  assert result.returncode == 0, result.stderr
  records, summary = read_report(out)
  assert sorted((r['status'], r['dst']) for r in records) == [
      ('ok', str(out / 'flax' / 'checkpoint_10')), ('ok', str(out / 'flax' / 'checkpoint_5'))]
  assert summary['bytes_read'] == summary['bytes_written'] > 0
  assert {p: p.read_bytes() for p in (legacy / 'flax').iterdir()} == inputs
  # plan and inspect read the file (relative paths are fine).
  result = cli('plan', '--input', 'old/state.msgpack', '--spec', spec, '--json', cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  plan = json.loads(result.stdout)
  assert plan['would_migrate'] == 1
  assert {c['path']: c['detail'] for c in plan['groups'][0]['changes']}['Dense_0/kernel'] == 'Linear_0/kernel'
  result = cli('inspect', 'old/state.msgpack', cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  head, *lines = result.stdout.splitlines()
  assert head.startswith(str(legacy / 'state.msgpack')) and 'Flax msgpack file' in head
  rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
  assert rows['params/Dense_0/kernel'] == ['(3,', '4)', 'float32', '48', 'param']
  assert rows['opt_state/0/nu/Dense_1/bias'][:3] == ['(2,)', 'float32', '8']
