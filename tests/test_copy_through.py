"""Copy-through: untouched leaves keep their stored bytes, and the output is
an ordinary Orbax checkpoint that restores bit-identical to the full path's,
whatever Orbax format the input used. (Copy-and-patch, the cheaper writer,
is kept out of these tests by `without_patching`; tests/test_copy_patch.py has it.)"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from pipeline import checkpoint, migrate
from pipeline.checkpoint import reading
from pipeline.compute import worker

from tests.conftest import mlp, trained
from transforms import flatten

# Dense_0 only renamed, every mirror kept: one computed leaf, Dense_1/kernel.
SPEC = """ops:
  - rename: {match: '^Dense_0/', to: 'Linear_0/'}
  - normalize: {match: '^Dense_1/kernel$'}
"""


def state():
  params, opt_state = trained(optax.adam(1e-2), mlp((3, 4, 2)))
  return {'params': params, 'opt_state': opt_state, 'step': 3,
          'batch_stats': {'mean': jnp.arange(4.0)}}


def write(path, layout: str, use_ocdbt: bool) -> None:
  """One input checkpoint: a PyTree or Standard tree, or a CheckpointManager
  step with params, opt_state and a JSON item."""
  tree = state()
  if layout == 'pytree':
    ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=use_ocdbt)).save(path, tree)
  elif layout == 'standard':
    ocp.Checkpointer(ocp.StandardCheckpointHandler(use_ocdbt=use_ocdbt)).save(
        path, args=ocp.args.StandardSave(tree))
  else:
    handler = ocp.CompositeCheckpointHandler(
        params=ocp.PyTreeCheckpointHandler(use_ocdbt=use_ocdbt),
        opt_state=ocp.PyTreeCheckpointHandler(use_ocdbt=use_ocdbt), meta=ocp.JsonCheckpointHandler())
    ocp.Checkpointer(handler).save(path, args=ocp.args.Composite(
        params=ocp.args.PyTreeSave(tree['params']), opt_state=ocp.args.PyTreeSave(tree['opt_state']),
        meta=ocp.args.JsonSave({'step': 3})))


def restored_bits(path, layout: str) -> dict[str, bytes]:
  """Every leaf's dtype, shape and bytes, as plain Orbax restores the
  checkpoint (no arguments)."""
  if layout == 'step':
    restored = ocp.Checkpointer(ocp.CompositeCheckpointHandler()).restore(path)
    tree = {name: restored[name] for name in ('params', 'opt_state', 'meta')}
  else:
    tree = ocp.PyTreeCheckpointer().restore(path)
  out = {}
  for keys, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    assert isinstance(leaf, (jax.Array, int)), (keys, type(leaf))  # jax.Array, as the full path writes
    value = np.asarray(leaf)
    out[jax.tree_util.keystr(keys)] = (str(value.dtype), value.shape, value.tobytes())
  return out


def without_patching(**settings) -> migrate.Settings:
  """Copy-and-patch writes no output here, as for a surgery that removes data."""
  return migrate.Settings(writers=('copy_through', 'orbax_save'), **settings)


@pytest.fixture
def decoded(monkeypatch):
  """The names of the arrays decoded (by Orbax's handler, or read directly), as they are."""
  names = []
  real, real_read = ocp.type_handlers.ArrayHandler.deserialize, reading.read_stored

  async def spy(self, infos, args=None):
    names.extend(info.name for info in infos)
    return await real(self, infos, args)

  async def spy_read(directory, param, *args):
    names.append(param)
    return await real_read(directory, param, *args)

  monkeypatch.setattr(ocp.type_handlers.ArrayHandler, 'deserialize', spy)
  monkeypatch.setattr(reading, 'read_stored', spy_read)
  return names


@pytest.mark.parametrize('use_ocdbt', [True, False], ids=['ocdbt', 'no_ocdbt'])
@pytest.mark.parametrize('layout', ['pytree', 'standard', 'step'])
def test_copy_through_restores_bit_identical_to_the_full_path(tmp_path, layout, use_ocdbt, decoded):
  src = tmp_path / 'in'
  write(src, layout, use_ocdbt)
  worker.WORKER.clear()
  surgery = worker.surgery_for(SPEC)
  full = migrate.migrate_one(str(src), str(tmp_path / 'full'), surgery,
                             without_patching(full_decode=True))
  assert full['status'] == 'ok', full['error']
  assert full['bytes_carried'] == 0
  decoded.clear()
  carried = migrate.migrate_one(str(src), str(tmp_path / 'carried'), surgery, without_patching())
  assert (carried['status'], carried['write_path']) == ('ok', 'copy_through'), carried['error']
  # Only the normalized kernel was decoded: from the input, then read back.
  assert sorted(set(decoded) - {'step'}) == ['Dense_1.kernel' if layout == 'step' else 'params.Dense_1.kernel']
  kernel_bytes = 4 * 2 * 4
  assert carried['bytes_carried'] == carried['bytes_out'] - kernel_bytes > 0
  assert restored_bits(tmp_path / 'carried', layout) == restored_bits(tmp_path / 'full', layout)
  assert 'params/Linear_0/kernel' in checkpoint.read_provenance(tmp_path / 'carried')['carried']


def test_typed_restore_of_a_copied_through_output(tmp_path):
  """The user's own restore, with their optimizer's abstract state, works."""
  src, dst = tmp_path / 'in', tmp_path / 'out'
  write(src, 'standard', True)
  worker.WORKER.clear()
  assert migrate.migrate_one(str(src), str(dst), worker.surgery_for(SPEC),
                             without_patching())['status'] == 'ok'
  before = state()
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, {
      **before, 'params': {'Linear_0': before['params']['Dense_0'], 'Dense_1': before['params']['Dense_1']}})
  abstract['opt_state'] = jax.eval_shape(optax.adam(1e-2).init, abstract['params'])
  after = ocp.StandardCheckpointer().restore(dst, abstract)
  assert isinstance(after['opt_state'][0], optax.ScaleByAdamState)
  np.testing.assert_array_equal(after['params']['Linear_0']['kernel'], before['params']['Dense_0']['kernel'])
  np.testing.assert_array_equal(after['opt_state'][0].nu['Linear_0']['bias'],
                                before['opt_state'][0].nu['Dense_0']['bias'])


def test_a_surgery_that_touches_every_param_carries_only_the_rest(tmp_path, decoded):
  src = tmp_path / 'in'
  write(src, 'pytree', True)
  worker.WORKER.clear()
  everything = "ops: [{scale: {match: '.*', by: 2.0}}, {drop_optimizer: {}}]"
  rec = migrate.migrate_one(str(src), str(tmp_path / 'out'), worker.surgery_for(everything),
                            without_patching())
  assert rec['status'] == 'ok', rec['error']
  # batch_stats lies outside the surgery: still carried.
  assert rec['bytes_carried'] == 4 * 4
  assert 'params.Dense_0.kernel' in decoded


def test_a_carried_leaf_that_does_not_read_back_as_copied_fails_and_is_removed(tmp_path, monkeypatch):
  src, out = tmp_path / 'in', tmp_path / 'out'
  write(src, 'pytree', False)
  real = checkpoint.stored_checksums
  monkeypatch.setattr(checkpoint, 'stored_checksums',
                     lambda d, names: ['stored:00000000'] + real(d, names)[1:])
  worker.WORKER.clear()
  rec = migrate.migrate_one(str(src), str(out / 'x'), worker.surgery_for(SPEC), without_patching(),
                            attempts=1)
  assert rec['status'] == 'failed' and 'VerificationError' in rec['error']
  assert list(out.iterdir()) == []


def test_route_proves_what_is_untouched():
  """The traced surgery: renamed leaves and untouched mirrors are inputs as
  they were; the computed output reads only its own input."""
  from transforms import Surgery, load_spec  # pylint: disable=g-import-not-at-top
  tree = {'params': mlp((3, 4, 2))}
  tree['opt_state'] = optax.adam(1e-2).init(tree['params'])
  surgery = Surgery(load_spec(SPEC))
  route, _ = surgery.route(tree)
  compute, compiled = surgery.route_function(tree)
  leaves = jax.tree_util.tree_leaves(tree)
  paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  assert compiled and [paths[i] for i in route.needed] == ["['params']['Dense_1']['kernel']"]
  assert len(route.carried) == len(leaves) - 1
  expected = surgery(jax.tree_util.tree_map(jnp.array, tree)).state
  needed = [jnp.array(leaves[i]) for i in route.needed]
  got = route.assemble(compute(needed),
                       [leaves[j] for _, j in sorted(route.carried.items())])
  assert all(x.is_deleted() for x in needed)  # donated: not held beside the output
  assert flatten(got['params']).keys() == flatten(expected['params']).keys()
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(got),
                                                  jax.tree_util.tree_leaves(expected)))
  assert surgery.route_function(tree)[1] is False  # once per signature


@pytest.mark.parametrize('full_decode', [False, True], ids=['copy_through', 'full_decode'])
def test_a_typed_prng_key_stays_a_key(tmp_path, full_decode):
  """Orbax stores a typed key as its bits plus the key's impl: both paths keep it a key."""
  src, dst = tmp_path / 'in', tmp_path / 'out'
  ocp.PyTreeCheckpointer().save(src, {'params': mlp(), 'rng': jax.random.key(7), 'step': 1})
  worker.WORKER.clear()
  rec = migrate.migrate_one(str(src), str(dst), worker.surgery_for(SPEC),
                            without_patching(full_decode=full_decode))
  assert rec['status'] == 'ok', rec['error']
  rng = ocp.PyTreeCheckpointer().restore(dst)['rng']
  assert jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
  assert np.array_equal(jax.random.key_data(rng), jax.random.key_data(jax.random.key(7)))
