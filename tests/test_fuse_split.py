"""`fuse` and `split` (issue 26): attention projections fused and split
again, bit for bit against NumPy for the params and every Adam mirror."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from pipeline import plan
from tests.conftest import copy_tree, trained
from tests.test_stream import migrated
from transforms import Surgery, SurgeryError, flatten, load_spec

LAYERS, WIDTH, HEAD = 3, 8, 4
PARTS = ('query', 'key', 'value')
FUSE = (r"ops: [{fuse: {match: '^(layer_\d+)/attn/(?P<part>query|key|value)/(kernel|bias)$', "
        r"to: '\1/attn/qkv/\3', parts: [query, key, value], axis: -1}}]")
SPLIT = (r"ops: [{split: {match: '^(layer_\d+)/attn/qkv/(kernel|bias)$', "
         r"to: '\1/attn/{part}/\2', parts: [query, key, value], sizes: [4, 4, 4], axis: -1}}]")


def attention_state(layers: int = LAYERS, width: int = WIDTH, head: int = HEAD) -> dict:
  """A transformer-like state with separate q, k, v projections and Adam's
  moments after a few steps (not zeros)."""
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  params = {f'layer_{i}': {'attn': {part: {'kernel': normal(width, head), 'bias': normal(head)}
                                     for part in PARTS},
                            'mlp': {'kernel': normal(width, width)}}
            for i in range(layers)}
  params, opt_state = trained(optax.adam(1e-2), params)
  return {'params': params, 'opt_state': opt_state}


def run(spec_text: str, state: dict) -> dict:
  return Surgery(load_spec(spec_text))(copy_tree(state))[0]


def by_hand_fused(tree: dict) -> dict:
  """NumPy's construction of the fused tree: [q | k | v] along the last axis."""
  out = {}
  for layer, blocks in tree.items():
    attn = blocks['attn']
    qkv = {leaf: np.concatenate([np.asarray(attn[p][leaf]) for p in PARTS], axis=-1)
           for leaf in ('kernel', 'bias')}
    out[layer] = {'attn': {'qkv': qkv}, 'mlp': {'kernel': np.asarray(blocks['mlp']['kernel'])}}
  return out


def same_bits(got: dict, want: dict) -> None:
  got, want = flatten(got), flatten(want)
  assert sorted(got) == sorted(want)
  for path, value in want.items():
    assert np.asarray(got[path]).dtype == value.dtype and np.asarray(got[path]).tobytes() == \
        np.asarray(value).tobytes(), path


def test_fuse_is_numpys_concatenation_for_params_and_every_moment():
  state = attention_state()
  out = run(FUSE, state)
  same_bits(out['params'], by_hand_fused(state['params']))
  for moment in ('mu', 'nu'):
    same_bits(getattr(out['opt_state'][0], moment),
              by_hand_fused(getattr(state['opt_state'][0], moment)))
  assert int(out['opt_state'][0].count) == int(state['opt_state'][0].count)


def test_split_inverts_fuse_exactly():
  state = attention_state()
  back = run(SPLIT, run(FUSE, state))
  same_bits(back['params'], state['params'])
  for moment in ('mu', 'nu'):
    same_bits(getattr(back['opt_state'][0], moment), getattr(state['opt_state'][0], moment))


class FusedAttention(nn.Module):
  """The new layout: one qkv projection, as a fused-attention model declares it."""

  @nn.compact
  def __call__(self, x):
    for i in range(LAYERS):
      qkv = nn.Dense(3 * HEAD, name=f'layer_{i}_qkv')(x)
      x = x + nn.Dense(WIDTH, name=f'layer_{i}_out')(qkv)
    return x


def test_a_fused_model_restores_the_output_and_takes_a_step():
  """The fused tree is what the new model's params are, and its optimizer
  state is what optax's update takes: one step to finite params."""
  state = attention_state()
  out = run(FUSE, state)
  qkv = {f'layer_{i}_qkv': out['params'][f'layer_{i}']['attn']['qkv'] for i in range(LAYERS)}
  model = FusedAttention()
  x = jnp.ones((2, WIDTH))
  fresh = model.init(jax.random.key(0), x)['params']
  assert jax.tree.map(jnp.shape, {k: fresh[k] for k in qkv}) == jax.tree.map(jnp.shape, qkv)
  params = {**fresh, **qkv}
  tx = optax.adam(1e-2)
  moments = {m: {f'layer_{i}_qkv': getattr(out['opt_state'][0], m)[f'layer_{i}']['attn']['qkv']
                 for i in range(LAYERS)} for m in ('mu', 'nu')}
  opt_state = tx.init(params)
  opt_state = (opt_state[0]._replace(count=out['opt_state'][0].count,
                                     mu={**opt_state[0].mu, **moments['mu']},
                                     nu={**opt_state[0].nu, **moments['nu']}), *opt_state[1:])
  grads = jax.grad(lambda p: jnp.sum(model.apply({'params': p}, x) ** 2))(params)
  updates, _ = tx.update(grads, opt_state, params)
  stepped = optax.apply_updates(params, updates)
  assert all(bool(jnp.isfinite(leaf).all()) for leaf in jax.tree.leaves(stepped))


@pytest.mark.parametrize('spec_text, message', [
    (r"ops: [{fuse: {match: '^(layer_\d+)/attn/(?P<part>query|key|value|mlp)/kernel$', "
     r"to: '\1/attn/qkv', parts: [query, key, value]}}]", None),  # fine: mlp is not matched here
    (r"ops: [{fuse: {match: '^(layer_\d+)/(?P<part>attn/query/kernel|mlp/kernel)$', "
     r"to: '\1/fused', parts: ['attn/query/kernel', 'mlp/kernel'], axis: 0}}]",
     "the parts differ off that axis (layer_0/attn/query/kernel (8, 4) float32, "
     "layer_0/mlp/kernel (8, 8) float32)"),
    (r"ops: [{fuse: {match: '^(layer_\d+)/attn/(?P<part>query|key)/kernel$', "
     r"to: '\1/attn/qk', parts: [query, key, value]}}]", 'no value part'),
    (r"ops: [{split: {match: '^(layer_\d+)/mlp/kernel$', to: '\1/mlp/{part}', "
     r"parts: [a, b], sizes: [4, 5]}}]",
     "cannot split 'layer_0/mlp/kernel' of shape (8, 8): the sizes [4, 5] add up to 9, and "
     "axis -1 has 8"),
])
def test_bad_fuses_and_splits_fail_by_name(spec_text, message):
  if message is None:
    run(spec_text, attention_state())
    return
  with pytest.raises(SurgeryError, match=message.replace('(', r'\(').replace(')', r'\)')
                     .replace('[', r'\[').replace(']', r'\]')):
    run(spec_text, attention_state())


@pytest.mark.parametrize('spec_text, message', [
    ("ops: [{fuse: {match: '^(a)/(q|k)$', to: '\\\\1/qk', parts: [q, k]}}]", '(?P<part>'),
    ("ops: [{fuse: {match: '^(?P<part>q)$', to: 'x', parts: [q]}}]", 'two or more distinct'),
    ("ops: [{split: {match: '^x$', to: 'y', parts: [a, b], sizes: [1, 1]}}]", '{part}'),
    ("ops: [{split: {match: '^x$', to: '{part}', parts: [a, b], sizes: [1]}}]",
     "a positive size for each of the 2 parts"),
    ("ops: [{split: {match: '^x$', to: '{part}', parts: [a, 1], sizes: [1, 1]}}]",
     "field 'parts' must be a list of names"),
])
def test_bad_fields_fail_when_the_spec_loads(spec_text, message):
  with pytest.raises(ValueError, match=message.replace('(', r'\(').replace('?', r'\?')
                     .replace('{', r'\{').replace('}', r'\}')):
    load_spec(spec_text)


def test_a_fuse_over_12_layers_streams_a_fused_leaf_at_a_time(tmp_path):
  """Under a 128 KB budget (a pack holds 64 KB, one fused kernel with its
  three parts 48 KB), the fuse streams, each fused leaf a dependency group
  of its own, to the bits the surgery makes held whole; plan says so."""
  state = attention_state(layers=12, width=64, head=32)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / 'in', state)
  checkpointer.wait_until_finished()
  spec = FUSE
  rec = migrated(tmp_path / 'in', tmp_path / 'out', spec, memory_budget=128 << 10)
  assert rec['status'] == 'ok', rec['error']
  assert rec['packs'] >= 12 and rec['write_path'] == 'copy_and_patch'
  out = ocp.StandardCheckpointer().restore(tmp_path / 'out')
  same_bits(out['params'], by_hand_fused(state['params']))
  same_bits(out['opt_state'][0]['nu'], by_hand_fused(state['opt_state'][0].nu))
  planned = plan.plan_checkpoints([str(tmp_path / 'in')], load_spec(spec), budget=128 << 10)
  [group] = planned['groups']
  assert group['dependency_groups'] == 12 * 2 * 3  # kernel and bias of 12 layers; params, mu, nu
  assert {c['kind'] for c in group['changes']} == {'fused'}
  assert {'kind': 'fused', 'path': 'layer_11/attn/value/bias',
          'detail': 'fused into layer_11/attn/qkv/bias'} in group['changes']


def test_plan_says_what_each_leaf_went_into():
  """`plan`'s changes name the leaves fused, split, stacked, unstacked and
  merged, and what they went into (not a drop and an add)."""
  from transforms.plan import plan as planned  # pylint: disable=g-import-not-at-top
  from tests.test_merge_lora import MERGE, lora_params  # pylint: disable=g-import-not-at-top
  changes = lambda spec, state: {(c.kind, c.path, c.detail) for c in planned(
      Surgery(load_spec(spec)), state).changes}
  fused = run(FUSE, attention_state())
  assert ('split', 'layer_2/attn/qkv/kernel', 'split into layer_2/attn/query/kernel, '
          'layer_2/attn/key/kernel, layer_2/attn/value/kernel') in changes(SPLIT, fused)
  stack = r"ops: [{stack: {match: '^(layer_\d+)/mlp/kernel$', to: 'mlp/kernel'}}]"
  assert ('stacked', 'layer_1/mlp/kernel', 'stacked into mlp/kernel') in changes(
      stack, attention_state())
  lora = {'params': lora_params(), 'opt_state': optax.adam(1e-2).init(lora_params())}
  assert changes(MERGE, lora) == {('merged', f'Dense_{i}/lora_{x}', f'merged into Dense_{i}/kernel')
                                  for i in (0, 1) for x in 'ab'}
