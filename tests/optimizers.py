"""Optimizer factories the optimizer tests name in their specs ('tests.optimizers:NAME').

Masks and labels are functions of the params' leaf names, so the same factory
builds the optimizer for the old params and for the migrated ones.
"""
import jax
import optax


def _by_leaf_name(fn):
  return lambda params: jax.tree_util.tree_map_with_path(lambda k, _: fn(k[-1].key), params)


kernels_only = _by_leaf_name(lambda name: name == 'kernel')
labels = _by_leaf_name(lambda name: 'weights' if name == 'kernel' else 'biases')

FACTORIES = {
    'adam': lambda: optax.adam(1e-2),
    'adamw': lambda: optax.adamw(1e-2, weight_decay=1e-3),
    'sgd_momentum': lambda: optax.sgd(1e-2, momentum=0.9),
    'sgd_nesterov': lambda: optax.sgd(1e-2, momentum=0.9, nesterov=True),
    'lion': lambda: optax.lion(1e-3),
    'rmsprop': lambda: optax.rmsprop(1e-2, momentum=0.9),
    'adafactor': lambda: optax.adafactor(1e-2, min_dim_size_to_factor=4),
    'chain': lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2)),
    'masked': lambda: optax.chain(optax.masked(optax.adam(1e-2), kernels_only), optax.sgd(1e-2)),
    'multi_transform': lambda: optax.multi_transform(
        {'weights': optax.adam(1e-2), 'biases': optax.sgd(1e-2, momentum=0.9)}, labels),
    'inject_hyperparams': lambda: optax.inject_hyperparams(optax.adam)(learning_rate=1e-2),
    'ema': lambda: optax.chain(optax.ema(0.9), optax.sgd(1e-2)),
    'nested': lambda: optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.multi_transform({
            'weights': optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2),
            'biases': optax.masked(optax.sgd(1e-2, momentum=0.9), lambda p: jax.tree.map(lambda _: True, p)),
        }, labels)),
}
globals().update(FACTORIES)


def frozen_backbone():
  """The fine-tuning recipe with prefix labels (tests.scenarios.doc_checkpoints.multi_transform_prefix),
  its labels a function of the params so it fits the migrated ones too."""
  return optax.multi_transform(
      {'frozen': optax.set_to_zero(), 'train': optax.adamw(1e-3)},
      lambda params: {k: 'frozen' if k in ('backbone', 'encoder') else 'train' for k in params})
