"""`repeat` (issue 26): grouped-query attention's KV heads repeated for
multi-head attention, params and Adam's moments alike, bit for bit."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.conftest import copy_tree, trained
from tests.test_fuse_split import same_bits
from transforms import Surgery, SurgeryError, load_spec

FEATURES, HEADS, KV_HEADS, HEAD_DIM = 8, 8, 2, 4
REPEAT = (r"ops: [{repeat: {match: '^attn/(key|value)/kernel$', axis: 1, to: 8}}, "
          r"{repeat: {match: '^attn/(key|value)/bias$', axis: 0, to: 8}}]")


def gqa_state() -> dict:
  """Attention params as Flax's MultiHeadDotProductAttention stores them,
  key and value with 2 heads (grouped-query), with Adam's moments."""
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  heads = {'query': HEADS, 'key': KV_HEADS, 'value': KV_HEADS}
  attn = {name: {'kernel': normal(FEATURES, n, HEAD_DIM), 'bias': normal(n, HEAD_DIM)}
          for name, n in heads.items()}
  attn['out'] = {'kernel': normal(HEADS, HEAD_DIM, FEATURES), 'bias': normal(FEATURES)}
  params, opt_state = trained(optax.adam(1e-2), {'attn': attn})
  return {'params': params, 'opt_state': opt_state}


def run(spec_text: str, state: dict) -> dict:
  return Surgery(load_spec(spec_text))(copy_tree(state))[0]


def by_hand(tree: dict, tile: bool = False) -> dict:
  """NumPy's: each KV head 4 times in a row (np.repeat), or the 2 heads 4 times over."""
  grow = (lambda x, axis: np.concatenate([x] * 4, axis=axis)) if tile else (
      lambda x, axis: np.repeat(x, 4, axis=axis))
  out = jax.tree.map(np.asarray, tree)
  for name in ('key', 'value'):
    out['attn'][name] = {'kernel': grow(out['attn'][name]['kernel'], 1),
                         'bias': grow(out['attn'][name]['bias'], 0)}
  return out


@pytest.mark.parametrize('tile', [False, True], ids=['repeat', 'tile'])
def test_repeat_is_numpys_for_params_and_every_moment(tile):
  state = gqa_state()
  spec = REPEAT.replace('to: 8}', 'to: 8, tile: true}') if tile else REPEAT
  out = run(spec, state)
  same_bits(out['params'], by_hand(state['params'], tile))
  for moment in ('mu', 'nu'):
    same_bits(getattr(out['opt_state'][0], moment),
              by_hand(getattr(state['opt_state'][0], moment), tile))


def test_a_multi_head_model_takes_the_output_and_a_step():
  out = run(REPEAT, gqa_state())
  model = nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=HEADS * HEAD_DIM,
                                          name='attn')
  x = jnp.ones((2, 3, FEATURES))
  fresh = model.init(jax.random.key(0), x)['params']
  assert jax.tree.map(jnp.shape, fresh) == jax.tree.map(jnp.shape, out['params']['attn'])
  params = out['params']['attn']
  tx = optax.adam(1e-2)
  opt_state = (out['opt_state'][0]._replace(mu=out['opt_state'][0].mu['attn'],
                                            nu=out['opt_state'][0].nu['attn']),
               *out['opt_state'][1:])
  grads = jax.grad(lambda p: jnp.sum(model.apply({'params': p}, x) ** 2))(params)
  updates, _ = tx.update(grads, opt_state, params)
  assert all(bool(jnp.isfinite(l).all()) for l in jax.tree.leaves(optax.apply_updates(params, updates)))


def test_a_factor_that_does_not_divide_fails_by_name():
  with pytest.raises(SurgeryError, match=r"cannot repeat 'attn/key/kernel' of shape \(8, 2, 4\) "
                                         r'to 7 along axis 1: 7 is not a multiple of its 2'):
    run(r"ops: [{repeat: {match: '^attn/key/kernel$', axis: 1, to: 7}}]", gqa_state())
