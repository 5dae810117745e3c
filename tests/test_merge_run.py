"""Merges run (`pipeline.merge`): bit for bit against a NumPy reference in
the documented order, checked, streamed, rerun."""
from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from etils import epath

import transforms
from pipeline import launch, merge
from pipeline.checkpoint import discovery, merge_groups
from pipeline.compute.worker import surgery_for
from pipeline.migrate import Settings
from pipeline.report import read_report
from tests.scenarios.doc_checkpoints import CNN, TrainState, _data, batch_norm_train_step

ADAM = optax.adam(1e-3)


def _state(step: int, width: int = 8, dtype=np.float32) -> dict:
  """A TrainState-like state whose values differ at every step: params, and
  Adam's moments after one update (mu and nu not zero), its count."""
  rng = np.random.default_rng(step)
  params = {'Dense_0': {'kernel': rng.normal(size=(width, 16)).astype(dtype),
                        'bias': rng.normal(size=(16,)).astype(dtype)},
            'Dense_1': {'kernel': rng.normal(size=(16, 4)).astype(dtype)}}
  opt_state = ADAM.init(params)
  grads = jax.tree.map(lambda p: np.asarray(rng.normal(size=p.shape), p.dtype), params)
  _, opt_state = ADAM.update(grads, opt_state, params)
  return {'params': params, 'opt_state': jax.tree.map(np.asarray, opt_state),
          'step': np.int32(step)}


def save_run(root: epath.Path, steps, **kwargs) -> None:
  """A CheckpointManager run, as the Orbax docs save one."""
  with ocp.CheckpointManager(root) as manager:
    for step in steps:
      manager.save(step, args=ocp.args.StandardSave(_state(step, **kwargs)))
    manager.wait_until_finished()


def restored(path) -> dict:
  """A merge's output (a step of the run), as plain Orbax restores it."""
  return ocp.StandardCheckpointer().restore(epath.Path(path) / 'default')


def reference(trees: list, weights) -> list[np.ndarray]:
  """The documented order, by hand: acc = c0 x0, then acc + ci xi, in float32, cast."""
  out = []
  for leaves in zip(*[jax.tree.leaves(t) for t in trees]):
    if not np.issubdtype(leaves[-1].dtype, np.floating):
      out.append(leaves[-1])
      continue
    acc = np.float32(weights[0]) * leaves[0].astype(np.float32)
    for w, x in zip(weights[1:], leaves[1:]):
      acc = acc + np.float32(w) * x.astype(np.float32)
    out.append(acc.astype(leaves[-1].dtype))
  return out


def same_bits(got, want) -> None:
  got, want = jax.tree.leaves(got), list(want)
  assert len(got) == len(want)
  for g, w in zip(got, want):
    assert np.asarray(g).dtype == w.dtype and np.array_equal(np.asarray(g), w), (g, w)


def read_digests(output) -> list[str]:
  """What a merge's provenance says it read of each input."""
  provenance = json.loads((epath.Path(output) / '_CHECKPOINT_METADATA').read_text())
  return [i['read_digest'] for i in provenance['custom_metadata']['ckpt_surgery']['inputs']]


def _group(root, spec: transforms.Spec):
  sources = [src for src, _ in discovery.discover(str(root))]
  [group], unformed = merge_groups.merge_groups(sources, spec.merge)
  assert not unformed
  return group


def _merge(root, dst, text, **settings):
  spec = transforms.load_spec(text)
  group = _group(root, spec)
  rec = merge.merge_one(group.name, str(dst), group, surgery_for(text), Settings(**settings))
  return group, rec


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  root = epath.Path(tmp_path_factory.mktemp('merge')) / 'run'
  save_run(root, [100, 200, 300, 400, 500])
  return root


@pytest.mark.parametrize('text, steps', [
    ('merge: {group: run, take: {last: 2}}', [400, 500]),
    ('merge: {group: run, take: {last: 5}, method: ema, decay: 0.9}', [100, 200, 300, 400, 500]),
    ('merge: {group: run, take: {steps: [100, 300, 500]}, method: weighted, weights: [1, 2, 5]}',
     [100, 300, 500]),
    ('merge: {group: all, take: {every: 200}}', [200, 400]),
])
def test_params_are_the_reference_bits_and_the_rest_the_newest(run, tmp_path, text, steps):
  group, rec = _merge(run, tmp_path / 'out', text)
  assert rec['status'] == 'ok', rec['error']
  assert rec['write_path'] == 'copy_and_patch' and rec['steps'] == steps
  out = restored(tmp_path / 'out')
  states = [_state(s) for s in steps]
  same_bits(out['params'], reference([s['params'] for s in states], group.weights))
  same_bits(out['opt_state'], jax.tree.leaves(states[-1]['opt_state']))  # latest, as stored
  assert out['step'] == steps[-1]
  provenance = json.loads((tmp_path / 'out' / '_CHECKPOINT_METADATA').read_text())
  inputs = provenance['custom_metadata']['ckpt_surgery']['inputs']
  assert [(i['step'], i['weight']) for i in inputs] == list(zip(steps, group.weights))
  assert read_digests(tmp_path / 'out') == [
      transforms.digest(transforms.fingerprints({'params': s['params']})) for s in states]


def test_opt_state_mean_merges_adams_moments_and_keeps_the_newest_count(run, tmp_path):
  text = 'merge: {group: run, take: {last: 3}, opt_state: mean}'
  group, rec = _merge(run, tmp_path / 'out', text)
  assert rec['status'] == 'ok', rec['error']
  states = [_state(s) for s in (300, 400, 500)]
  out = restored(tmp_path / 'out')
  same_bits(out['opt_state'], reference([s['opt_state'] for s in states], group.weights))
  assert int(out['opt_state'][0]['count']) == int(states[-1]['opt_state'][0].count)


def test_streamed_under_a_small_budget_is_the_same_bits_and_holds_a_pack_at_most(
    tmp_path, monkeypatch):
  """Four inputs of about 800 KB each, merged under a budget of 128 KB: every
  restore and every sum holds at most a pack (64 KB), and the output is the
  bits of a merge held whole. Instrumented, not timed."""
  root = tmp_path / 'wide'
  save_run(epath.Path(root), [1, 2, 3, 4], width=4096)  # 256 KB kernels (params, mu, nu)
  text = 'merge: {group: run, take: {last: 4}, opt_state: mean}'
  whole_group, whole = _merge(root, tmp_path / 'whole', text)
  held, restore, add = [], merge.checkpoint.restore, merge.merging.Running.add

  def counted_restore(*args, **kwargs):
    layout, items = restore(*args, **kwargs)
    held.append(sum(x.nbytes for x in jax.tree.leaves(items) if hasattr(x, 'nbytes')))
    return layout, items

  def counted_add(running, piece):
    add(running, piece)
    held.append(piece.nbytes + 2 * running.acc.nbytes)  # the piece, the sum, the result to come
  monkeypatch.setattr(merge.checkpoint, 'restore', counted_restore)
  monkeypatch.setattr(merge.merging.Running, 'add', counted_add)
  _, streamed = _merge(root, tmp_path / 'streamed', text, memory_budget=128 << 10)
  assert whole['status'] == streamed['status'] == 'ok', streamed['error']
  assert streamed['packs'] > whole['packs'] and streamed['digest'] == whole['digest']
  assert streamed['bytes_in'] > 4 * (128 << 10) and max(held) <= 64 << 10, max(held)
  assert read_digests(tmp_path / 'streamed') == read_digests(tmp_path / 'whole')  # slabs or not
  states = [_state(s, width=4096) for s in (1, 2, 3, 4)]
  same_bits(restored(tmp_path / 'streamed')['params'],
            reference([s['params'] for s in states], whole_group.weights))


def test_an_input_of_another_tree_fails_by_name_and_writes_nothing(tmp_path):
  root = epath.Path(tmp_path / 'run')
  save_run(root, [1, 2])
  save_run(root, [3], width=4)
  _, rec = _merge(root, tmp_path / 'out', 'merge: {group: run, take: {last: 3}}')
  assert rec['status'] == 'failed'
  assert rec['error'] == (f'MergeError: {root}/1: params/Dense_0/kernel has shape (8, 16), '
                          f'{root}/3 (4, 16)')
  assert not (tmp_path / 'out').exists()


def test_a_non_finite_merge_fails_by_leaf_and_writes_nothing(tmp_path):
  root = epath.Path(tmp_path / 'run')
  save_run(root, [1])
  with ocp.CheckpointManager(root) as manager:
    broken = _state(2)
    broken['params']['Dense_1']['kernel'][0, 0] = np.inf
    manager.save(2, args=ocp.args.StandardSave(broken))
  _, rec = _merge(root, tmp_path / 'out', 'merge: {group: run, take: {last: 2}}')
  assert rec['status'] == 'failed' and 'params/Dense_1/kernel' in rec['error'], rec['error']
  assert not (tmp_path / 'out').exists()


def test_a_rerun_skips_and_a_changed_input_needs_overwrite(run, tmp_path):
  text = 'merge: {group: run, take: {last: 2}}'
  assert _merge(run, tmp_path / 'out', text)[1]['status'] == 'ok'
  assert _merge(run, tmp_path / 'out', text)[1]['status'] == 'skipped'
  other = 'merge: {group: run, take: {last: 2}, method: weighted, weights: [1, 3]}'
  again = _merge(run, tmp_path / 'out', other)[1]
  assert again['status'] == 'failed' and '--overwrite' in again['error']
  assert _merge(run, tmp_path / 'out', other, overwrite=True)[1]['status'] == 'ok'


def test_ops_after_a_merge_run_on_the_merged_state_and_leave_no_sum_behind(run, tmp_path):
  text = ("merge: {group: run, take: {last: 2}}\n"
          "ops: [{scale: {match: 'kernel$', by: 0.5}}, {rename: {match: '^Dense_1/', to: 'Head/'}}]")
  group, rec = _merge(run, tmp_path / 'out', text)
  assert rec['status'] == 'ok', rec['error']
  mean = reference([_state(s)['params'] for s in (400, 500)], group.weights)
  want = {'Dense_0': {'bias': mean[0], 'kernel': mean[1] * np.float32(0.5)},
          'Head': {'kernel': mean[2] * np.float32(0.5)}}
  out = restored(tmp_path / 'out')
  same_bits(out['params'], jax.tree.leaves(want))
  assert set(out['opt_state'][0]['mu']) == {'Dense_0', 'Head'}  # the moments follow the rename
  provenance = json.loads((tmp_path / 'out' / '_CHECKPOINT_METADATA').read_text())
  made = provenance['custom_metadata']['ckpt_surgery']
  assert made['src'] == group.name and [i['step'] for i in made['inputs']] == [400, 500]
  assert sorted(p.name for p in tmp_path.iterdir()) == ['out']  # no sum, no mark, no lease
  assert _merge(run, tmp_path / 'out', text)[1]['status'] == 'skipped'
  # What an attempt killed after its sum leaves: its mark and the sum. A rerun clears both.
  shutil.copytree(tmp_path / 'out', tmp_path / 'again.ckpt-surgery-sum')
  (tmp_path / 'again.ckpt-surgery-attempt').write_text('direct')
  assert _merge(run, tmp_path / 'again', text)[1]['status'] == 'ok'
  assert sorted(p.name for p in tmp_path.iterdir()) == ['again', 'out']


def test_opt_state_drop_writes_a_fresh_tree_without_it(run, tmp_path):
  _, rec = _merge(run, tmp_path / 'out', 'merge: {group: run, take: {last: 2}, opt_state: drop}')
  assert rec['status'] == 'ok', rec['error']
  assert rec['write_path'] == 'full' and 'drops the optimizer state' in rec['why_not_patched']
  out = restored(tmp_path / 'out')
  assert set(out) == {'params', 'step'}


def _run_merges(pattern: str, out: str, spec_text: str, tmp_path, *beam_args: str) -> dict:
  spec = tmp_path / 'spec.yaml'
  spec.write_text(spec_text)
  launch.migrate_all(pattern, out, str(spec), Settings(), list(beam_args))
  return {r['src'].rsplit('/', 1)[-1]: r for r in read_report(out)[0]}


def test_run_merges_each_run_and_a_nightly_rerun_adds_the_new_window(tmp_path, capsys):
  """The runs' merges, a short run failed by name; a night later, the new
  window's merge made and the old one left."""
  root = epath.Path(tmp_path / 'in')
  for name, steps in (('run_a', [100, 200, 300]), ('run_b', [100, 200]), ('run_c', [100])):
    save_run(root / name, steps)
  out, text = str(tmp_path / 'out'), 'merge: {group: run, take: {last: 2}}\n'
  first = _run_merges(f'{root}/*', out, text, tmp_path)
  assert first['run_a']['dst'] == f'{out}/run_a/merged_mean_last2_300'
  assert first['run_a']['status'] == first['run_b']['status'] == 'ok'
  assert first['run_c']['error'] == ("MergeError: 1 of the 2 checkpoint(s) the merge takes; "
                                     "steps there: [100]")
  page = (epath.Path(out) / '_surgery' / 'report.html').read_text()
  assert 'merge of 2 checkpoint(s), steps 200, 300' in page  # a group is a row
  save_run(root / 'run_a', [400])
  again = _run_merges(f'{root}/*', out, text, tmp_path)  # Dask's test runs merges on workers
  assert again['run_a']['status'] == 'ok' and again['run_a']['steps'] == [300, 400]
  assert again['run_a']['dst'] == f'{out}/run_a/merged_mean_last2_400'
  assert again['run_b']['status'] == 'skipped'
  same_bits(restored(f'{out}/run_a/merged_mean_last2_300')['params'],
            reference([_state(200)['params'], _state(300)['params']], [0.5, 0.5]))
  capsys.readouterr()


def test_a_soup_on_gcs(gcs, bucket, tmp_path, capsys):
  """A soup of two runs' step 200, then a rename, read and written on the
  GCS test server: the sum before the rename is not left behind."""
  for name in ('run_a', 'run_b'):
    save_run(epath.Path(f'{bucket}/in/{name}'), [200])
  text = ("merge: {group: step, take: {steps: [200]}, method: weighted, weights: [1, 3]}\n"
          "ops: [{rename: {match: '^Dense_1/', to: 'Head/'}}]\n")
  records = _run_merges(f'{bucket}/in/*', f'{bucket}/out', text, tmp_path)
  [soup] = records.values()
  assert soup['status'] == 'ok', soup['error']
  assert soup['dst'] == f'{bucket}/out/soup_weighted_step_200'
  assert soup['write_path'] == 'copy_and_patch'
  state = _state(200)  # both runs hold the same values at a step: the sum is theirs again
  out = restored(soup['dst'])['params']
  assert set(out) == {'Dense_0', 'Head'}
  same_bits(out, reference([state['params']] * 2, [0.25, 0.75]))
  assert sorted(p.name for p in epath.Path(f'{bucket}/out').iterdir()) == [
      '_surgery', 'soup_weighted_step_200']
  capsys.readouterr()


def test_a_trainstate_with_batch_stats_merged_restores_into_its_target_and_trains(tmp_path):
  """The Flax batch-norm guide's TrainState, saved each step by a
  CheckpointManager: the last 3 steps' mean (batch_stats averaged as params
  are) restores into TrainState's own target and takes a training step."""
  x, y = _data()
  model = CNN()
  variables = model.init(jax.random.key(0), x, train=False)
  state = TrainState.create(apply_fn=model.apply, params=variables['params'], tx=ADAM,
                            batch_stats=variables['batch_stats'])
  train_step = batch_norm_train_step(x, y)

  root, saved = epath.Path(tmp_path / 'in' / 'run'), []
  with ocp.CheckpointManager(root) as manager:
    for _ in range(4):
      state = train_step(state)
      manager.save(int(state.step), args=ocp.args.StandardSave(state))
      saved.append(state)
  _, rec = _merge(root, tmp_path / 'out', 'merge: {group: run, take: {last: 3}}')
  assert rec['status'] == 'ok', rec['error']
  target = jax.eval_shape(lambda: state)
  got = ocp.StandardCheckpointer().restore(tmp_path / 'out' / 'default', target)
  thirds = [1 / 3] * 3
  same_bits(got.params, reference([s.params for s in saved[1:]], thirds))
  same_bits(got.batch_stats, reference([s.batch_stats for s in saved[1:]], thirds))
  same_bits(got.opt_state, [np.asarray(x) for x in jax.tree.leaves(saved[-1].opt_state)])
  assert int(got.step) == 4
  stepped = train_step(got.replace(apply_fn=model.apply, tx=ADAM))
  assert int(stepped.step) == 5
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(stepped.params))


def test_an_nnx_model_and_optimizer_merged_restore_and_take_a_step(tmp_path):
  """The NNX guide's {'model': nnx.state(model), 'optimizer':
  nnx.state(optimizer)}, saved at steps 1 to 3 with StandardCheckpointer:
  the mean of the model's floats (its BatchNorm statistics too) restores
  into the guide's target and the optimizer takes a step."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from tests.scenarios.doc_checkpoints import MLP  # pylint: disable=g-import-not-at-top
  x, y = _data()
  make_model = lambda: MLP(4, 8, 2, rngs=nnx.Rngs(0))
  model = make_model()
  optimizer = nnx.Optimizer(model, ADAM, wrt=nnx.Param)
  loss_fn = lambda model: jnp.mean((model(x) - y) ** 2)
  saved, checkpointer = [], ocp.StandardCheckpointer()
  for step in (1, 2, 3):
    optimizer.update(model, nnx.grad(loss_fn)(model))
    checkpointer.save(tmp_path / 'run' / str(step),
                      {'model': nnx.state(model), 'optimizer': nnx.state(optimizer)})
    checkpointer.wait_until_finished()
    saved.append(jax.tree.map(np.asarray, nnx.state(model)))
  _, rec = _merge(f'{tmp_path}/run/*', tmp_path / 'out',
                  'params: model\nopt_state: optimizer\nmerge: {group: run, take: {last: 3}}')
  assert rec['status'] == 'ok', rec['error']
  target = {'model': nnx.state(nnx.eval_shape(make_model)),
            'optimizer': nnx.state(nnx.eval_shape(
                lambda: nnx.Optimizer(make_model(), ADAM, wrt=nnx.Param)))}
  got = ocp.StandardCheckpointer().restore(tmp_path / 'out', target)
  same_bits(got['model'], reference(saved, [1 / 3] * 3))
  merged = make_model()
  nnx.update(merged, got['model'])
  stepped = nnx.Optimizer(merged, ADAM, wrt=nnx.Param)
  nnx.update(stepped, got['optimizer'])
  stepped.update(merged, nnx.grad(loss_fn)(merged))
  assert all(np.isfinite(np.asarray(l)).all() for l in jax.tree.leaves(nnx.state(merged)))
