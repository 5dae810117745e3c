"""Copy-and-patch: outputs made by copying the input's files and patching the
copy restore bit for bit as the full path's, leave the input as it was,
never keep removed data readable, and are proven by their index."""
from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from etils import epath

from pipeline import checkpoint, migrate, storage
from pipeline.compute import worker
from pipeline.write import copy_patch
from tests.conftest import mlp
from tests.test_copy_through import SPEC, decoded, restored_bits, state, write  # pylint: disable=unused-import
from tests.test_storage_copy import snapshot
from transforms import Surgery, load_spec

RENAME = "ops: [{rename: {match: '^Dense_0/', to: 'Linear_0/'}}]"


def migrated(src, dst, spec=SPEC, **settings):
  worker.WORKER.clear()
  return migrate.migrate_one(str(src), str(dst), worker.surgery_for(spec),
                             migrate.Settings(**settings), attempts=1)


def data_inodes(path) -> set[int]:
  """The inodes of an OCDBT tree's data files (Orbax's per-process ones, or a root's)."""
  return {os.stat(p).st_ino for p in pathlib.Path(path).glob('**/d/*')
          if re.fullmatch('[0-9a-f]{32}', p.name)}


@pytest.mark.parametrize('use_ocdbt', [True, False], ids=['ocdbt', 'no_ocdbt'])
@pytest.mark.parametrize('layout', ['pytree', 'standard', 'step'])
def test_patched_outputs_restore_as_the_full_path_and_leave_the_input(tmp_path, layout, use_ocdbt):
  src = tmp_path / 'in'
  write(src, layout, use_ocdbt)
  before = snapshot(src)
  full = migrated(src, tmp_path / 'full', full_decode=True)
  patched = migrated(src, tmp_path / 'patched')
  assert (patched['status'], patched['write_path']) == ('ok', 'copy_and_patch'), patched['error']
  assert (full['write_path'], full['why_not_patched']) == ('full', '--full_decode')
  assert restored_bits(tmp_path / 'patched', layout) == restored_bits(tmp_path / 'full', layout)
  assert patched['bytes_uploaded'] == patched['bytes_copied_server_side'] == 0
  if use_ocdbt:  # the input's data files are the output's too, linked (beside the patch's new ones)
    assert data_inodes(src) and data_inodes(src) <= data_inodes(tmp_path / 'patched')
  # A later write to the output reaches nothing of the input's.
  for manifest in (tmp_path / 'patched').glob('**/manifest.ocdbt'):
    manifest.write_bytes(b'overwritten')
  assert snapshot(src) == before
  assert checkpoint.read_provenance(tmp_path / 'patched')['src'] == str(src)


@pytest.mark.parametrize('use_ocdbt', [True, False], ids=['ocdbt', 'no_ocdbt'])
def test_a_file_no_leaf_owns_is_carried_as_it_is(tmp_path, use_ocdbt):
  """A user's file inside a checkpoint (notes beside the arrays) is copied;
  the index check takes it as the input's, not as a stray key."""
  src = tmp_path / 'in'
  write(src, 'pytree', use_ocdbt)
  (src / 'NOTES.txt').write_text('trained on shard 3')
  rec = migrated(src, tmp_path / 'out')
  assert (rec['status'], rec['write_path']) == ('ok', 'copy_and_patch'), rec['error']
  assert (tmp_path / 'out' / 'NOTES.txt').read_text() == 'trained on shard 3'


def test_a_typed_restore_and_a_second_migration_of_a_patched_output(tmp_path):
  src, dst = tmp_path / 'in', tmp_path / 'out'
  write(src, 'standard', True)
  assert migrated(src, dst)['write_path'] == 'copy_and_patch'
  before = state()
  params = {'Linear_0': before['params']['Dense_0'], 'Dense_1': before['params']['Dense_1']}
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, {**before, 'params': params})
  abstract['opt_state'] = jax.eval_shape(optax.adam(1e-2).init, abstract['params'])
  after = ocp.StandardCheckpointer().restore(dst, abstract)
  assert isinstance(after['opt_state'][0], optax.ScaleByAdamState)
  np.testing.assert_array_equal(after['opt_state'][0].nu['Linear_0']['bias'],
                                before['opt_state'][0].nu['Dense_0']['bias'])
  # The output (an OCDBT database patched once) is itself patched again.
  again = migrated(dst, tmp_path / 'again', "ops: [{rename: {match: '^Linear_0/', to: 'Dense_9/'}}]")
  assert (again['status'], again['write_path']) == ('ok', 'copy_and_patch'), again['error']
  np.testing.assert_array_equal(ocp.PyTreeCheckpointer().restore(tmp_path / 'again')['params']
                                ['Dense_9']['kernel'], before['params']['Dense_0']['kernel'])


def inodes(path) -> set[int]:
  return {os.stat(p).st_ino for p in pathlib.Path(path).glob('**/*') if p.is_file()}


@pytest.mark.parametrize('use_ocdbt', [True, False], ids=['ocdbt', 'no_ocdbt'])
@pytest.mark.parametrize('layout', ['pytree', 'standard', 'step'])
def test_the_full_path_writes_every_leaf_afresh_as_orbax_save_would(tmp_path, decoded,
                                                                    layout, use_ocdbt):
  """--full_decode writes a fresh tree (nothing of the input's copied or
  linked) that plain Orbax restores bit for bit as its own save of the same
  state, and decodes each leaf once: its verification reads stored bytes."""
  src = tmp_path / 'in'
  write(src, layout, use_ocdbt)
  before = snapshot(src)
  fresh = migrated(src, tmp_path / 'fresh', full_decode=True)
  assert (fresh['status'], fresh['write_path']) == ('ok', 'full'), fresh['error']
  assert sorted(decoded) == sorted(set(decoded))  # read once, never read back decoded
  saved = migrated(src, tmp_path / 'saved', full_decode=True, writers=('orbax_save',))
  assert saved['status'] == 'ok', saved['error']
  assert restored_bits(tmp_path / 'fresh', layout) == restored_bits(tmp_path / 'saved', layout)
  assert not inodes(tmp_path / 'fresh') & inodes(src)
  assert snapshot(src) == before
  meta = lambda p: checkpoint.array_specs(checkpoint.read_metadata(p)[1])
  assert meta(tmp_path / 'fresh') == meta(tmp_path / 'saved')
  assert checkpoint.read_provenance(tmp_path / 'fresh')['spec_hash'] == (
      checkpoint.read_provenance(tmp_path / 'saved')['spec_hash'])
  # A fresh output migrated again is copied and patched: its data files linked.
  again = migrated(tmp_path / 'fresh', tmp_path / 'again', "ops: [{rename: {match: '^Linear_0/', to: 'In/'}}]")
  assert (again['status'], again['write_path']) == ('ok', 'copy_and_patch'), again['error']
  assert not use_ocdbt or data_inodes(tmp_path / 'again') & data_inodes(tmp_path / 'fresh')


def test_a_fresh_output_restores_typed_and_keeps_its_step(tmp_path):
  src = tmp_path / 'in'
  write(src, 'standard', True)
  rec = migrated(src, tmp_path / 'full', RENAME, full_decode=True)
  assert (rec['status'], rec['write_path']) == ('ok', 'full'), rec['error']
  before = state()
  params = {'Linear_0': before['params']['Dense_0'], 'Dense_1': before['params']['Dense_1']}
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, {**before, 'params': params})
  abstract['opt_state'] = jax.eval_shape(optax.adam(1e-2).init, abstract['params'])
  after = ocp.StandardCheckpointer().restore(tmp_path / 'full', abstract)
  assert isinstance(after['opt_state'][0], optax.ScaleByAdamState) and after['step'] == 3
  np.testing.assert_array_equal(after['opt_state'][0].mu['Linear_0']['kernel'],
                                before['opt_state'][0].mu['Dense_0']['kernel'])


def flip_a_bit_of_the_largest_value(tree: pathlib.Path) -> None:
  """One bit flipped in the middle of the largest stored value under `tree`
  (in its OCDBT data file, or its chunk file)."""
  if (tree / 'manifest.ocdbt').exists():
    file, offset, length = max((v for v in storage.ocdbt_index(tree).values() if isinstance(v, tuple)),
                               key=lambda v: int(v[2]))
    path, at = tree / file, int(offset) + int(length) // 2
  else:
    path = max((p for p in tree.glob('*/*') if re.fullmatch(r'[0-9.]+', p.name)),
               key=lambda p: p.stat().st_size)
    at = path.stat().st_size // 2
  data = bytearray(path.read_bytes())
  data[at] ^= 1
  path.write_bytes(bytes(data))


@pytest.mark.parametrize('use_ocdbt', [True, False], ids=['ocdbt', 'no_ocdbt'])
def test_a_value_changed_on_its_way_to_storage_fails_the_checkpoint(tmp_path, monkeypatch, use_ocdbt):
  """The stored bytes read back must be the bytes encoded: one flipped bit
  in a stored value, between the write and the commit, fails the checkpoint
  and leaves nothing at dst."""
  src, out = tmp_path / 'in', tmp_path / 'out'
  ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=use_ocdbt)).save(
      src, {'params': mlp((64, 64, 64)), 'step': 1})  # 16 KB kernels: stored out of line
  real = copy_patch.writing.commit

  def flip_then_commit(work, dst):
    flip_a_bit_of_the_largest_value(pathlib.Path(work))
    real(work, dst)

  monkeypatch.setattr(copy_patch.writing, 'commit', flip_then_commit)
  rec = migrated(src, out / 'x', full_decode=True)
  assert rec['status'] == 'failed' and 'read back differ' in rec['error'], rec
  assert list(out.iterdir()) == []


def test_an_encoder_that_leaves_out_a_chunk_fails_the_checkpoint(tmp_path, monkeypatch):
  """Where the encoder's keys are not every array's whole chunk grid (one
  expected here that it never makes), nothing is written and the checkpoint
  fails by name: the stored bytes alone would not show a missing chunk."""
  src, out = tmp_path / 'in', tmp_path / 'out'
  write(src, 'pytree', True)
  real = copy_patch.encoding.chunk_keys
  monkeypatch.setattr(copy_patch.encoding, 'chunk_keys',
                      lambda name, *grid: real(name, *grid) | {f'{name}/9'.encode()})
  rec = migrated(src, out / 'x', full_decode=True)
  assert rec['status'] == 'failed' and "keys other than the chunk grids'" in rec['error'], rec
  assert list(out.iterdir()) == []


def stored_keys_of_every_version(path) -> set[bytes]:
  """Every key any version of the OCDBT database at `path` holds."""
  manifest = ts.ocdbt.dump(ts.KvStore.open(storage.kvstore_spec(path)).result()).result()
  keys = set()
  for version in manifest['versions']:
    store = ts.KvStore.open({'driver': 'ocdbt', 'base': storage.kvstore_spec(path),
                             'version': version['generation_number']}).result()
    keys |= set(store.list().result())
  return keys


@pytest.mark.parametrize('spec, why', [
    ("ops: [{drop: {match: '^Dense_0/'}}]", 'drops'),
    ("ops: [{slice: {match: '^Dense_0/kernel$', axis: 1, start: 0, stop: 2}}]", 'slice'),
    ("ops: [{cast: {match: '.*', dtype: bfloat16}}]", 'narrows dtypes (float32 -> bfloat16)'),
    ("ops: [{drop_optimizer: {}}]", 'drops'),
])
def test_a_surgery_that_removes_data_leaves_none_of_it_readable(tmp_path, spec, why):
  src, dst = tmp_path / 'in', tmp_path / 'out'
  write(src, 'pytree', True)
  rec = migrated(src, dst, spec)
  assert rec['status'] == 'ok', rec['error']
  assert rec['write_path'] != 'copy_and_patch' and why in rec['why_not_patched']
  assert not data_inodes(dst) & data_inodes(src)  # no input file is linked in
  if 'drop' in spec:
    gone = b'params.Dense_0.' if 'drop:' in spec else b'opt_state.'
    assert not any(k.startswith(gone) for k in stored_keys_of_every_version(dst))


def test_route_removes_says_how_a_surgery_loses_data():
  tree = {'params': mlp((3, 4, 2)), 'opt_state': optax.adam(1e-2).init(mlp((3, 4, 2)))}
  def removes(ops):
    return Surgery(load_spec(f'ops: {ops}')).route(tree)[0].removes
  assert removes("[{rename: {match: '^Dense_0/', to: 'L/'}}, {normalize: {match: 'kernel$'}}]") is None
  assert removes("[{pad: {match: '^Dense_0/kernel$', axis: 1, to: 6}}]") is None
  assert 'drops' in removes("[{reinit: {match: '^Dense_0/', init: zeros}}]")  # the old moments are not read
  assert 'narrows' in removes("[{cast: {match: '.*', dtype: float16}}]")
  assert 'python' in removes("[{python: {fn: 'tests.fix_heads:double_bias'}}]")
  # A drop of one piece of a stacked leaf: the trace sees every input read.
  layers = {'params': {f'layer_{i}': {'w': jnp.full((2,), float(i))} for i in range(3)}}
  restack = ("ops: [{stack: {match: '^layer_(\\d+)/(.*)$', to: 'layers/\\2', axis: 0}},"
             " {unstack: {match: '^layers/(.*)$', to: 'piece_{i}/\\1', axis: 0}},"
             " {drop: {match: '^piece_1/'}}]")
  route = Surgery(load_spec(restack)).route(layers)[0]
  assert len(route.needed) == 3 and 'drop' in route.removes


def test_a_rename_onto_a_name_the_input_holds_takes_another_writer(tmp_path):
  src = tmp_path / 'in'
  write(src, 'pytree', True)
  swap = ("ops: [{rename: {match: '^Dense_0/', to: 'Tmp/'}}, {rename: {match: '^Dense_1/', to: 'Dense_0/'}},"
          " {rename: {match: '^Tmp/', to: 'Dense_1/'}}]")
  rec = migrated(src, tmp_path / 'out', swap)
  assert rec['status'] == 'ok', rec['error']
  assert rec['write_path'] == 'copy_through' and 'renames onto names' in rec['why_not_patched']


def test_the_index_check_catches_a_swapped_rename(tmp_path, monkeypatch):
  """A patch that copies the wrong leaf's keys to a new name (a bug, or a
  storage library's) fails the checkpoint, and nothing is left at dst."""
  src, out = tmp_path / 'in', tmp_path / 'out'
  write(src, 'pytree', True)
  real = copy_patch.writing._clear_ocdbt

  async def swapped(directory, patch):
    targets = sorted(patch.renamed)
    olds = [patch.renamed[t] for t in targets]
    await real(directory, dataclasses.replace(patch, renamed=dict(zip(targets, olds[1:] + olds[:1]))))

  monkeypatch.setattr(copy_patch.writing, '_clear_ocdbt', swapped)
  rec = migrated(src, out / 'x', RENAME)
  assert rec['status'] == 'failed' and 'IndexMismatch' in rec['error'], rec
  assert list(out.iterdir()) == []


KILLED = """
import os, signal, sys
from pipeline import migrate
from pipeline.compute import worker
from pipeline.write import copy_patch
def die(*args):
  os.kill(os.getpid(), signal.SIGKILL)
copy_patch.writing._write_metadata = die  # killed once the copy is patched, before its metadata
migrate.migrate_one(sys.argv[1], sys.argv[2], worker.surgery_for(sys.argv[3]))
"""


def test_kill_9_during_a_patch_leaves_nothing_a_rerun_takes_as_done(tmp_path):
  src, dst = tmp_path / 'in', tmp_path / 'out' / 'x'
  write(src, 'pytree', True)
  dst.parent.mkdir()
  killed = subprocess.run([sys.executable, '-c', KILLED, str(src), str(dst), SPEC])
  assert killed.returncode == -signal.SIGKILL
  assert not checkpoint.is_checkpoint(dst)
  rec = migrated(src, dst)
  assert (rec['status'], rec['write_path']) == ('ok', 'copy_and_patch'), rec['error']
  assert sorted(p.name for p in dst.parent.iterdir()) == ['x']  # the killed attempt's work is gone
  assert checkpoint.is_checkpoint(dst)


def test_on_gcs_a_rename_uploads_no_array_byte(gcs, bucket, tmp_path):
  """gs:// -> gs://: the copy is server-side; only metadata and the patch's
  index nodes are uploaded. The output restores as the full path's does."""
  src = f'{bucket}/in'
  big = {'params': mlp((256, 256, 256)), 'step': 1}  # 0.5 MB of params
  ocp.PyTreeCheckpointer().save(src, big)
  ocp.PyTreeCheckpointer().save(tmp_path / 'in', big)
  full = migrated(tmp_path / 'in', tmp_path / 'out', RENAME, full_decode=True)
  gcs.reset_counters()
  rec = migrated(src, f'{bucket}/out', RENAME)
  uploaded = gcs.counters()['bytes_uploaded']
  assert (rec['status'], rec['write_path']) == ('ok', 'copy_and_patch'), rec['error']
  assert rec['bytes_copied_server_side'] > 0 and rec['bytes_uploaded'] == 0
  stored = sum(storage.listing(epath.Path(src))[p]['size'] for p in storage.listing(epath.Path(src)))
  assert uploaded < 0.05 * stored  # metadata and index nodes
  assert full['status'] == 'ok', full['error']
  assert restored_bits(f'{bucket}/out', 'pytree') == restored_bits(tmp_path / 'out', 'pytree')


@pytest.mark.parametrize('use_ocdbt', [True, False], ids=['ocdbt', 'no_ocdbt'])
def test_a_fresh_output_goes_from_local_to_gcs(gcs, bucket, tmp_path, use_ocdbt):
  """The full path copies nothing, so it writes anywhere: local -> gs://,
  every encoded byte uploaded once, restoring as the local output does."""
  src = tmp_path / 'in'
  write(src, 'step', use_ocdbt)
  local = migrated(src, tmp_path / 'out', RENAME, full_decode=True)
  gcs.reset_counters()
  rec = migrated(src, f'{bucket}/out', RENAME, full_decode=True)
  assert (rec['status'], rec['write_path']) == ('ok', 'full'), rec['error']
  assert 0 < rec['bytes_uploaded'] <= gcs.counters()['bytes_uploaded']
  assert local['status'] == 'ok', local['error']
  assert restored_bits(f'{bucket}/out', 'step') == restored_bits(tmp_path / 'out', 'step')
