"""A migrated checkpoint keeps training, for every optimizer state shape.

An MLP trained a few steps; its hidden layer widened with `pad` (and the next
layer's input), its head renamed. Through real Orbax checkpoints: the output
restores typed against the optimizer's abstract state for the new params, the
wider network computes what the old one did, the head's moments are the old
ones padded with zeros, and one update step gives finite params.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from pipeline import migrate
from pipeline.compute import worker
from tests import optimizers
from tests.conftest import mlp, trained
from transforms import flatten, load_spec, Surgery
from transforms import key_path

WIDEN = """\
ops:
  - pad: {match: '^Dense_0/kernel$', axis: 1, to: 10, mirror_init: zeros}
  - pad: {match: '^Dense_0/bias$', axis: 0, to: 10, mirror_init: zeros}
  - pad: {match: '^Dense_1/kernel$', axis: 0, to: 10, mirror_init: zeros}
  - rename: {match: '^Dense_1/', to: 'Head/'}
"""


def forward(params, x):
  head = params.get('Head', params.get('Dense_1'))
  hidden = jax.nn.relu(x @ params['Dense_0']['kernel'] + params['Dense_0']['bias'])
  return hidden @ head['kernel'] + head['bias']


def opt_leaves(opt_state):
  return {key_path(k): np.asarray(x) for k, x in jax.tree_util.tree_flatten_with_path(opt_state)[0]}


def migrate_checkpoint(tmp_path, name, with_optimizer):
  tx = optimizers.FACTORIES[name]()
  params, opt_state = trained(tx, mlp((4, 6, 3)), steps=3)
  ocp.PyTreeCheckpointer().save(tmp_path / 'in', {'params': params, 'opt_state': opt_state, 'step': 3})
  spec = WIDEN + (f"optimizer: {{factory: 'tests.optimizers:{name}'}}\n" if with_optimizer else '')
  worker.WORKER.clear()
  rec = migrate.migrate_one(str(tmp_path / 'in'), str(tmp_path / 'out'), worker.surgery_for(spec))
  return tx, params, opt_state, rec


@pytest.mark.parametrize('with_optimizer', [True, False], ids=['optimizer', 'no_optimizer'])
@pytest.mark.parametrize('name', sorted(optimizers.FACTORIES))
def test_widened_checkpoint_keeps_training(tmp_path, name, with_optimizer):
  tx, params, opt_state, rec = migrate_checkpoint(tmp_path, name, with_optimizer)
  if name == 'adafactor' and not with_optimizer:
    assert rec['status'] == 'failed'
    assert "opt_state/0/v leaf 'Dense_0/kernel' has shape (1,), not its param's (4, 6)" in rec['error']
    assert "'optimizer:'" in rec['error']
    return
  assert rec['status'] == 'ok', rec['error']
  # Restore typed, as a user resuming training would.
  new_abstract = {'Dense_0': {'kernel': jax.ShapeDtypeStruct((4, 10), jnp.float32),
                              'bias': jax.ShapeDtypeStruct((10,), jnp.float32)},
                  'Head': {'kernel': jax.ShapeDtypeStruct((10, 3), jnp.float32),
                           'bias': jax.ShapeDtypeStruct((3,), jnp.float32)}}
  target = {'params': new_abstract, 'opt_state': jax.eval_shape(tx.init, new_abstract), 'step': 0}
  out = ocp.StandardCheckpointer().restore(tmp_path / 'out', target)
  assert jax.tree_util.tree_structure(out['opt_state']) == jax.tree_util.tree_structure(target['opt_state'])
  # The wider network computes what the old one did.
  x = jax.random.normal(jax.random.PRNGKey(7), (5, 4))
  np.testing.assert_allclose(forward(out['params'], x), forward(params, x), rtol=1e-6, atol=1e-6)
  # The head's moments: the old moments padded with zeros, not reset.
  old, new = opt_leaves(opt_state), opt_leaves(out['opt_state'])
  carried = 0
  for path, value in new.items():
    before = old.get(path.replace('Head/', 'Dense_1/'))
    if path.endswith('Head/kernel') and value.shape == (10, 3) and before is not None:
      np.testing.assert_array_equal(value[:6], before)
      assert not value[6:].any()
      carried += bool(before.any())
  assert carried, f'no non-zero head moment was carried over for {name}'
  # One step of the optimizer on the result.
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, out['params']), out['opt_state'], out['params'])
  stepped = optax.apply_updates(out['params'], updates)
  assert all(bool(jnp.isfinite(v).all()) for v in jax.tree_util.tree_leaves(stepped))


def test_adafactor_rebuilds_only_what_cannot_follow(tmp_path):
  tx, _, opt_state, rec = migrate_checkpoint(tmp_path, 'adafactor', True)
  assert rec['status'] == 'ok', rec['error']
  out = opt_leaves(ocp.PyTreeCheckpointer().restore(tmp_path / 'out')['opt_state'])
  old = opt_leaves(opt_state)
  # Head/bias is small: its full `v` follows the pad-free rename unchanged.
  assert np.array_equal(out['0/v/Head/bias'], old['0/v/Dense_1/bias']) and old['0/v/Dense_1/bias'].any()
  # Dense_0/kernel was factored: its v_col cannot follow a pad, so init rebuilt it.
  assert out['0/v_col/Dense_0/kernel'].shape == (10,) and not out['0/v_col/Dense_0/kernel'].any()


ADD = """\
ops:
  - add: {path: 'Extra/kernel', shape: [4, 6], init: normal}
  - add: {path: 'Extra/bias', shape: [6]}
"""


# Their mirrors are not full param-shaped copies: what belongs there for a new
# leaf (a factored dummy? masked or not?) only the optimizer can say.
PARTIAL_MIRRORS = {'adafactor', 'masked', 'multi_transform', 'nested'}


@pytest.mark.parametrize('with_optimizer', [True, False], ids=['optimizer', 'no_optimizer'])
@pytest.mark.parametrize('name', sorted(optimizers.FACTORIES))
def test_added_leaves_get_the_optimizers_own_entries(tmp_path, name, with_optimizer):
  """With `optimizer:`, a new leaf's entries in every mirror come from the
  optimizer's init: factored dummies for Adafactor, nothing where masked.
  Without it, zeros where the mirror copies the params, else a clear failure."""
  tx = optimizers.FACTORIES[name]()
  params, opt_state = trained(tx, mlp((4, 6, 3)), steps=3)
  ocp.PyTreeCheckpointer().save(tmp_path / 'in', {'params': params, 'opt_state': opt_state})
  worker.WORKER.clear()
  spec = ADD + (f"optimizer: {{factory: 'tests.optimizers:{name}'}}\n" if with_optimizer else '')
  rec = migrate.migrate_one(str(tmp_path / 'in'), str(tmp_path / 'out'), worker.surgery_for(spec))
  if name in PARTIAL_MIRRORS and not with_optimizer:
    assert rec['status'] == 'failed'
    assert 'is not a full copy of the params' in rec['error'] and "'optimizer:'" in rec['error']
    assert rec['error'].startswith('SurgeryError: ops[0] (add): opt_state/')
    return
  assert rec['status'] == 'ok', rec['error']
  new_abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
      {**params, 'Extra': {'kernel': jnp.zeros((4, 6)), 'bias': jnp.zeros(6)}})
  target = {'params': new_abstract, 'opt_state': jax.eval_shape(tx.init, new_abstract)}
  out = ocp.StandardCheckpointer().restore(tmp_path / 'out', target)
  assert opt_leaves(out['opt_state']).keys() == opt_leaves(target['opt_state']).keys()
  old = opt_leaves(opt_state)
  for path, value in opt_leaves(out['opt_state']).items():
    if path in old:  # every existing leaf is carried over untouched
      np.testing.assert_array_equal(value, old[path])
