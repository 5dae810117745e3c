"""`relayout` (issue 26): the batch-norm guide's Linen TrainState, saved by a
CheckpointManager, migrated to what NNX's guide saves, which the NNX model
and nnx.Optimizer restore and take a step from; and NNX's back to Linen's."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from tests.scenarios.doc_checkpoints import MLP, _data, linen_trainstate_batch_stats
from tests.test_stream import migrated
from transforms import SurgeryError, load_spec

@pytest.fixture(scope='module')
def linen(tmp_path_factory):
  """The batch-norm guide's TrainState, saved by a CheckpointManager (read only)."""
  return linen_trainstate_batch_stats(tmp_path_factory.mktemp('linen'))


SPEC = """params: ''
ops:
  - relayout: {preset: linen_to_nnx, names: {Dense_0: linear1, BatchNorm_0: bn, Dense_1: linear2}}
"""


def test_a_linen_trainstate_becomes_an_nnx_model_and_optimizer_that_train(linen, tmp_path):
  rec = migrated(linen['step_path'], tmp_path / 'out', SPEC)
  assert rec['status'] == 'ok', rec['error']
  make_model = lambda: MLP(4, 8, 2, rngs=nnx.Rngs(0))
  tx = optax.adam(1e-2)
  target = {'model': nnx.state(nnx.eval_shape(make_model)),
            'optimizer': nnx.state(nnx.eval_shape(
                lambda: nnx.Optimizer(make_model(), tx, wrt=nnx.Param)))}
  got = ocp.Checkpointer(ocp.CompositeCheckpointHandler()).restore(
      tmp_path / 'out', args=ocp.args.Composite(default=ocp.args.StandardRestore(target)))['default']
  state = linen['state']
  pairs = [(got['model']['linear1']['kernel'], state.params['Dense_0']['kernel']),
           (got['model']['bn']['mean'], state.batch_stats['BatchNorm_0']['mean']),
           (got['optimizer']['opt_state'][0]['mu']['linear2']['bias'],
            state.opt_state[0].mu['Dense_1']['bias'])]
  for nnx_value, linen_value in pairs:
    assert np.asarray(nnx_value.value).tobytes() == np.asarray(linen_value).tobytes()
  assert int(got['optimizer']['step'].value) == int(state.step)
  model = make_model()
  nnx.update(model, got['model'])
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  nnx.update(optimizer, got['optimizer'])
  x, y = _data()
  optimizer.update(model, nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model))
  assert int(optimizer.step.value) == int(state.step) + 1
  assert all(np.isfinite(np.asarray(l)).all() for l in jax.tree.leaves(nnx.state(model)))


def test_relayout_must_be_last_and_know_its_preset():
  with pytest.raises(ValueError, match='must be the last op'):
    load_spec("params: ''\nops: [{relayout: {preset: linen_to_nnx}}, {drop: {match: x}}]")
  with pytest.raises(ValueError, match="'preset': 'torch' is not one of linen_to_nnx"):
    load_spec("params: ''\nops: [{relayout: {preset: torch}}]")


def test_plan_shows_each_leaf_moved_and_run_patches_the_copy(linen, tmp_path):
  """Every leaf is moved, none computed: plan lists the moves, and run
  writes by copy-and-patch (keys renamed in the index, no value rewritten)."""
  from pipeline import plan  # pylint: disable=g-import-not-at-top
  [group] = plan.plan_checkpoints([linen['step_path']], load_spec(SPEC))['groups']
  assert {'kind': 'renamed', 'path': 'params/Dense_0/kernel',
          'detail': 'model/linear1/kernel/value'} in group['changes']
  assert {'kind': 'renamed', 'path': 'step', 'detail': 'optimizer/step/value'} in group['changes']
  assert group['bytes_untouched'] == group['bytes_after']['total']
  rec = migrated(linen['step_path'], tmp_path / 'out', SPEC)
  assert rec['write_path'] == 'copy_and_patch' and rec['bytes_carried'] == rec['bytes_out']


def test_a_state_with_something_nnx_has_no_place_for_fails_by_name(tmp_path):
  from transforms import Surgery  # pylint: disable=g-import-not-at-top
  state = {'params': {'Dense_0': {'kernel': jnp.ones((2, 2))}}, 'rng': jnp.ones(2),
           'opt_state': [{'count': jnp.zeros((), jnp.int32)}, None]}
  with pytest.raises(SurgeryError, match="'rng' is not a collection of the model nor its step"):
    Surgery(load_spec(SPEC))(state)
  with pytest.raises(SurgeryError, match="say params: '' in the spec"):
    Surgery(load_spec(SPEC.replace("params: ''", 'params: params')))(
        {'params': state['params'], 'opt_state': state['opt_state']})


BACK = """params: ''
opt_state: optimizer
ops:
  - relayout: {preset: nnx_to_linen, opt_states: 2,
               names: {linear1: Dense_0, bn: BatchNorm_0, linear2: Dense_1}}
"""


def test_the_nnx_guides_checkpoint_becomes_a_linen_trainstate_that_trains(linen, tmp_path):
  """The way back: NNX's model and optimizer state (saved as its guide
  saves them) restore into the batch-norm guide's Linen TrainState, its
  BatchNorm statistics in batch_stats, and train a step; and there and
  back again is the input, bit for bit."""
  from tests.scenarios.doc_checkpoints import nnx_optimizer  # pylint: disable=g-import-not-at-top
  nnx_case = nnx_optimizer(tmp_path)
  rec = migrated(nnx_case['path'], tmp_path / 'linen', BACK)
  assert rec['status'] == 'ok', rec['error']
  assert rec['write_path'] == 'copy_and_patch'
  target = jax.eval_shape(lambda: linen['state'])
  got = ocp.StandardCheckpointer().restore(tmp_path / 'linen', target)
  model, optimizer = nnx_case['model'], nnx_case['optimizer']
  pairs = [(got.params['Dense_0']['kernel'], model.linear1.kernel.value),
           (got.batch_stats['BatchNorm_0']['var'], model.bn.var.value),
           (got.opt_state[0].nu['Dense_1']['bias'], optimizer.opt_state[0].nu['linear2']['bias'].value)]
  for linen_value, nnx_value in pairs:
    assert np.asarray(linen_value).tobytes() == np.asarray(nnx_value).tobytes()
  assert int(got.step) == int(optimizer.step.value)
  from tests.scenarios.doc_checkpoints import batch_norm_train_step  # pylint: disable=g-import-not-at-top
  stepped = batch_norm_train_step(*_data())(got.replace(apply_fn=linen['state'].apply_fn,
                                                       tx=linen['tx']))
  assert all(np.isfinite(np.asarray(l)).all() for l in jax.tree.leaves(stepped.params))
  again = migrated(tmp_path / 'linen', tmp_path / 'nnx', SPEC)
  assert again['status'] == 'ok', again['error']
  before = ocp.StandardCheckpointer().restore(nnx_case['path'])
  after = ocp.StandardCheckpointer().restore(tmp_path / 'nnx')
  assert jax.tree.map(lambda x: np.asarray(x).tobytes(), after) == jax.tree.map(
      lambda x: np.asarray(x).tobytes(), before)


def test_nnx_state_linen_has_no_place_for_fails_by_name():
  """An nnx.Rngs count in the model's state is neither a param nor a
  statistic: refused, not put among batch_stats."""
  from transforms import Surgery  # pylint: disable=g-import-not-at-top
  state = {'model': {'linear': {'kernel': {'value': jnp.ones((2, 2))}},
                     'rngs': {'default': {'count': {'value': jnp.zeros((), jnp.uint32)}}}},
           'optimizer': {'step': {'value': jnp.zeros((), jnp.uint32)},
                         'opt_state': {'0': {'mu': {'linear': {'kernel': {'value': jnp.ones((2, 2))}}}}}}}
  with pytest.raises(SurgeryError, match=r"model/rngs/default/count/value is neither a param"):
    Surgery(load_spec(BACK))(state)
