"""Outputs: what lies at an output path, and the only changes an attempt makes
there (the mark, the overwrite swap, recovery after a kill)."""
from __future__ import annotations

import jax.numpy as jnp
import orbax.checkpoint as ocp
import pytest
from etils import epath

from pipeline import checkpoint
from pipeline.write import outputs


def save(path: epath.Path, value: float, ours: bool = True) -> epath.Path:
  """A committed single-tree checkpoint at `path`, with our provenance or not."""
  custom = {checkpoint.PROVENANCE_KEY: {'src': 'in', 'value': value}} if ours else {}
  ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).save(
      path, args=ocp.args.PyTreeSave({'w': jnp.full((2,), value)}), custom_metadata=custom)
  return path


def value(path: epath.Path) -> float:
  return float(ocp.PyTreeCheckpointer().restore(path)['w'][0])


def test_provenance_is_ours_none_or_refused_by_what_is_there(tmp_path):
  dst = epath.Path(tmp_path / 'out')
  assert outputs.provenance(dst) is None
  assert outputs.provenance(save(dst, 1.0))['value'] == 1.0
  theirs = save(epath.Path(tmp_path / 'theirs'), 1.0, ours=False)
  with pytest.raises(outputs.NotOurs, match='holds a checkpoint ckpt-surgery did not write'):
    outputs.provenance(theirs)
  (tmp_path / 'plain').mkdir()
  (tmp_path / 'file').write_text('x')
  for name, what in (('plain', 'a directory'), ('file', 'a file')):
    with pytest.raises(outputs.NotOurs, match=f'holds {what} that ckpt-surgery did not write'):
      outputs.provenance(epath.Path(tmp_path / name))


def test_a_direct_write_is_marked_until_it_is_verified(tmp_path):
  dst = epath.Path(tmp_path / 'out')
  assert outputs.mark(dst, beside=False) == dst
  assert outputs.sibling(dst, outputs.ATTEMPT).read_text() == outputs.DIRECT
  save(dst, 1.0)
  outputs.publish(dst, dst)
  assert not outputs.sibling(dst, outputs.ATTEMPT).exists() and value(dst) == 1.0


def test_an_overwrite_is_written_beside_then_swapped_in(tmp_path):
  dst = save(epath.Path(tmp_path / 'out'), 1.0)
  new = outputs.mark(dst, beside=True)
  assert new == outputs.sibling(dst, outputs.NEW) and value(dst) == 1.0
  save(new, 2.0)
  outputs.publish(dst, new)
  assert value(dst) == 2.0
  assert sorted(p.name for p in epath.Path(tmp_path).iterdir()) == ['out']


@pytest.mark.parametrize('mark, left', [
    (outputs.DIRECT, []),                # ours, not yet verified: removed
    (outputs.BESIDE, [1.0]),             # the new one unverified: removed, the old one kept
    (outputs.SWAPPING, [2.0]),           # the new one verified: the swap rolled forward
])
def test_recovery_finishes_or_undoes_a_killed_attempt_by_its_mark(tmp_path, mark, left):
  dst = save(epath.Path(tmp_path / 'out'), 1.0)
  save(outputs.sibling(dst, outputs.NEW), 2.0)
  outputs.sibling(dst, outputs.ATTEMPT).write_text(mark)
  outputs.recover(dst)
  assert ([value(dst)] if dst.exists() else []) == left
  assert sorted(p.name for p in epath.Path(tmp_path).iterdir()) == (['out'] if left else [])


def test_recovery_leaves_what_is_not_ours(tmp_path):
  dst = save(epath.Path(tmp_path / 'out'), 1.0, ours=False)
  (tmp_path / 'out.orbax-checkpoint-tmp-123').mkdir()  # a dead save's temporary: ours by name
  outputs.recover(dst)
  assert value(dst) == 1.0
  assert sorted(p.name for p in epath.Path(tmp_path).iterdir()) == ['out']
