"""Checkpoints written as the Flax, Optax and Orbax docs write them migrate, or fail by name.

Each case (tests/scenarios/doc_checkpoints.py) is migrated through real Orbax files.
The output must restore into the new model's target as a user resuming
would build it, equal the surgery done by hand (params, every mirror, every
collection: old values kept, new slots as the op says), and take one
optimizer step to finite params. None may report ok with an inconsistent
output: where the tool cannot prove the output, the record names the leaf.
"""
from __future__ import annotations

import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import transforms
from pipeline import migrate, plan
from pipeline.compute import worker
from tests.scenarios import doc_checkpoints as docs
from transforms import key_path


SETTINGS = migrate.Settings()  # what `run` migrates with: see `writer`


@pytest.fixture(autouse=True, params=[False, True], ids=['default', 'full_decode'])
def writer(request, monkeypatch):
  """Every case twice: written the default way (copy-and-patch or
  copy-through), and with every leaf rewritten (--full_decode)."""
  monkeypatch.setattr(sys.modules[__name__], 'SETTINGS', migrate.Settings(full_decode=request.param))


def run(src, out, spec):
  worker.WORKER.clear()
  return migrate.migrate_one(str(src), str(out), worker.surgery_for(spec), SETTINGS)


def restore(case, path, target):
  if case['checkpointer'] == 'pytree':
    return ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
  return ocp.StandardCheckpointer().restore(path, target)


def leaves(tree):
  return {key_path(k): np.asarray(x) for k, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def grown(x, shape, fill=0.0):
  """`x` padded at the end of each axis to `shape` with `fill`: a pad by hand."""
  if x.shape == tuple(shape):
    return x
  return np.pad(x, [(0, n - m) for n, m in zip(shape, x.shape)], constant_values=fill)


def assert_by_hand(out, before, rename=lambda p: p, fill=lambda p: 0.0, fresh=()):
  """Every output leaf is its input leaf (through `rename`) padded by hand,
  or zeros where the op re-initialised its param's moments (`fresh`)."""
  old = leaves(before)
  for path, value in leaves(out).items():
    if any(re.search(f, path) for f in fresh):
      assert not value.any(), path
      continue
    np.testing.assert_array_equal(value, grown(old[rename(path)], value.shape, fill(path)), path)


def step_is_finite(tx, params, opt_state):
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), opt_state, params)
  stepped = optax.apply_updates(params, updates)
  return all(bool(jnp.isfinite(v).all()) for v in jax.tree_util.tree_leaves(stepped))


WIDEN_BACKBONE_AND_HEAD = """\
ops:
  - pad: {match: 'backbone/Dense_1/kernel$', axis: 1, to: 12, mirror_init: zeros}
  - pad: {match: 'backbone/Dense_1/bias$', axis: 0, to: 12, mirror_init: zeros}
  - pad: {match: 'head/kernel$', axis: 0, to: 12, mirror_init: zeros}
"""


def widened(params):
  flat = {key_path(k): x for k, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  shapes = {'backbone/Dense_1/kernel': (8, 12), 'backbone/Dense_1/bias': (12,), 'head/kernel': (12, 2)}
  return {'backbone': {'Dense_0': params['backbone']['Dense_0'],
                       'Dense_1': {'kernel': jnp.asarray(grown(flat['backbone/Dense_1/kernel'], shapes['backbone/Dense_1/kernel'])),
                                   'bias': jnp.asarray(grown(flat['backbone/Dense_1/bias'], (12,)))}},
          'head': {'kernel': jnp.asarray(grown(flat['head/kernel'], (12, 2))), 'bias': params['head']['bias']}}


@pytest.mark.parametrize('build', [docs.multi_transform_prefix, docs.multi_transform_deeper_labels,
                                   docs.masked_prefix], ids=lambda f: f.__name__)
def test_prefix_labels_and_masks_follow_a_widening(tmp_path, build):
  """The masked-out backbone is one placeholder at a prefix: the trained parts'
  moments are padded, the placeholder stays where the labels put it."""
  case = build(tmp_path)
  rec = run(case['path'], tmp_path / 'out', WIDEN_BACKBONE_AND_HEAD)
  assert rec['status'] == 'ok', rec['error']
  new_params = widened(case['params'])
  out = restore(case, tmp_path / 'out', case['new_target'](new_params))
  assert jax.tree_util.tree_structure(out['opt_state']) == jax.tree_util.tree_structure(
      case['tx'].init(new_params))
  assert_by_hand(out, case['saved'])
  assert step_is_finite(case['tx'], out['params'], out['opt_state'])


def test_prefix_labels_with_the_optimizer_given(tmp_path):
  """With `optimizer:`, the output is checked against its init: the placeholder
  sits where init puts it, and a rename of the prefix key still migrates."""
  case = docs.multi_transform_prefix(tmp_path)
  optimizer = "optimizer: {factory: 'tests.optimizers:frozen_backbone'}\n"
  rec = run(case['path'], tmp_path / 'out', WIDEN_BACKBONE_AND_HEAD + optimizer)
  assert rec['status'] == 'ok', rec['error']
  out = restore(case, tmp_path / 'out', case['new_target'](widened(case['params'])))
  assert_by_hand(out, case['saved'])
  rec = run(case['path'], tmp_path / 'renamed',
            optimizer + "ops: [{rename: {match: '^backbone/', to: 'encoder/'}}]")
  assert rec['status'] == 'ok', rec['error']


def test_reinit_under_prefix_labels_zeroes_the_moments(tmp_path):
  case = docs.multi_transform_prefix(tmp_path)
  rec = run(case['path'], tmp_path / 'out', "ops: [{reinit: {match: '^head/', init: zeros}}]")
  assert rec['status'] == 'ok', rec['error']
  out = restore(case, tmp_path / 'out', case['abstract_target']())
  assert_by_hand(out, case['saved'], fresh=('head/',))
  assert leaves(case['saved'])['opt_state/inner_states/train/inner_state/0/mu/head/kernel'].any()


def test_renaming_the_prefix_key_moves_the_placeholder(tmp_path):
  case = docs.multi_transform_prefix(tmp_path)
  rec = run(case['path'], tmp_path / 'out', "ops: [{rename: {match: '^backbone/', to: 'encoder/'}}]")
  assert rec['status'] == 'ok', rec['error']
  tx = optax.multi_transform({'frozen': optax.set_to_zero(), 'train': optax.adamw(1e-3)},
                             {'encoder': 'frozen', 'head': 'train'})
  params = {'encoder': case['params']['backbone'], 'head': case['params']['head']}
  target = {'params': jax.eval_shape(lambda: params), 'opt_state': jax.eval_shape(tx.init, params),
            'step': 3}
  out = restore(case, tmp_path / 'out', target)
  raw = ocp.PyTreeCheckpointer().restore(tmp_path / 'out')
  mu = raw['opt_state']['inner_states']['train']['inner_state'][0]['mu']
  assert set(mu) == {'encoder', 'head'} and mu['encoder'] is None
  assert_by_hand(out, case['saved'], rename=lambda p: p.replace('encoder', 'backbone'))
  assert step_is_finite(tx, out['params'], out['opt_state'])


def test_batch_stats_follow_a_widening_and_a_rename(tmp_path):
  """Linen TrainState with BatchNorm through a CheckpointManager: the rules
  match `batch_stats` by the same paths, and the wider net computes the same."""
  case = docs.linen_trainstate_batch_stats(tmp_path)
  spec = """\
ops:
  - pad: {match: '^Dense_0/kernel$', axis: 1, to: 12, mirror_init: zeros}
  - pad: {match: '^Dense_0/bias$|^BatchNorm_0/(bias|mean)$', axis: 0, to: 12, mirror_init: zeros}
  - pad: {match: '^BatchNorm_0/(scale|var)$', axis: 0, to: 12, init: ones, mirror_init: zeros}
  - pad: {match: '^Dense_1/kernel$', axis: 0, to: 12, mirror_init: zeros}
"""
  rec = run(case['step_path'], tmp_path / 'out' / '3', spec)
  assert rec['status'] == 'ok', rec['error']
  grow = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      tuple(12 if n == 8 else n for n in x.shape), x.dtype), tree)
  new_params, new_stats = grow(case['params']), grow(case['batch_stats'])
  with ocp.CheckpointManager(tmp_path / 'out') as mngr:
    out = mngr.restore(3, args=ocp.args.StandardRestore(case['new_target'](new_params, new_stats)))
  ones = lambda p: 1.0 if re.search(r'(params|batch_stats)/BatchNorm_0/(scale|var)$', p) else 0.0
  assert_by_hand(out, case['state'], fill=ones)
  x, _ = docs._data()
  np.testing.assert_allclose(cnn(out.params, out.batch_stats, x),
                             cnn(case['params'], case['batch_stats'], x), rtol=1e-5, atol=1e-5)
  rec = run(case['step_path'], tmp_path / 'renamed' / '3', "ops: [{rename: {match: '^BatchNorm_0/', to: 'BN/'}}]")
  assert rec['status'] == 'ok', rec['error']
  with ocp.CheckpointManager(tmp_path / 'renamed') as mngr:
    raw = mngr.restore(3)
  raw = raw.get('default', raw)
  assert set(raw['batch_stats']) == {'BN'} and set(raw['params']) == {'BN', 'Dense_0', 'Dense_1'}


def cnn(params, stats, x):
  """docs.CNN's forward pass in eval mode, at any width."""
  h = x @ params['Dense_0']['kernel'] + params['Dense_0']['bias']
  bn, s = params['BatchNorm_0'], stats['BatchNorm_0']
  h = (h - s['mean']) / jnp.sqrt(s['var'] + 1e-5) * bn['scale'] + bn['bias']
  return jax.nn.relu(h) @ params['Dense_1']['kernel'] + params['Dense_1']['bias']


@pytest.mark.parametrize('spec, message', [
    ("ops: [{pad: {match: '^BatchNorm_0/(scale|bias)$', axis: 0, to: 12}}]",
     "guard: batch_stats/BatchNorm_0/mean keeps shape (8,), but the params of module 'BatchNorm_0' changed shape"),
    ("ops: [{rename: {match: '^BatchNorm_0/scale$', to: 'BN/scale'}}, "
     "{rename: {match: '^BatchNorm_0/bias$', to: 'BN/bias'}}]",
     "guard: batch_stats/BatchNorm_0/mean sits under module 'BatchNorm_0', which the surgery renamed or dropped"),
])
def test_batch_stats_left_behind_fail_by_name(tmp_path, spec, message):
  case = docs.linen_trainstate_batch_stats(tmp_path)
  rec = run(case['step_path'], tmp_path / 'out' / '3', spec)
  assert rec['status'] == 'failed' and message in rec['error'], rec['error']
  assert not (tmp_path / 'out' / '3').exists()


def test_lookahead_fast_state_follows_its_subtree(tmp_path):
  case = docs.lookahead(tmp_path)
  rec = run(case['path'], tmp_path / 'out', "ops: [{rename: {match: '/head/', to: '/classifier/'}}]")
  assert rec['status'] == 'ok', rec['error']
  rename = lambda p: p.replace('classifier', 'head')
  params = optax.LookaheadParams(*[{'backbone': p['backbone'], 'classifier': p['head']}
                                   for p in (case['params'].fast, case['params'].slow)])
  out = restore(case, tmp_path / 'out', case['new_target'](params))
  assert_by_hand(out, case['saved'], rename=rename)
  raw = leaves(ocp.StandardCheckpointer().restore(tmp_path / 'out'))
  assert 'opt_state/fast_state/0/mu/classifier/kernel' in raw


def test_cocob_new_slots_take_its_init(tmp_path):
  """COCOB's init is not zeros: with `optimizer:`, a pad's new slots take what
  its init gives for the new params, and the first step is finite."""
  case = docs.cocob(tmp_path)
  spec = (WIDEN_BACKBONE_AND_HEAD +
          "optimizer: {factory: optax.contrib.cocob, kwargs: {learning_rate: 1.0, alpha: 100.0}}\n")
  rec = run(case['path'], tmp_path / 'out', spec)
  assert rec['status'] == 'ok', rec['error']
  new_params = widened(case['params'])
  out = restore(case, tmp_path / 'out', case['new_target'](new_params))
  init = leaves(case['tx'].init(new_params))
  got, old = leaves(out['opt_state']), leaves(case['opt_state'])
  scale = got['2/scale/head/kernel']
  np.testing.assert_array_equal(scale[:8], old['2/scale/head/kernel'])
  np.testing.assert_array_equal(scale[8:], init['2/scale/head/kernel'][8:])
  assert (scale[8:] > 0).all()
  assert step_is_finite(case['tx'], out['params'], out['opt_state'])


def test_cocob_pad_without_the_optimizer_fails_by_name_in_plan_and_run(tmp_path):
  """Without `optimizer:`, zeros in COCOB's new slots (its scale starts at
  1e-8) are NaN a step later: no stored value of those entries is zero, so
  nothing proves zeros right, and the checkpoint fails naming them."""
  case = docs.cocob(tmp_path)
  spec = WIDEN_BACKBONE_AND_HEAD.replace(', mirror_init: zeros', '')
  rec = run(case['path'], tmp_path / 'out', spec)
  assert rec['status'] == 'failed'
  assert rec['error'].startswith('SurgeryError: pad would fill new slots of opt_state/2/')
  assert "'optimizer:'" in rec['error'] and "'mirror_init: zeros'" in rec['error']
  assert not (tmp_path / 'out').exists()
  planned = plan.plan_checkpoints([str(case['path'])], transforms.load_spec(spec))
  group, = planned['groups']
  assert 'opt_state/2/scale backbone/Dense_1/kernel' in group['zero_fills']
  assert group['write_path'] == 'full'
  assert "zero-filled without optimizer: " in plan.format_plan(planned)


def test_a_stored_zero_proves_zeros_a_value_of_that_state(tmp_path):
  """Where an entry already holds a zero (here, Adam's moments of a param
  that never had a gradient), zeros in its new slots need no `optimizer:`."""
  case = docs.cocob(tmp_path)
  params = case['params']
  tx = optax.adam(1e-3)
  opt_state = tx.init(params)  # all zeros: the moments' init
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / 'adam', {'params': params, 'opt_state': opt_state})
  rec = run(tmp_path / 'adam', tmp_path / 'out', WIDEN_BACKBONE_AND_HEAD.replace(', mirror_init: zeros', ''))
  assert rec['status'] == 'ok', rec['error']
  out = ocp.StandardCheckpointer().restore(tmp_path / 'out')
  assert not any(np.asarray(x).any() for x in jax.tree_util.tree_leaves(out['opt_state']))


def test_haiku_style_keys_are_not_renested(tmp_path):
  case = docs.haiku_style_keys(tmp_path)
  rec = run(case['path'], tmp_path / 'out',
            "ops: [{rename: {match: '^mlp%2F~%2Flinear_1/', to: 'mlp%2F~%2Fhead/'}}]")
  assert rec['status'] == 'ok', rec['error']
  raw = ocp.StandardCheckpointer().restore(tmp_path / 'out')
  assert set(raw['params']) == {'mlp/~/linear_0', 'mlp/~/head'}
  assert set(raw['opt_state'][0]['mu']) == {'mlp/~/linear_0', 'mlp/~/head'}
  np.testing.assert_array_equal(raw['opt_state'][0]['nu']['mlp/~/head']['w'],
                                case['opt_state'][0].nu['mlp/~/linear_1']['w'])


def test_nnx_model_and_optimizer_follow_a_widening(tmp_path):
  case = docs.nnx_optimizer(tmp_path)
  spec = """\
params: model
opt_state: optimizer
ops:
  - pad: {match: '^linear1/kernel/value$', axis: 1, to: 12, mirror_init: zeros}
  - pad: {match: '^linear1/bias/value$|^bn/(bias|mean)/value$', axis: 0, to: 12, mirror_init: zeros}
  - pad: {match: '^bn/(scale|var)/value$', axis: 0, to: 12, init: ones, mirror_init: zeros}
  - pad: {match: '^linear2/kernel/value$', axis: 0, to: 12, mirror_init: zeros}
"""
  rec = run(case['path'], tmp_path / 'out', spec)
  assert rec['status'] == 'ok', rec['error']
  wider = lambda: docs.MLP(4, 12, 2, rngs=nnx.Rngs(0))
  out = ocp.StandardCheckpointer().restore(tmp_path / 'out', case['new_target'](wider))
  ones = lambda p: 1.0 if re.search(r'^model/bn/(scale|var)/value$', p) else 0.0
  assert_by_hand(out, case['saved'], fill=ones)
  model = nnx.merge(nnx.graphdef(nnx.eval_shape(wider)), out['model'])
  model.eval()
  old = case['model']
  old.eval()
  x, _ = docs._data()
  np.testing.assert_allclose(model(x), old(x), rtol=1e-5, atol=1e-5)


def test_nnx_state_at_the_root(tmp_path):
  """The NNX guide saves `nnx.state(model)` alone: `params: ''` is the whole state."""
  model = docs.MLP(4, 8, 2, rngs=nnx.Rngs(0))
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / 'in', nnx.state(model))
  rec = run(tmp_path / 'in', tmp_path / 'out',
            "params: ''\nops: [{rename: {match: '^linear2/', to: 'head/'}}]")
  assert rec['status'] == 'ok', rec['error']
  raw = ocp.StandardCheckpointer().restore(tmp_path / 'out')
  assert set(raw) == {'linear1', 'bn', 'head'}
  np.testing.assert_array_equal(raw['head']['kernel']['value'], model.linear2.kernel.value)
  rec = run(tmp_path / 'in', tmp_path / 'out2', "ops: [{rename: {match: '^linear2/', to: 'head/'}}]")
  assert rec['status'] == 'failed' and "params: ''" not in rec['error'] and "to '' when" in rec['error']


def test_sm3_list_moments_follow_renames_and_fail_shape_changes_by_name(tmp_path):
  case = docs.sm3(tmp_path)
  rec = run(case['path'], tmp_path / 'out', "ops: [{rename: {match: '^head/', to: 'classifier/'}}]")
  assert rec['status'] == 'ok', rec['error']
  raw = leaves(ocp.StandardCheckpointer().restore(tmp_path / 'out'))
  assert 'opt_state/0/mu/classifier/kernel/0' in raw
  rec = run(case['path'], tmp_path / 'out2', WIDEN_BACKBONE_AND_HEAD)
  assert rec['status'] == 'failed'
  assert "opt_state/0/mu leaf 'backbone/Dense_1/kernel' is a list" in rec['error'], rec['error']
  rec = run(case['path'], tmp_path / 'out3', WIDEN_BACKBONE_AND_HEAD + 'optimizer: {factory: optax.sm3, kwargs: {learning_rate: 0.01}}\n')
  assert rec['status'] == 'ok', rec['error']
  out = restore(case, tmp_path / 'out3', case['new_target'](widened(case['params'])))
  assert step_is_finite(case['tx'], out['params'], out['opt_state'])


@pytest.mark.parametrize('build', [docs.msgpack_to_bytes, docs.msgpack_legacy_checkpoints],
                         ids=lambda f: f.__name__)
def test_msgpack_inputs_with_prefix_masks_migrate_to_orbax(tmp_path, build):
  """Flax msgpack keeps a MaskedNode as {} (to_bytes of the prefix-masked chain):
  the same placeholder, the same surgery, an Orbax output."""
  case = build(tmp_path)
  rec = run(case['path'], tmp_path / 'out', WIDEN_BACKBONE_AND_HEAD)
  assert rec['status'] == 'ok', rec['error']
  new_params = widened(case['params'])
  out = ocp.PyTreeCheckpointer().restore(tmp_path / 'out', args=ocp.args.PyTreeRestore(
      item=case['new_target'](new_params),
      restore_args=ocp.checkpoint_utils.construct_restore_args(case['new_target'](new_params))))
  assert_by_hand(out, case['saved'])
  assert step_is_finite(case['tx'], out['params'], out['opt_state'])


def test_inspect_and_plan_show_what_follows_the_params(tmp_path):
  from etils import epath  # pylint: disable=g-import-not-at-top
  from pipeline import checkpoint, inspection, plan
  from transforms import load_spec  # pylint: disable=g-import-not-at-top
  bn = docs.linen_trainstate_batch_stats(tmp_path)
  ahead = docs.lookahead(tmp_path)
  roles = {}
  for src in (bn['step_path'], ahead['path']):
    _, meta = checkpoint.read_metadata(epath.Path(src))
    roles.update({row[0]: row[4] for row in inspection.leaf_rows(meta)})
  assert roles['batch_stats/BatchNorm_0/mean'] == 'collection'
  assert roles['opt_state/0/mu/BatchNorm_0/scale'] == 'mirror'
  assert roles['opt_state/fast_state/0/nu/head/kernel'] == 'mirror of fast/'
  result = plan.plan_checkpoints([bn['step_path']], load_spec("ops: [{rename: {match: '^Dense_0/', to: 'In/'}}]"))
  assert result['groups'][0]['roles'] == {
      'opt_state/0/mu': 'mirror of the params', 'opt_state/0/nu': 'mirror of the params',
      'batch_stats': 'collection'}


@pytest.mark.parametrize('optimizer', ['', "optimizer: {factory: 'tests.optimizers:frozen_backbone'}\n"],
                         ids=['no_optimizer', 'optimizer'])
def test_dropping_part_of_a_masked_out_prefix_keeps_the_placeholder_there(tmp_path, optimizer):
  case = docs.multi_transform_prefix(tmp_path)
  rec = run(case['path'], tmp_path / 'out', optimizer + "ops: [{drop: {match: '^backbone/Dense_1/'}}]")
  assert rec['status'] == 'ok', rec['error']
  params = {'backbone': {'Dense_0': case['params']['backbone']['Dense_0']}, 'head': case['params']['head']}
  out = restore(case, tmp_path / 'out', case['new_target'](params))
  assert_by_hand(out, case['saved'])
