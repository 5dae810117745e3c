"""Checkpoints as Orbax's current documentation writes them (issue 22).

Each is written through the library's own API: Orbax v1's `save_pytree`,
v1's training `Checkpointer` (metrics, root and per-step custom metadata),
and v0's `CheckpointManager` keeping the best steps by a metric, with root
metadata, a JSON item and an item of a handler ckpt-surgery has never seen.
Each is migrated by `ckpt-surgery run` (a rename of params that Adam's
moments follow), then read back through the API that wrote it: the state
bit for bit with the rename applied, and everything beside the state
(metrics, `best_step()`, root metadata, custom metadata, other items, v1's
marker file) as it was. A rerun skips each.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from etils import epath
from orbax.checkpoint import v1 as ocp_v1

from pipeline import launch, storage
from pipeline.migrate import Settings
from pipeline.report import read_report
from pipeline.compute import worker
from pipeline.storage import files
from tests.test_cli import cli

SPEC = "ops:\n  - rename: {match: '^Dense_0/', to: 'Linear_0/'}\n"
PROVENANCE = 'ckpt_surgery'


def state(seed: int) -> dict:
  """A trained-looking state: params, Adam's state with non-zero moments, a step."""
  key = jax.random.key(seed)
  params = {'Dense_0': {'kernel': jax.random.normal(key, (4, 3)), 'bias': jax.numpy.arange(3.0)},
            'Dense_1': {'kernel': jax.random.normal(jax.random.fold_in(key, 1), (3, 2))}}
  tx = optax.adam(1e-2)
  opt_state = tx.init(params)
  _, opt_state = tx.update(params, opt_state, params)
  return {'params': params, 'opt_state': opt_state, 'step': seed}


def renamed(tree):
  """A restored state as the spec's rename makes it."""
  if isinstance(tree, dict):
    return {('Linear_0' if k == 'Dense_0' else k): renamed(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [renamed(v) for v in tree]
  return np.asarray(tree) if hasattr(tree, 'shape') else tree


def assert_same(got, want):
  got, want = jax.tree_util.tree_map(np.asarray, got), jax.tree_util.tree_map(np.asarray, want)
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def migrate(src, out, tmp_path, *extra):
  """`ckpt-surgery run` of SPEC, then a rerun, which must skip every checkpoint."""
  spec = tmp_path / 'spec.yaml'
  spec.write_text(SPEC)
  result = cli('run', '--input', src, '--output', out, '--spec', spec, *extra)
  assert result.returncode == 0, result.stdout + result.stderr
  again = cli('run', '--input', src, '--output', out, '--spec', spec, *extra)
  assert again.returncode == 0 and re.search(r'^0 ok, [1-9]\d* skipped, 0 failed', again.stdout,
                                             re.M), again.stdout
  return result


def custom(step_dir) -> dict:
  found = json.loads((epath.Path(step_dir) / '_CHECKPOINT_METADATA').read_text())['custom_metadata']
  return {k: v for k, v in found.items() if k != PROVENANCE}


def test_v1_save_pytree_reads_back_through_v1(tmp_path):
  saved = state(1)
  ocp_v1.save_pytree(tmp_path / 'in' / '100', saved)
  migrate(tmp_path / 'in' / '100', tmp_path / 'out', tmp_path)
  out = tmp_path / 'out' / '100'
  assert [r['write_path'] for r in records(tmp_path / 'out')] == ['copy_and_patch']  # zarr3 patched
  assert_same(ocp_v1.load_pytree(out), renamed(ocp_v1.load_pytree(tmp_path / 'in' / '100')))
  assert (out / 'orbax.checkpoint').exists()  # v1's marker, carried
  for where in (tmp_path / 'in' / '100', out):
    assert json.loads((where / 'state' / '_METADATA').read_text())['use_zarr3']
  handlers = json.loads((out / '_CHECKPOINT_METADATA').read_text())['item_handlers']
  assert handlers['state'].endswith('v1._src.handlers.pytree_handler.PyTreeHandler')
  spec = tmp_path / 'spec.yaml'
  planned = cli('plan', '--input', tmp_path / 'in' / '100', '--spec', spec)
  assert planned.returncode == 0 and '1 would migrate, 0 would fail' in planned.stdout, (
      planned.stdout + planned.stderr)
  inspected = cli('inspect', out)
  assert inspected.returncode == 0 and 'Linear_0' in inspected.stdout, inspected.stderr


def test_v1_training_checkpointer_keeps_metrics_and_metadata(tmp_path):
  root = tmp_path / 'in' / 'run'
  steps = (1, 2, 3)
  with ocp_v1.training.Checkpointer(root, custom_metadata={'experiment': 'sweep-7'}) as ckptr:
    for step in steps:
      ckptr.save_pytree(step, state(step), metrics={'loss': 1.0 / step},
                        custom_metadata={'data_epoch': step})
  migrate(root, tmp_path / 'out', tmp_path)
  out = tmp_path / 'out' / 'run'
  assert [r['write_path'] for r in records(tmp_path / 'out')] == ['copy_and_patch'] * len(steps)
  with ocp_v1.training.Checkpointer(root) as before, ocp_v1.training.Checkpointer(out) as after:
    assert [(c.step, c.metrics) for c in after.checkpoints] == [
        (c.step, c.metrics) for c in before.checkpoints]
    assert after.root_metadata().custom_metadata == {'experiment': 'sweep-7'}
    for step in steps:
      assert_same(after.load_pytree(step), renamed(before.load_pytree(step)))
      assert custom(out / str(step)) == {'data_epoch': step}
      assert (out / str(step) / 'metrics' / 'metrics').read_bytes() == (
          root / str(step) / 'metrics' / 'metrics').read_bytes()


class Notes(ocp.CheckpointHandler):
  """A user's own handler: bytes Orbax knows nothing of."""

  def save(self, directory, args):
    (directory / 'notes.bin').write_bytes(args.data)

  def restore(self, directory, args=None):
    return (directory / 'notes.bin').read_bytes()


@ocp.args.register_with_handler(Notes, for_save=True, for_restore=True)
@dataclasses.dataclass
class NotesArgs(ocp.args.CheckpointArgs):
  data: bytes = b''


def best_manager(root, read_only=False, metadata=None):
  options = ocp.CheckpointManagerOptions(best_fn=lambda m: m['loss'], best_mode='min',
                                         max_to_keep=2, read_only=read_only)
  return ocp.CheckpointManager(root, options=options, metadata=metadata)


@pytest.fixture
def manager_root(tmp_path):
  """The docs' keep-the-best setup: metrics, root metadata, per-step custom
  metadata, a JSON item, and an item only the user's own handler reads."""
  root = tmp_path / 'in' / 'run'
  with best_manager(root, metadata={'model': 'mlp', 'lr': 0.01}) as mngr:
    for step, loss in ((1, 0.5), (2, 0.2), (3, 0.9)):
      mngr.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state(step)), config=ocp.args.JsonSave({'width': step}),
          notes=NotesArgs(os.urandom(64))), metrics={'loss': loss},
          custom_metadata={'data_epoch': step})
  return root


@pytest.mark.parametrize('extra', [[], ['--full_decode']], ids=['default', 'full_decode'])
def test_checkpoint_manager_keeps_best_step_metadata_and_every_item(manager_root, tmp_path, extra):
  root = manager_root
  migrate(root, tmp_path / 'out', tmp_path, *extra)
  out = tmp_path / 'out' / 'run'
  with best_manager(root, read_only=True) as before, best_manager(out, read_only=True) as after:
    assert after.all_steps() == before.all_steps() == [1, 2]  # 3 was not kept: the worst
    assert after.best_step() == before.best_step() == 2
    assert after.metadata().custom_metadata == {'model': 'mlp', 'lr': 0.01}
    for step in after.all_steps():
      assert custom(out / str(step)) == {'data_epoch': step}
      args = ocp.args.Composite(state=ocp.args.StandardRestore(), config=ocp.args.JsonRestore())
      restored = after.restore(step, args=args)
      assert_same(restored['state'], renamed(before.restore(step, args=args)['state']))
      assert restored['config'] == {'width': step}
  for step in (1, 2):
    for item in ('metrics', 'config', 'notes'):
      for file in files.children(epath.Path(root / str(step) / item)):
        assert (out / str(step) / item / file.name).read_bytes() == file.read_bytes(), file
    handlers = json.loads((out / str(step) / '_CHECKPOINT_METADATA').read_text())['item_handlers']
    assert handlers['notes'].endswith('test_orbax_today.Notes')


def upload(root, src: str) -> None:
  """Every file under `root` to the same name under `src`, through TensorStore
  (a media upload). Not gcsfs's small-file upload: the emulator parses its
  multipart body with the email parser, which drops a final '\\r' (1 file
  in 256 came back a byte short: an OCDBT manifest ends in a checksum)."""
  store = storage.open_store(epath.Path(src)).result()
  for directory, _, names in os.walk(root):
    for name in names:
      local = os.path.join(directory, name)
      with open(local, 'rb') as f:
        store.write(os.path.relpath(local, root), f.read()).result()


def test_checkpoint_manager_on_gcs_keeps_best_step_metadata_and_every_item(manager_root, tmp_path, bucket):
  root = manager_root
  src = f'{bucket}/in/run'
  upload(root, src)
  migrate(src, f'{bucket}/out', tmp_path)
  first = records(f'{bucket}/out')
  assert len(first) == 2 and all(r['write_path'] == 'copy_and_patch' for r in first), first
  # Every carried item (and every untouched array) is copied server-side: nothing uploaded
  # but the arrays the rename rewrote and the metadata.
  assert all(r['bytes_copied_server_side'] > r['bytes_uploaded'] for r in first), first
  args = ocp.args.Composite(state=ocp.args.StandardRestore())
  with best_manager(root, read_only=True) as before, best_manager(
      epath.Path(f'{bucket}/out/run'), read_only=True) as after:
    assert after.best_step() == 2
    assert after.metadata().custom_metadata == {'model': 'mlp', 'lr': 0.01}
    assert_same(after.restore(2, args=args)['state'], renamed(before.restore(2, args=args)['state']))
  for step in (1, 2):
    for item in ('metrics', 'config', 'notes'):
      for file in files.children(epath.Path(root / str(step) / item)):
        assert epath.Path(f'{bucket}/out/run/{step}/{item}/{file.name}').read_bytes() == (
            file.read_bytes())


def records(out) -> list[dict]:
  """The records of every run at `out` but those of checkpoints skipped
  (`migrate` reruns each; two runs may start within the same second, so
  their names do not order them)."""
  runs = files.children(epath.Path(out) / '_surgery' / 'runs')
  found = [json.loads(line) for run in runs for line in (run / 'report.jsonl').read_text().splitlines()]
  return sorted((r for r in found if r['status'] != 'skipped'), key=lambda r: r['dst'])


ZARR3_WAYS = [  # (spec, settings, write path, whether streamed): every way an output is written
    (SPEC, {}, 'copy_and_patch', False),
    (SPEC, {'full_decode': True}, 'full', False),
    ("ops: [{rename: {match: '^Dense_0/', to: 'Linear_0/'}}, "
     "{normalize: {match: 'Dense_[1-3]/kernel$'}}]", {'memory_budget': 64 << 10},
     'copy_and_patch', True),
    ("ops: [{scale: {match: 'Dense_0/kernel', by: 0.5}}, "  # Dense_0/kernel (256 KB) in slabs
     "{cast: {match: '.*', dtype: bfloat16, opt_state: follow}}]", {'memory_budget': 64 << 10},
     'full', True),
    ("ops: [{rename: {match: '^Dense_2/', to: 'Tmp/'}}, "  # a swap: onto names held
     "{rename: {match: '^Dense_3/', to: 'Dense_2/'}}, {rename: {match: '^Tmp/', to: 'Dense_3/'}}]",
     {}, 'copy_through', False),
]


@pytest.mark.parametrize('use_ocdbt', [True, False], ids=['ocdbt', 'no_ocdbt'])
def test_zarr3_inputs_take_every_write_path_and_stay_zarr3(tmp_path, use_ocdbt):
  """A zarr3 tree (Orbax v1's default; v0 with `use_zarr3=True`) is written
  by each writer as zarr3: its chunks carried or copied as stored, its
  computed leaves encoded as zarr3 (in slabs, under a budget), each output
  restoring through Orbax bit for bit as the same surgery's whole output."""
  from tests.conftest import mlp, trained  # pylint: disable=g-import-not-at-top
  from tests.test_copy_through import restored_bits  # pylint: disable=g-import-not-at-top
  from pipeline import migrate
  src = tmp_path / 'in'
  params, opt_state = trained(optax.adam(1e-2), mlp((512, 128, 32, 32, 4)))
  ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=use_ocdbt, use_zarr3=True)).save(
      src, {'params': params, 'opt_state': opt_state, 'step': 3})
  for i, (spec, settings, path, streamed) in enumerate(ZARR3_WAYS):
    worker.WORKER.clear()
    surgery = worker.surgery_for(spec)
    whole = migrate.migrate_one(str(src), str(tmp_path / f'whole{i}'), surgery,
                                migrate.Settings(full_decode=True), attempts=1)
    rec = migrate.migrate_one(str(src), str(tmp_path / f'out{i}'), surgery,
                              migrate.Settings(**settings), attempts=1)
    assert (rec['status'], rec['write_path'], rec['packs'] > 1) == ('ok', path, streamed), (
        spec, rec['error'], rec['why_not_patched'])
    assert whole['status'] == 'ok', whole['error']
    assert restored_bits(tmp_path / f'out{i}', 'pytree') == restored_bits(tmp_path / f'whole{i}',
                                                                          'pytree')
    for out in (tmp_path / f'out{i}', tmp_path / f'whole{i}'):
      assert json.loads((out / '_METADATA').read_text())['use_zarr3']
      stored = (storage.ocdbt_index(out) if (out / 'manifest.ocdbt').exists() else
                {str(p.relative_to(out)).encode(): None for p in out.rglob('*') if p.is_file()})
      assert not any(k.endswith(b'/.zarray') for k in stored) and (
          b'params.Dense_1.kernel/zarr.json' in stored or b'params.Dense_0.kernel/zarr.json' in stored)


def test_v1_training_checkpointer_on_gcs_is_patched_server_side(tmp_path, bucket):
  """A v1 root (zarr3 trees, metrics, root and step metadata) on gs://: each
  step copied server-side and patched, read back by v1's Checkpointer."""
  root = tmp_path / 'in' / 'run'
  with ocp_v1.training.Checkpointer(root, custom_metadata={'experiment': 'sweep-7'}) as ckptr:
    for step in (1, 2):
      ckptr.save_pytree(step, state(step), metrics={'loss': 1.0 / step},
                        custom_metadata={'data_epoch': step})
  src = f'{bucket}/v1/in/run'
  upload(root, src)
  migrate(src, f'{bucket}/v1/out', tmp_path)
  done = records(f'{bucket}/v1/out')
  assert [r['write_path'] for r in done] == ['copy_and_patch'] * 2, done
  assert all(r['bytes_copied_server_side'] > r['bytes_uploaded'] for r in done), done
  out = epath.Path(f'{bucket}/v1/out/run')
  with ocp_v1.training.Checkpointer(root) as before, ocp_v1.training.Checkpointer(out) as after:
    assert [(c.step, c.metrics) for c in after.checkpoints] == [
        (c.step, c.metrics) for c in before.checkpoints]
    assert after.root_metadata().custom_metadata == {'experiment': 'sweep-7'}
    assert_same(after.load_pytree(2), renamed(before.load_pytree(2)))
  assert custom(out / '2') == {'data_epoch': 2}


def mean_of(trees) -> list[np.ndarray]:
  """The float leaves' mean in the documented order (float32, oldest first), the rest the newest's."""
  out = []
  for leaves in zip(*[jax.tree_util.tree_leaves(t) for t in trees]):
    leaves = [np.asarray(x) for x in leaves]
    if not np.issubdtype(leaves[-1].dtype, np.floating):
      out.append(leaves[-1])
      continue
    weight = np.float32(1.0 / len(leaves))
    acc = weight * leaves[0].astype(np.float32)
    for x in leaves[1:]:
      acc = acc + weight * x.astype(np.float32)
    out.append(acc.astype(leaves[-1].dtype))
  return out


def merged(src, out, tmp_path, last: int) -> dict:
  """`ckpt-surgery run` of a mean of the last steps of each run, then a
  rerun, which must skip it; the merge's record."""
  spec = tmp_path / 'merge.yaml'
  spec.write_text(f'merge: {{group: run, take: {{last: {last}}}}}\n')
  records = []
  for status in ('ok', 'skipped'):  # in this process: the CLI's own runs are tested above
    assert launch.migrate_all(str(src), str(out), str(spec), Settings(), []) == 0
    records += read_report(str(out))[0]
    assert records[-1]['status'] == status, records[-1]
  return records[0]


def test_a_merge_of_v1_training_checkpointer_steps_keeps_the_newests_metrics_and_metadata(
    tmp_path):
  root = tmp_path / 'in' / 'run'
  with ocp_v1.training.Checkpointer(root, custom_metadata={'experiment': 'sweep-7'}) as ckptr:
    for step in (1, 2, 3):
      ckptr.save_pytree(step, state(step), metrics={'loss': 1.0 / step},
                        custom_metadata={'data_epoch': step})
  rec = merged(tmp_path / 'in' / '*', tmp_path / 'out', tmp_path, last=3)
  out = epath.Path(rec['dst'])
  assert out == tmp_path / 'out' / 'run' / 'merged_mean_last3_3'
  assert rec['write_path'] == 'copy_and_patch'
  got = ocp_v1.load_pytree(out)
  assert_same(got['params'], jax.tree_util.tree_unflatten(
      jax.tree_util.tree_structure(got['params']), mean_of([state(s)['params'] for s in (1, 2, 3)])))
  with ocp_v1.training.Checkpointer(root) as before:
    newest = before.load_pytree(3)
  assert_same(got['opt_state'], newest['opt_state'])
  assert got['step'] == 3 and custom(out) == {'data_epoch': 3}
  assert (out / 'metrics' / 'metrics').read_bytes() == (root / '3' / 'metrics' / 'metrics').read_bytes()


def test_a_merge_of_checkpoint_manager_steps_carries_every_item_of_the_newest(manager_root, tmp_path):
  rec = merged(manager_root.parent / '*', tmp_path / 'out', tmp_path, last=2)  # steps 1, 2 kept
  out = epath.Path(rec['dst'])
  assert out.name == 'merged_mean_last2_2' and rec['inputs'][-1].endswith('run/2')
  args = ocp.args.Composite(state=ocp.args.StandardRestore(), config=ocp.args.JsonRestore())
  got = ocp.Checkpointer(ocp.CompositeCheckpointHandler()).restore(out, args=args)
  assert_same(jax.tree_util.tree_leaves(got['state']['params']),
              mean_of([state(s)['params'] for s in (1, 2)]))
  assert got['config'] == {'width': 2} and custom(out) == {'data_epoch': 2}
  for item in ('metrics', 'config', 'notes'):
    for file in files.children(epath.Path(manager_root / '2' / item)):
      assert (out / item / file.name).read_bytes() == file.read_bytes(), file
