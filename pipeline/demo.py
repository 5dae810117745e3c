"""`ckpt-surgery demo`: sample checkpoints, migrated on the local runner.

The samples are the seed's CNN trained a few steps with `optax.adam` (so the
moments are not zeros), saved by Orbax both ways users save them: single
checkpoint directories, and a `CheckpointManager` directory with several
steps. The demo then runs the seed's surgery over all of them.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from flax import linen as nn
from etils import epath

SEED_SPEC = """\
# The seed's surgery (Flax "Model surgery" guide): normalize one kernel.
# opt_state is left as it is, as the guide does.
ops:
  - normalize: {match: '^Dense_1/kernel$'}
"""


class CNN(nn.Module):
  """The seed's model."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(features=32, kernel_size=(3, 3))(x)
    x = nn.relu(x)
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = nn.Conv(features=64, kernel_size=(3, 3))(x)
    x = nn.relu(x)
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.Dense(features=256)(x)
    x = nn.relu(x)
    x = nn.Dense(features=10)(x)
    return nn.log_softmax(x)


def trained_states(count: int, seed: int = 0) -> list[dict[str, Any]]:
  """`count` states {params, opt_state, step} of the CNN, one Adam step apart."""
  model, tx = CNN(), optax.adam(1e-3)
  rng = jax.random.PRNGKey(seed)
  images = jax.random.normal(rng, (8, 28, 28, 1))
  labels = jax.random.randint(rng, (8,), 0, 10)
  params = model.init(rng, images[:1])['params']
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, opt_state):
    def loss(p):
      return -jnp.mean(jnp.take_along_axis(model.apply({'params': p}, images),
                                           labels[:, None], axis=1))
    updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  states = []
  for step in range(1, count + 1):
    params, opt_state = train_step(params, opt_state)
    states.append({'params': params, 'opt_state': opt_state, 'step': step})
  return states


def make_samples(workdir: str, count: int = 6) -> str:
  """Write `count` checkpoints under workdir/in; the input pattern that finds them.

  Half (rounded up) are steps of one CheckpointManager at in/run_a; the rest
  are single checkpoints in/run_b, in/run_c, ...
  """
  root = epath.Path(workdir) / 'in'
  states = trained_states(count)
  managed = (count + 1) // 2
  with ocp.CheckpointManager(root / 'run_a') as manager:
    for state in states[:managed]:
      manager.save(state['step'], args=ocp.args.StandardSave(state))
  checkpointer = ocp.StandardCheckpointer()
  for i, state in enumerate(states[managed:]):
    checkpointer.save(root / f'run_{chr(ord("b") + i)}', state)
  checkpointer.wait_until_finished()
  return str(root / '*')


def prepare(workdir: str, count: int) -> tuple[str, str, str]:
  """Samples (made once) and the seed spec under workdir: (pattern, output, spec)."""
  workdir = os.path.abspath(workdir)  # Orbax wants absolute paths
  spec = os.path.join(workdir, 'spec.yaml')
  pattern = os.path.join(workdir, 'in', '*')
  if not os.path.isdir(os.path.join(workdir, 'in')):
    print(f'writing {count} sample checkpoints under {workdir}/in ...', flush=True)
    pattern = make_samples(workdir, count)
  with open(spec, 'w') as f:
    f.write(SEED_SPEC)
  return pattern, os.path.join(workdir, 'out'), spec
