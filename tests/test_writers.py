"""writers.choose: the one decision of how an output is written, cheapest first."""
from __future__ import annotations

import json

import orbax.checkpoint as ocp
import pytest
from etils import epath

from pipeline import checkpoint
from pipeline.write import copy_patch, writers
from tests.conftest import mlp


@pytest.fixture
def src(tmp_path) -> epath.Path:
  path = epath.Path(tmp_path / 'in')
  ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).save(path, {'params': mlp()})
  return path


def choose(src, **facts):
  return writers.choose(src, checkpoint.read_layout(src), facts.pop('removes', None), **facts)


def test_each_fact_takes_the_cheapest_writer_that_applies(src, tmp_path):
  assert choose(src, carried=True)[:3] == ('patch', None, None)
  assert choose(src, carried=True, removes='drops params/x')[:3] == (
      'copy_through', 'the surgery drops params/x: the copied files would keep it readable', None)
  assert choose(src, carried=False)[:3] == ('fresh', copy_patch.NOTHING_CARRIED, None)
  assert choose(src, carried=True, full_decode=True)[:3] == ('fresh', '--full_decode', None)
  assert choose(src, carried=True, zero_fills=True)[:3] == ('fresh', copy_patch.ZERO_FILLS, None)
  gcs = choose(src, carried=True, dst=epath.Path('gs://bucket/out'))
  assert gcs.writer == 'copy_through' and 'different storage' in gcs.why_not_patched


def test_streamed_outputs_take_a_fresh_tree_where_a_patch_declines(src):
  choice = choose(src, carried=True, removes='drops params/x', streamed=True)
  assert choice.writer == 'fresh' and choice.write_path == 'full' and 'drops' in choice.why_not_patched


def test_writers_asked_for_narrow_the_choice(src):
  choice = choose(src, carried=True, writers=('copy_through', 'orbax_save'))
  assert choice.writer == 'copy_through' and 'patch is not among the writers' in choice.why_not_patched
  choice = choose(src, carried=True, full_decode=True, writers=('orbax_save',))
  assert (choice.writer, choice.write_path) == ('orbax_save', 'full')
  assert choice.why_not_patched.startswith("--full_decode; by Orbax's save: fresh is not among")


def test_an_input_format_copy_patch_does_not_know_is_saved_by_orbax(src):
  meta = json.loads((src / '_METADATA').read_text())
  (src / '_METADATA').write_text(json.dumps({**meta, 'a_field_of_orbax_2030': 1}))
  choice = choose(src, carried=True)
  assert choice.writer == 'copy_through' and 'a_field_of_orbax_2030' in choice.why_not_patched
  choice = choose(src, carried=False)
  assert choice.writer == 'orbax_save' and 'a_field_of_orbax_2030' in choice.why_not_patched


def test_a_msgpack_input_is_saved_by_orbax(tmp_path):
  from flax import serialization  # pylint: disable=g-import-not-at-top
  path = epath.Path(tmp_path / 'state.msgpack')
  path.write_bytes(serialization.to_bytes({'params': mlp()}))
  assert choose(path, carried=True)[:3] == ('orbax_save', writers.MSGPACK, None)


def test_patches_are_planned_where_the_written_tree_is_given(src, tmp_path):
  layout, items = checkpoint.restore(src)
  choice = writers.choose(src, layout, None, carried=False, dst=epath.Path(tmp_path / 'out'),
                          written=items)
  assert choice.writer == 'fresh' and [p.item for p in choice.patches] == ['']
