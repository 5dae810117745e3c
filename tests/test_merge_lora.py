"""`merge_lora` (issue 26): adapters folded into their base kernels,
dropped with their optimizer state, the base's state kept."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.conftest import copy_tree, trained
from tests.test_fuse_split import same_bits
from transforms import Surgery, SurgeryError, leaf_paths, load_spec

RANK, SCALE = 2, 0.5
MERGE = (r"ops: [{merge_lora: {match: '^(Dense_\d+)/kernel$', a: '\1/lora_a', b: '\1/lora_b', "
         f'scale: {SCALE}}}}}]')


def lora_params() -> dict:
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  return {f'Dense_{i}': {'kernel': normal(8, 8), 'bias': normal(8),
                         'lora_a': normal(8, RANK), 'lora_b': normal(RANK, 8)}
          for i in range(2)}


def adapters_only() -> optax.GradientTransformation:
  """The prefix-label fine-tuning optimizer: Adam on the adapters, the base frozen."""
  labels = lambda params: {layer: {k: 'train' if k.startswith('lora') else 'freeze'
                                   for k in leaves} for layer, leaves in params.items()}
  return optax.multi_transform({'train': optax.adam(1e-2), 'freeze': optax.set_to_zero()}, labels)


def by_hand(params: dict) -> dict:
  """NumPy's: W + scale * (A @ B) in float32; the adapters gone."""
  out = {}
  for layer, leaves in params.items():
    w, a, b = (np.asarray(leaves[k], np.float32) for k in ('kernel', 'lora_a', 'lora_b'))
    out[layer] = {'kernel': (w + np.float32(SCALE) * (a @ b)).astype(np.float32),
                  'bias': np.asarray(leaves['bias'])}
  return out


def run(spec_text: str, state: dict) -> dict:
  return Surgery(load_spec(spec_text))(copy_tree(state))[0]


@pytest.mark.parametrize('tx', [optax.adam(1e-2), adapters_only()], ids=['adam', 'adapters_only'])
def test_adapters_fold_into_their_base_and_leave_the_optimizer_state(tx):
  params, opt_state = trained(tx, lora_params())
  out = run(MERGE, {'params': params, 'opt_state': opt_state})
  same_bits(out['params'], by_hand(params))
  before = {p: np.asarray(x) for p, x in leaf_paths(opt_state).items() if 'lora' not in p}
  after = {p: np.asarray(x) for p, x in leaf_paths(out['opt_state']).items()}
  assert before.keys() == after.keys() and before  # the adapters' entries gone, no other
  assert all(before[p].tobytes() == after[p].tobytes() for p in before)  # the base's: as it was


def test_a_lora_free_model_takes_the_output_and_a_step():
  tx = optax.adam(1e-2)
  params, opt_state = trained(tx, lora_params())
  out = run(MERGE, {'params': params, 'opt_state': opt_state})

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(8, name='Dense_1')(nn.relu(nn.Dense(8, name='Dense_0')(x)))
  model, x = Model(), jnp.ones((2, 8))
  assert jax.tree.map(jnp.shape, model.init(jax.random.key(0), x)['params']) == \
      jax.tree.map(jnp.shape, out['params'])
  grads = jax.grad(lambda p: jnp.sum(model.apply({'params': p}, x) ** 2))(out['params'])
  updates, _ = tx.update(grads, out['opt_state'], out['params'])
  assert all(bool(jnp.isfinite(l).all()) for l in jax.tree.leaves(optax.apply_updates(out['params'], updates)))


@pytest.mark.parametrize('spec_text, message', [
    (MERGE.replace("b: '\\1/lora_b'", "b: '\\1/lora_a'"),
     r"cannot merge 'Dense_0/lora_a' \(8, 2\) @ 'Dense_0/lora_a' \(8, 2\) into 'Dense_0/kernel' "
     r'\(8, 8\): A must be \(in, r\) and B \(r, out\) for W \(in, out\)'),
    (MERGE.replace("b: '\\1/lora_b'", "b: '\\1/lora_c'"), r"'Dense_0/kernel' has no adapter 'Dense_0/lora_c'"),
    (r"ops: [{merge_lora: {match: '^(Dense_\d+)/(kernel|lora_a)$', a: '\1/lora_a', b: '\1/lora_b'}}]",
     r"'Dense_0/lora_a', an adapter, is matched by"),
])
def test_a_misfit_fails_by_name(spec_text, message):
  params, opt_state = trained(optax.adam(1e-2), lora_params())
  with pytest.raises(SurgeryError, match=message):
    run(spec_text, {'params': params, 'opt_state': opt_state})


def test_a_saved_checkpoint_is_not_patched_and_keeps_no_adapter(tmp_path):
  """Copy-and-patch would leave the adapters' bytes in the copied files: the
  output is saved anew (untouched leaves copied through), and plain Orbax
  restores the merge."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from tests.test_stream import migrated  # pylint: disable=g-import-not-at-top
  params, opt_state = trained(adapters_only(), lora_params())
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / 'in', {'params': params, 'opt_state': opt_state})
  checkpointer.wait_until_finished()
  rec = migrated(tmp_path / 'in', tmp_path / 'out', MERGE)
  assert rec['status'] == 'ok', rec['error']
  assert rec['write_path'] == 'copy_through' and 'drops' in rec['why_not_patched']
  out = ocp.StandardCheckpointer().restore(tmp_path / 'out')
  same_bits(out['params'], by_hand(params))
  assert not [p for p in leaf_paths(out['opt_state']) if 'lora' in p]
