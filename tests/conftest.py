"""Shared fixtures: real Orbax checkpoints of the seed's CNN, made once."""
from __future__ import annotations

import itertools
import shutil

import jax
import jax.numpy as jnp
import optax
import pytest

from pipeline import demo, storage
from tests.gcs_server import Emulator, FlakyProxy


@pytest.fixture(scope='session')
def samples(tmp_path_factory):
  """A read-only-by-convention workdir: in/run_a (CheckpointManager, steps 1-3),
  in/run_b, in/run_c, in/run_d (single checkpoints). Copy before changing."""
  workdir = tmp_path_factory.mktemp('samples')
  demo.make_samples(str(workdir), count=6)
  return workdir


@pytest.fixture
def inputs(samples, tmp_path):
  """A private copy of the samples' in/ tree."""
  shutil.copytree(samples / 'in', tmp_path / 'in')
  return tmp_path / 'in'


@pytest.fixture(scope='session')
def cnn_state():
  """One trained CNN state {params, opt_state (typed Adam), step}."""
  return demo.trained_states(2)[-1]


def copy_tree(tree):
  """Fresh arrays: the surgery donates its input."""
  return jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True) if isinstance(x, jax.Array) else x, tree)


def mlp(sizes=(3, 4, 2), seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), len(sizes))
  return {f'Dense_{i}': {'kernel': jax.random.normal(keys[i], (a, b)), 'bias': jnp.full((b,), 0.5)}
          for i, (a, b) in enumerate(zip(sizes, sizes[1:]))}


def trained(tx, params, steps=2):
  """(params, opt_state) after a few steps of `tx`, so moments are not zeros."""
  opt_state = tx.init(params)
  for _ in range(steps):
    grads = jax.tree_util.tree_map(lambda p: jnp.sin(p) + 0.1, params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  return params, opt_state


@pytest.fixture(scope='session')
def gcs():
  """A GCS-protocol server on loopback, behind a proxy that can inject 503s;
  this process (and the CLI processes the tests start) point at the proxy."""
  emulator = Emulator()
  proxy = FlakyProxy(emulator.port)
  storage.use_gcs_emulator(proxy.url)
  yield proxy
  proxy.fail_every = 0
  proxy.stop()
  emulator.stop()


_buckets = itertools.count()


@pytest.fixture
def bucket(gcs):
  """A fresh, empty bucket: 'gs://NAME'."""
  import fsspec  # pylint: disable=g-import-not-at-top
  name = f'test-bucket-{next(_buckets)}'
  fsspec.filesystem('gs').mkdir(name)
  return f'gs://{name}'



@pytest.fixture(scope='session')
def gcs_samples(gcs):
  """The samples, written by Orbax straight to a bucket: 'gs://NAME/in/...'.
  Read-only by convention: tests write their outputs to their own bucket."""
  import fsspec  # pylint: disable=g-import-not-at-top
  fsspec.filesystem('gs').mkdir('samples')
  demo.make_samples('gs://samples', count=4)
  return 'gs://samples/in'
