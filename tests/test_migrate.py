"""One checkpoint through restore, surgery and Orbax's atomic save, without Beam."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from pipeline import checkpoint, migrate, migrate_fn
from pipeline.compute import worker
from pipeline.demo import SEED_SPEC
from transforms import flatten

SCALE_SPEC = "ops: [{scale: {match: 'kernel$', by: 0.5}}]"


def surgery(text=SEED_SPEC):
  worker.WORKER.clear()
  return worker.surgery_for(text)


def typed_target(state):
  """What a user restores with: abstract params and their optimizer's abstract state."""
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state['params'])
  return {'params': abstract, 'opt_state': jax.eval_shape(optax.adam(1e-3).init, abstract),
          'step': 0}


def bits(tree):
  return {k: np.asarray(v).tobytes() for k, v in flatten(tree).items()}


def test_seed_surgery_through_orbax_is_bit_exact_and_restores_typed(inputs, tmp_path):
  src, dst = inputs / 'run_b', tmp_path / 'out' / 'run_b'
  rec = migrate.migrate_one(str(src), str(dst), surgery())
  assert rec['status'] == 'ok' and rec['compiled'] and rec['bytes_in'] == rec['bytes_out'] > 0
  before = ocp.PyTreeCheckpointer().restore(src)
  after = ocp.PyTreeCheckpointer().restore(dst)
  # The seed's steps, by hand, on the input.
  flat = flatten(before['params'])
  flat['Dense_1/kernel'] = flat['Dense_1/kernel'] / jnp.linalg.norm(flat['Dense_1/kernel'])
  assert bits(after['params']) == {k: np.asarray(v).tobytes() for k, v in flat.items()}
  assert jax.tree_util.tree_map(lambda x: np.asarray(x).tobytes(), after['opt_state']) == \
      jax.tree_util.tree_map(lambda x: np.asarray(x).tobytes(), before['opt_state'])
  assert after['step'] == before['step']
  # The output restores typed, exactly as the input does.
  typed_in = ocp.StandardCheckpointer().restore(src, typed_target(before))
  typed_out = ocp.StandardCheckpointer().restore(dst, typed_target(before))
  assert type(typed_out['opt_state'][0]) is type(typed_in['opt_state'][0]) is optax.ScaleByAdamState
  provenance = checkpoint.read_provenance(dst)
  assert provenance['src'] == str(src) and provenance['spec_hash'] == surgery().spec.hash


def test_manager_step_stays_a_manager_step(inputs, tmp_path):
  out = tmp_path / 'out' / 'run_a'
  rec = migrate.migrate_one(str(inputs / 'run_a' / '3'), str(out / '3'), surgery())
  assert rec['status'] == 'ok'
  layout = checkpoint.read_layout(out / '3')
  assert layout.items == (('default', 'StandardCheckpointHandler'),)
  with ocp.CheckpointManager(out) as manager:
    assert manager.all_steps() == [3]
    meta = ocp.PyTreeCheckpointer().metadata(inputs / 'run_a' / '3' / 'default').item_metadata.tree
    restored = manager.restore(3, args=ocp.args.StandardRestore(typed_target(meta)))
  assert isinstance(restored['opt_state'][0], optax.ScaleByAdamState)


def test_rerun_skips_then_refuses_another_spec_then_overwrites(inputs, tmp_path):
  src, dst = str(inputs / 'run_c'), str(tmp_path / 'out' / 'run_c')
  assert migrate.migrate_one(src, dst, surgery())['status'] == 'ok'
  assert migrate.migrate_one(src, dst, surgery())['status'] == 'skipped'
  rec = migrate.migrate_one(src, dst, surgery(SCALE_SPEC))
  assert rec['status'] == 'failed' and '--overwrite' in rec['error']
  assert checkpoint.read_provenance(tmp_path / 'out' / 'run_c')['spec_hash'] == surgery().spec.hash
  assert migrate.migrate_one(src, dst, surgery(SCALE_SPEC), migrate.Settings(overwrite=True))['status'] == 'ok'
  assert checkpoint.read_provenance(tmp_path / 'out' / 'run_c')['spec_hash'] == surgery(SCALE_SPEC).spec.hash


def leftovers(out_dir):
  return sorted(p.name for p in out_dir.iterdir()) if out_dir.exists() else []


@pytest.mark.parametrize('breakage', ['array data gone', 'metadata gone', 'spec does not fit'])
def test_failure_is_a_record_and_leaves_nothing(inputs, tmp_path, breakage):
  src = inputs / 'run_d'
  text = SEED_SPEC
  if breakage == 'array data gone':
    for f in src.glob('ocdbt.process_*/d/*'):
      f.unlink()
  elif breakage == 'metadata gone':
    (src / '_CHECKPOINT_METADATA').unlink()
    (src / '_METADATA').unlink()
  else:
    text = "ops: [{drop: {match: '^Embed/'}}]"
  rec = migrate.migrate_one(str(src), str(tmp_path / 'out' / 'run_d'), surgery(text))
  assert rec['status'] == 'failed' and rec['error']
  if breakage == 'spec does not fit':
    assert "ops[0] (drop): match '^Embed/' matched no param path" in rec['error']
  assert leftovers(tmp_path / 'out') == []


def test_a_worker_reads_the_next_checkpoint_while_it_writes_the_last(monkeypatch):
  """MigrateFn keeps two checkpoints in flight and hands every record out,
  the last ones from finish_bundle."""
  import threading
  import time
  spans = []

  def slow_migrate(src, dst, surgery_, settings, deadline):
    start = time.perf_counter()
    time.sleep(0.3)
    spans.append((src, start, time.perf_counter(), threading.get_ident()))
    return migrate.record(src, dst, 'ok')

  monkeypatch.setattr(migrate, 'migrate_one', slow_migrate)
  fn = migrate_fn.MigrateFn(SCALE_SPEC, migrate.Settings())
  fn.setup()
  fn.start_bundle()
  out = [rec for i in range(3) for rec in fn.process((f'in/{i}', f'out/{i}'))]
  out += [wv.value for wv in fn.finish_bundle()]
  fn.teardown()
  assert sorted(r['src'] for r in out) == ['in/0', 'in/1', 'in/2']
  assert all(r['peak_rss_over_idle'] >= 0 for r in out)
  spans = {src: (start, end) for src, start, end, _ in spans}
  assert spans['in/1'][0] < spans['in/0'][1]  # the second began before the first ended


def test_a_retried_checkpoint_that_finds_its_run_s_output_records_what_it_holds(inputs, tmp_path):
  """A worker dies after committing; the bundle's retry finds the output
  this run wrote and records its true bytes and write path, not zeros."""
  worker.WORKER.clear()
  surgery, settings = worker.surgery_for(SEED_SPEC), migrate.Settings(run='R1')
  first = migrate.migrate_one(str(inputs / 'run_b'), str(tmp_path / 'o'), surgery, settings)
  again = migrate.migrate_one(str(inputs / 'run_b'), str(tmp_path / 'o'), surgery, settings)
  assert first['status'] == again['status'] == 'ok' and first['write_path'] == 'copy_and_patch'
  for field in migrate.RECORDED:
    assert again[field] == first[field], field
  later = migrate.migrate_one(str(inputs / 'run_b'), str(tmp_path / 'o'), surgery,
                              migrate.Settings(run='R2'))
  assert (later['status'], later['bytes_out'], later['write_path']) == ('skipped', 0, None)
