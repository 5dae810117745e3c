"""Checkpoints written the way the Flax, Optax and Orbax docs write them.

Fixtures for the tests of issue 11: each builder trains a tiny model (a few
hundred parameters, deterministic, 2-3 steps with real gradients so optimizer
moments are non-zero), SAVES it under `directory` with the docs' own API, and
returns a plain dict:

  path        the checkpoint to give the tool (for a CheckpointManager: its root)
  format      'orbax' | 'orbax_manager' | 'msgpack'
  saved       the exact tree that was saved (typed, concrete)
  params      the params pytree as trained (typed)
  opt_state   the optimizer state as trained (typed)
  tx          the optax GradientTransformation
  new_target  fn(new_params) -> abstract target of the whole saved tree, as a
              user resuming would build it (jax.eval_shape of tx.init, ...);
              for NNX fn(new_model_fn=None), from the model's constructor
  abstract_target  fn() -> new_target of the params as trained
  restore     fn(target=None) -> the tree restored from `path` with the
              library the docs use to read it (without target: target-less)

plus per-case extras (step, manager step, params/opt_state keys, files).
"""
import os
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from flax import serialization
from flax.training import checkpoints as flax_checkpoints
from flax.training import train_state

STEPS = 3


# ---------------------------------------------------------------- helpers


def _data(n_in=4, n_out=2, n=16, seed=0):
  kx, ky = jax.random.split(jax.random.key(seed))
  return jax.random.normal(kx, (n, n_in)), jax.random.normal(ky, (n, n_out))


def _dense(key, din, dout, w='kernel', b='bias'):
  kw, kb = jax.random.split(key)
  return {w: jax.random.normal(kw, (din, dout)) / np.sqrt(din),
          b: 0.1 * jax.random.normal(kb, (dout,))}


def _backbone_head_params(seed=0):
  """{'backbone': {'Dense_0', 'Dense_1'}, 'head'} as a Linen model names them."""
  k0, k1, k2 = jax.random.split(jax.random.key(seed), 3)
  return {'backbone': {'Dense_0': _dense(k0, 4, 8), 'Dense_1': _dense(k1, 8, 8)},
          'head': _dense(k2, 8, 2)}


def _backbone_head_loss(params):
  x, y = _data()
  h = jnp.tanh(x @ params['backbone']['Dense_0']['kernel'] + params['backbone']['Dense_0']['bias'])
  h = jnp.tanh(h @ params['backbone']['Dense_1']['kernel'] + params['backbone']['Dense_1']['bias'])
  out = h @ params['head']['kernel'] + params['head']['bias']
  return jnp.mean((out - y) ** 2)


def _train(params, tx, loss, steps=STEPS, grad_fn=None):
  """The optax quick-start loop: grad, tx.update, apply_updates.

  grad_fn(params) -> grads; default jax.grad(loss).
  """
  grad_fn = grad_fn or jax.grad(loss)
  opt_state = tx.init(params)
  for _ in range(steps):
    grads = grad_fn(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  return params, opt_state


def _orbax_case(directory, name, params, tx, loss, checkpointer='standard', grad_fn=None):
  """Train with optax, save {'params', 'opt_state', 'step'} with one Orbax checkpointer."""
  params, opt_state = _train(params, tx, loss, grad_fn=grad_fn)
  saved = {'params': params, 'opt_state': opt_state, 'step': STEPS}
  path = os.path.join(os.path.abspath(directory), name)
  ckptr = ocp.StandardCheckpointer() if checkpointer == 'standard' else ocp.PyTreeCheckpointer()
  ckptr.save(path, saved)
  if hasattr(ckptr, 'wait_until_finished'):
    ckptr.wait_until_finished()

  def new_target(new_params):
    return {'params': jax.eval_shape(lambda: new_params),
            'opt_state': jax.eval_shape(tx.init, new_params),
            'step': STEPS}

  def restore(target=None):
    if checkpointer == 'standard':
      return ocp.StandardCheckpointer().restore(path, target)
    if target is None:
      return ocp.PyTreeCheckpointer().restore(path)
    return ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)))

  return {'path': path, 'format': 'orbax', 'checkpointer': checkpointer, 'saved': saved,
          'params': params, 'opt_state': opt_state, 'tx': tx, 'step': STEPS,
          'params_key': 'params', 'opt_state_key': 'opt_state',
          'new_target': new_target, 'abstract_target': lambda: new_target(params),
          'restore': restore}


# ---------------------------------------------------------------- 1. NNX


class MLP(nnx.Module):
  """Linear -> BatchNorm -> relu -> Linear, as in the Flax NNX basics."""

  def __init__(self, din, dmid, dout, *, rngs: nnx.Rngs):
    self.linear1 = nnx.Linear(din, dmid, rngs=rngs)
    self.bn = nnx.BatchNorm(dmid, rngs=rngs)
    self.linear2 = nnx.Linear(dmid, dout, rngs=rngs)

  def __call__(self, x):
    return self.linear2(nnx.relu(self.bn(self.linear1(x))))


def nnx_optimizer(directory) -> dict:
  """Flax NNX "Save and load checkpoints" guide + nnx.Optimizer (MNIST tutorial).

  One tree {'model': nnx.state(model), 'optimizer': nnx.state(optimizer)}
  saved with ocp.StandardCheckpointer (the common way users save both; the
  guide itself saves `_, state = nnx.split(model)` the same way). Restored
  without target every leaf ends in '/value' (nnx.Variable), the optax tuple
  index is a key '0', and EmptyState leaves no trace at all.
  """
  tx = optax.adam(1e-2)
  make_model = lambda: MLP(4, 8, 2, rngs=nnx.Rngs(0))
  model = make_model()
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x, y = _data()

  def loss_fn(model):
    return jnp.mean((model(x) - y) ** 2)

  for _ in range(2):
    _, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)

  saved = {'model': nnx.state(model), 'optimizer': nnx.state(optimizer)}
  path = os.path.join(os.path.abspath(directory), 'nnx_optimizer')
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(path, saved)
  ckptr.wait_until_finished()

  def new_target(new_model_fn=None):
    """The guide's restore target: nnx.eval_shape of the constructors, then nnx.state.

    new_model_fn: constructor of the migrated model (default: this one).
    """
    fn = new_model_fn or make_model
    abs_model = nnx.eval_shape(fn)
    abs_opt = nnx.eval_shape(lambda: nnx.Optimizer(fn(), tx, wrt=nnx.Param))
    return {'model': nnx.state(abs_model), 'optimizer': nnx.state(abs_opt)}

  def restore(target=None):
    return ocp.StandardCheckpointer().restore(path, target)

  return {'path': path, 'format': 'orbax', 'checkpointer': 'standard', 'saved': saved,
          'params': nnx.state(model, nnx.Param), 'opt_state': optimizer.opt_state,
          'tx': tx, 'step': 2, 'model': model, 'optimizer': optimizer,
          'params_key': 'model', 'opt_state_key': 'optimizer',
          'make_model': make_model, 'new_target': new_target,
          'abstract_target': new_target, 'restore': restore}


# ---------------------------------------------------------------- 2. Linen TrainState


class CNN(nn.Module):
  """Dense -> BatchNorm -> relu -> Dense, as in the Flax "Batch normalization" guide."""

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(features=8)(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.relu(x)
    return nn.Dense(features=2)(x)


class TrainState(train_state.TrainState):
  """The batch-norm guide's TrainState with a `batch_stats` field."""
  batch_stats: Any


def batch_norm_train_step(x, y):
  """The batch-norm guide's jitted training step on (x, y): gradients
  applied, batch_stats updated."""
  @jax.jit
  def train_step(state):
    def loss_fn(params):
      out, updates = state.apply_fn({'params': params, 'batch_stats': state.batch_stats},
                                    x, train=True, mutable=['batch_stats'])
      return jnp.mean((out - y) ** 2), updates
    grads, updates = jax.grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads)
    return state.replace(batch_stats=updates['batch_stats'])
  return train_step


def linen_trainstate_batch_stats(directory) -> dict:
  """Flax "Batch normalization" guide + Orbax "Checkpointing with Orbax" (101).

  The 101 page's CheckpointManager form: ocp.CheckpointManager(dir,
  options=ocp.CheckpointManagerOptions(max_to_keep=..)) and
  mngr.save(step, args=ocp.args.StandardSave(state)) with the whole
  TrainState: a single unnamed item, stored as <root>/<step>/default/.
  apply_fn and tx are pytree_node=False fields: not saved.
  """
  x, y = _data()
  model = CNN()
  variables = model.init(jax.random.key(0), x, train=False)
  tx = optax.adam(1e-2)
  state = TrainState.create(apply_fn=model.apply, params=variables['params'], tx=tx,
                            batch_stats=variables['batch_stats'])

  train_step = batch_norm_train_step(x, y)
  for _ in range(STEPS):
    state = train_step(state)

  root = os.path.join(os.path.abspath(directory), 'linen_trainstate_batch_stats')
  options = ocp.CheckpointManagerOptions(max_to_keep=3, create=True)
  step = int(state.step)
  with ocp.CheckpointManager(root, options=options) as mngr:
    mngr.save(step, args=ocp.args.StandardSave(state))
    mngr.wait_until_finished()

  def new_target(new_params, new_batch_stats=None):
    bs = state.batch_stats if new_batch_stats is None else new_batch_stats
    return jax.eval_shape(lambda: TrainState.create(apply_fn=model.apply, params=new_params,
                                                    tx=tx, batch_stats=bs))

  def restore(target=None):
    with ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(read_only=True)) as m:
      if target is None:
        return m.restore(step)
      return m.restore(step, args=ocp.args.StandardRestore(target))

  return {'path': root, 'step_path': os.path.join(root, str(step)), 'item_path':
          os.path.join(root, str(step), 'default'), 'format': 'orbax_manager',
          'checkpointer': 'CheckpointManager+StandardSave', 'saved': state, 'state': state,
          'params': state.params, 'opt_state': state.opt_state,
          'batch_stats': state.batch_stats, 'tx': tx, 'step': step,
          'params_key': 'params', 'opt_state_key': 'opt_state',
          'new_target': new_target, 'abstract_target': lambda: new_target(state.params),
          'restore': restore}


# ---------------------------------------------------------------- 3-5. multi_transform / masked


def multi_transform_prefix(directory) -> dict:
  """optax.multi_transform docs: param_labels may be a prefix of the params tree.

  {'frozen': set_to_zero(), 'train': adamw}, labels {'backbone': 'frozen',
  'head': 'train'}; saved with ocp.PyTreeCheckpointer as
  {'params', 'opt_state', 'step'}.
  """
  tx = optax.multi_transform({'frozen': optax.set_to_zero(), 'train': optax.adamw(1e-3)},
                             {'backbone': 'frozen', 'head': 'train'})
  return _orbax_case(directory, 'multi_transform_prefix', _backbone_head_params(), tx,
                     _backbone_head_loss, checkpointer='pytree')


def multi_transform_deeper_labels(directory) -> dict:
  """optax.multi_transform docs, labels one level down (a prefix at depth 2); StandardCheckpointer."""
  tx = optax.multi_transform(
      {'frozen': optax.set_to_zero(), 'train': optax.adamw(1e-3)},
      {'backbone': {'Dense_0': 'frozen', 'Dense_1': 'train'}, 'head': 'train'})
  return _orbax_case(directory, 'multi_transform_deeper_labels', _backbone_head_params(), tx,
                     _backbone_head_loss)


def _masked_prefix_tx():
  """adam on the head, sgd+momentum on the backbone, both by prefix masks.

  optax.masked passes masked-out updates through unchanged, so each param is
  transformed by exactly one of the two.
  """
  return optax.chain(
      optax.masked(optax.adam(1e-3), {'backbone': False, 'head': True}),
      optax.masked(optax.sgd(1e-2, momentum=0.9), {'backbone': True, 'head': False}))


def masked_prefix(directory) -> dict:
  """optax.masked docs: the mask may be a prefix of the params tree; StandardCheckpointer.

  chain(masked(adam, {'backbone': False, 'head': True}),
  masked(sgd(momentum), {'backbone': True, 'head': False})): two
  complementary mirrors, each with one MaskedNode at a prefix path.
  """
  tx = _masked_prefix_tx()
  return _orbax_case(directory, 'masked_prefix', _backbone_head_params(), tx, _backbone_head_loss)


# ---------------------------------------------------------------- 6-8, 10. other optax states


def lookahead(directory) -> dict:
  """optax.lookahead docs: params are optax.LookaheadParams.init_synced(params).

  As its docstring does: grads = jax.grad(loss)(params.fast), then
  opt.update(grads, state, params). 3 steps with sync_period=2: one sync
  happened, fast != slow. Saved params are the LookaheadParams (fast and
  slow); StandardCheckpointer.
  """
  tx = optax.lookahead(optax.adam(1e-3), sync_period=2, slow_step_size=0.5)
  params = optax.LookaheadParams.init_synced(_backbone_head_params())
  return _orbax_case(directory, 'lookahead', params, tx, None,
                     grad_fn=lambda p: jax.grad(_backbone_head_loss)(p.fast))


def cocob(directory) -> dict:
  """optax.contrib.cocob docs (its init is not zeros); StandardCheckpointer.

  COCOBState(init_particles, cumulative_gradients, scale, subgradients,
  reward): init_particles are a copy of the initial params, scale starts at
  eps (1e-8), the others at zeros; cocob is chain(EmptyState, EmptyState,
  COCOBState) (weight decay and its mask come first).
  """
  tx = optax.contrib.cocob(learning_rate=1.0, alpha=100.0)
  return _orbax_case(directory, 'cocob', _backbone_head_params(), tx, _backbone_head_loss)


def haiku_style_keys(directory) -> dict:
  """Params named as haiku.transform names them ('mlp/~/linear_0': {'w', 'b'}), adam.

  Haiku is not installed: the dict is built by hand with Haiku's names and
  shapes; StandardCheckpointer.
  """
  k0, k1 = jax.random.split(jax.random.key(0))
  params = {'mlp/~/linear_0': _dense(k0, 4, 8, 'w', 'b'),
            'mlp/~/linear_1': _dense(k1, 8, 2, 'w', 'b')}

  def loss(p):
    x, y = _data()
    h = jax.nn.relu(x @ p['mlp/~/linear_0']['w'] + p['mlp/~/linear_0']['b'])
    return jnp.mean((h @ p['mlp/~/linear_1']['w'] + p['mlp/~/linear_1']['b'] - y) ** 2)

  return _orbax_case(directory, 'haiku_style_keys', params, optax.adam(1e-3), loss)


def sm3(directory) -> dict:
  """optax.sm3 docs: its moments `mu` are lists of per-axis accumulators; StandardCheckpointer."""
  return _orbax_case(directory, 'sm3', _backbone_head_params(), optax.sm3(1e-2),
                     _backbone_head_loss)


# ---------------------------------------------------------------- 9. msgpack


def msgpack_to_bytes(directory) -> dict:
  """Flax "Serialization" docs: flax.serialization.to_bytes of {'params', 'opt_state', 'step'}.

  Written to <directory>/msgpack_to_bytes/state.msgpack. The optimizer is
  masked_prefix's (two prefix-masked optimizers in a chain) so the file
  holds tuples, NamedTuples, MaskedNode and EmptyState. from_bytes(target,
  bytes) restores typed; msgpack_restore(bytes) gives the state dict: tuples
  and lists as dicts keyed '0', '1', ...; NamedTuples as dicts of their
  fields; MaskedNode and EmptyState as {}; None stays None.
  """
  tx = _masked_prefix_tx()
  params, opt_state = _train(_backbone_head_params(), tx, _backbone_head_loss)
  saved = {'params': params, 'opt_state': opt_state, 'step': STEPS}
  folder = os.path.join(os.path.abspath(directory), 'msgpack_to_bytes')
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, 'state.msgpack')
  with open(path, 'wb') as f:
    f.write(serialization.to_bytes(saved))

  def new_target(new_params):
    return {'params': jax.eval_shape(lambda: new_params),
            'opt_state': jax.eval_shape(tx.init, new_params), 'step': STEPS}

  def restore(target=None):
    with open(path, 'rb') as f:
      data = f.read()
    return serialization.msgpack_restore(data) if target is None else \
        serialization.from_bytes(target, data)

  return {'path': path, 'format': 'msgpack', 'checkpointer': 'flax.serialization.to_bytes',
          'saved': saved, 'params': params, 'opt_state': opt_state, 'tx': tx, 'step': STEPS,
          'params_key': 'params', 'opt_state_key': 'opt_state',
          'new_target': new_target, 'abstract_target': lambda: new_target(params),
          'restore': restore}


def msgpack_legacy_checkpoints(directory) -> dict:
  """Flax Linen legacy "use_checkpointing" guide with Orbax turned off.

  flax.config.update('flax_use_orbax_checkpointing', False), then
  flax.training.checkpoints.save_checkpoint(dir, target, step): one msgpack
  file <dir>/checkpoint_<step>. restore_checkpoint(dir, target=None) reads it.
  """
  tx = optax.adam(1e-3)
  params, opt_state = _train(_backbone_head_params(), tx, _backbone_head_loss)
  saved = {'params': params, 'opt_state': opt_state, 'step': STEPS}
  folder = os.path.join(os.path.abspath(directory), 'msgpack_legacy_checkpoints')
  previous = flax.config.flax_use_orbax_checkpointing
  flax.config.update('flax_use_orbax_checkpointing', False)
  try:
    path = flax_checkpoints.save_checkpoint(folder, target=saved, step=STEPS, keep=3)
  finally:
    flax.config.update('flax_use_orbax_checkpointing', previous)

  def new_target(new_params):
    return {'params': jax.eval_shape(lambda: new_params),
            'opt_state': jax.eval_shape(tx.init, new_params), 'step': STEPS}

  def restore(target=None):
    flax.config.update('flax_use_orbax_checkpointing', False)
    try:
      return flax_checkpoints.restore_checkpoint(path, target=target)
    finally:
      flax.config.update('flax_use_orbax_checkpointing', previous)

  return {'path': path, 'dir': folder, 'format': 'msgpack',
          'checkpointer': 'flax.training.checkpoints (no Orbax)', 'saved': saved,
          'params': params, 'opt_state': opt_state, 'tx': tx, 'step': STEPS,
          'params_key': 'params', 'opt_state_key': 'opt_state',
          'new_target': new_target, 'abstract_target': lambda: new_target(params),
          'restore': restore}


CASES = [nnx_optimizer, linen_trainstate_batch_stats, multi_transform_prefix,
         multi_transform_deeper_labels, masked_prefix, lookahead, cocob, haiku_style_keys,
         msgpack_to_bytes, msgpack_legacy_checkpoints, sm3]
