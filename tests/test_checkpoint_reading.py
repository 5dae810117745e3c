"""checkpoint/: what a checkpoint is (layout), its metadata without its
arrays, and reading it: straight through TensorStore or through Orbax's
restore, with the same result."""
from __future__ import annotations

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from flax import serialization

from pipeline import checkpoint
from pipeline.checkpoint import metadata, reading
from tests.conftest import mlp


def test_layout_of_a_tree_a_step_and_a_msgpack_file(tmp_path):
  state = {'params': mlp()}
  ocp.PyTreeCheckpointer().save(tmp_path / 'tree', state)
  with ocp.CheckpointManager(tmp_path / 'root') as manager:
    manager.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            meta=ocp.args.JsonSave({'lr': 0.1})))
  (tmp_path / 'state.msgpack').write_bytes(serialization.to_bytes(state))
  tree = checkpoint.read_layout(epath.Path(tmp_path / 'tree'))
  step = checkpoint.read_layout(epath.Path(tmp_path / 'root' / '1'))
  packed = checkpoint.read_layout(epath.Path(tmp_path / 'state.msgpack'))
  assert (tree.is_step, tree.trees, tree.msgpack) == (False, [''], False)
  assert (step.is_step, step.trees, step.carried) == (True, ['state'], ['meta'])
  assert packed.msgpack and packed.trees == ['']


def test_what_is_not_a_checkpoint_is_refused_by_name(tmp_path):
  (tmp_path / 'events').write_bytes(b'\x81\x01\x02')  # a map byte, then no string key
  (tmp_path / 'empty').mkdir()
  for name, why in (('missing', 'does not exist'), ('events', 'not an Orbax checkpoint'),
                    ('empty', 'not an Orbax checkpoint')):
    with pytest.raises(checkpoint.CheckpointError, match=why):
      checkpoint.read_layout(epath.Path(tmp_path / name))
  assert not checkpoint.is_msgpack(epath.Path(tmp_path / 'events'))


@pytest.mark.parametrize('use_ocdbt', [True, False], ids=['ocdbt', 'no_ocdbt'])
def test_a_direct_read_restores_what_orbax_restores(tmp_path, use_ocdbt):
  state = {'params': mlp(), 'step': 3}
  ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=use_ocdbt)).save(tmp_path / 'c', state)
  path = epath.Path(tmp_path / 'c')
  layout = checkpoint.read_layout(path)
  like = checkpoint.trees(checkpoint.item_metadata(path, layout))
  direct = reading._read_directly(path, layout, like, jax.local_devices())  # pylint: disable=protected-access
  assert direct is not None  # a plain read: no Orbax restore needed
  restored = ocp.PyTreeCheckpointer().restore(path)
  assert jax.tree_util.tree_structure(direct['']) == jax.tree_util.tree_structure(restored)
  for a, b in zip(jax.tree_util.tree_leaves(direct['']), jax.tree_util.tree_leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_trees_with_the_same_stored_metadata_share_it_each_with_its_own_directory(tmp_path):
  for name in ('a', 'b'):
    ocp.PyTreeCheckpointer().save(tmp_path / name, {'params': mlp(seed=1)})
  metadata._TREES.clear()  # pylint: disable=protected-access
  read = {name: checkpoint.item_metadata(epath.Path(tmp_path / name),
                                         checkpoint.read_layout(epath.Path(tmp_path / name)))['']
          for name in ('a', 'b')}
  assert len(metadata._TREES) == 1  # pylint: disable=protected-access
  for name, tree_metadata in read.items():
    leaf = jax.tree_util.tree_leaves(tree_metadata.tree)[0]
    assert str(leaf.directory) == str(tmp_path / name)


def test_metadata_of_a_msgpack_file_is_its_arrays_abstract_form(tmp_path):
  (tmp_path / 'state.msgpack').write_bytes(serialization.to_bytes({'params': mlp((3, 4))}))
  layout, tree = checkpoint.read_metadata(epath.Path(tmp_path / 'state.msgpack'))
  assert layout.msgpack
  assert checkpoint.array_specs(tree) == {'params/Dense_0/kernel': ((3, 4), 'float32'),
                                          'params/Dense_0/bias': ((4,), 'float32')}


@pytest.mark.parametrize('use_ocdbt, use_zarr3', [(True, False), (False, False), (True, True)])
def test_formats_from_metadata_are_what_the_files_say(tmp_path, use_ocdbt, use_zarr3):
  """Stand-ins take each tree's format from the metadata already read, not
  from two more reads of its files (on GCS, two requests per tree)."""
  ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=use_ocdbt, use_zarr3=use_zarr3)).save(
      tmp_path / 'c', {'params': mlp()})
  path = epath.Path(tmp_path / 'c')
  formats = checkpoint.stored_formats(checkpoint.item_metadata(path, checkpoint.read_layout(path)))
  assert formats == {str(path): checkpoint.stored_format(path)}
  assert tuple(formats[str(path)]) == (use_ocdbt, use_zarr3)
