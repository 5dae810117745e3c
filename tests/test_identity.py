"""pipeline/checkpoint/identity.py: an input re-saved at the same path is another input."""
from __future__ import annotations

import os
import shutil

import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from pipeline.checkpoint import identity
from pipeline.storage import files


def save(path, value: float) -> None:
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(epath.Path(path), {'params': {'w': np.full((4,), value, np.float32)}},
                    force=True)
  checkpointer.wait_until_finished()


def test_a_resave_at_the_same_path_changes_the_identity(tmp_path):
  save(tmp_path / 'ckpt', 1.0)
  before = identity.identity(epath.Path(tmp_path / 'ckpt'))
  assert identity.identity(epath.Path(tmp_path / 'ckpt')) == before  # nothing changed
  save(tmp_path / 'ckpt', 2.0)
  assert identity.identity(epath.Path(tmp_path / 'ckpt')) != before


def test_a_copy_that_keeps_names_sizes_and_times_is_the_same_input(tmp_path):
  save(tmp_path / 'ckpt', 1.0)
  shutil.copytree(tmp_path / 'ckpt', tmp_path / 'copy')  # copy2: times kept
  assert identity.identity(epath.Path(tmp_path / 'copy')) == identity.identity(
      epath.Path(tmp_path / 'ckpt'))
  some = next(p for p in (tmp_path / 'copy').rglob('*') if p.is_file())
  os.utime(some, ns=(0, 0))  # written again, byte for byte: a change we cannot tell from another
  assert identity.identity(epath.Path(tmp_path / 'copy')) != identity.identity(
      epath.Path(tmp_path / 'ckpt'))


def test_a_file_input_and_a_missing_one(tmp_path):
  (tmp_path / 'state.msgpack').write_bytes(b'\x81\xa1a\x01')
  first = identity.identity(epath.Path(tmp_path / 'state.msgpack'))
  (tmp_path / 'state.msgpack').write_bytes(b'\x81\xa1a\x02')
  assert identity.identity(epath.Path(tmp_path / 'state.msgpack')) != first
  assert identity.identity(epath.Path(tmp_path / 'absent'))  # reading it says what is wrong


def test_on_gcs_by_checksum_from_one_listing(bucket):
  save(f'{bucket}/ckpt', 1.0)
  before = identity.identity(epath.Path(f'{bucket}/ckpt'))
  files.gcs().cp_file(f'{bucket}/ckpt/_METADATA', f'{bucket}/ckpt/_METADATA')  # same bytes anew
  assert identity.identity(epath.Path(f'{bucket}/ckpt')) == before
  files.gcs().pipe_file(f'{bucket}/ckptX/other', b'a sibling sharing the prefix')
  assert identity.identity(epath.Path(f'{bucket}/ckpt')) == before
  files.remove_tree(epath.Path(f'{bucket}/ckpt'))
  save(f'{bucket}/ckpt', 2.0)
  assert identity.identity(epath.Path(f'{bucket}/ckpt')) != before
