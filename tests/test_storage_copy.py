"""storage.copy_tree: the copy step of a copy-and-patch write. Locally OCDBT
data files are hard-linked and everything else copied, on GCS objects are
rewritten server-side; either way plain Orbax restores the copy bit for bit
and the input is left as it was."""
from __future__ import annotations

import hashlib
import os

import fsspec
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from pipeline import storage


def tree():
  keys = jax.random.split(jax.random.PRNGKey(0), 2)
  return {'params': {'Dense_0': {'kernel': jax.random.normal(keys[0], (3, 4)), 'bias': jnp.arange(4.0)},
                     'Dense_1': {'kernel': jax.random.normal(keys[1], (4, 2)), 'bias': jnp.ones(2)}},
          'step': 3}


def bits(path) -> dict[str, bytes]:
  """Every leaf's bytes as plain Orbax restores the checkpoint."""
  restored = ocp.PyTreeCheckpointer().restore(path)
  return {jax.tree_util.keystr(k): np.asarray(leaf).tobytes()
          for k, leaf in jax.tree_util.tree_flatten_with_path(restored)[0]}


def snapshot(root) -> dict[str, tuple]:
  """Each file's content digest, size and mtime (st_nlink may change: links)."""
  out = {}
  for d, _, names in os.walk(root):
    for name in names:
      p = os.path.join(d, name)
      st = os.stat(p)
      with open(p, 'rb') as f:
        out[os.path.relpath(p, root)] = (hashlib.sha256(f.read()).hexdigest(), st.st_size, st.st_mtime_ns)
  return out


def listing(url: str) -> dict[str, int]:
  """Each object's size under gs:// url, by its path relative to url."""
  root = url.removeprefix('gs://')
  return {p[len(root):]: info['size'] for p, info in fsspec.filesystem('gs').find(root, detail=True).items()}


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  path = tmp_path_factory.mktemp('ckpt') / 'in'
  ocp.PyTreeCheckpointer().save(path, tree())
  return path


def test_local_links_data_copies_metadata(saved, tmp_path):
  before = snapshot(saved)
  stats = storage.copy_tree(epath.Path(saved), epath.Path(tmp_path / 'out'))
  out = tmp_path / 'out'

  assert set(snapshot(out)) == set(before)
  assert stats.files == len(before)
  data = [f for f in before if f.startswith(('ocdbt.process_0/d/', 'd/'))]
  assert any(f.startswith('d/') for f in data) and any(f.startswith('ocdbt.') for f in data)
  for f in before:
    same = os.stat(saved / f).st_ino == os.stat(out / f).st_ino
    assert same == (f in data), f  # data files linked; manifests, _METADATA... copied
  assert stats.bytes_linked == sum(os.path.getsize(saved / f) for f in data)
  assert stats.bytes_linked + stats.bytes_copied == sum(size for _, size, _ in before.values())
  assert (stats.bytes_copied_server_side, stats.bytes_uploaded) == (0, 0)

  assert bits(out) == bits(saved)
  assert snapshot(saved) == before  # the input as it was

  # The patch rewrites the copy's metadata; the input's must not change.
  for name in ('manifest.ocdbt', '_METADATA', 'ocdbt.process_0/manifest.ocdbt'):
    (out / name).write_bytes(b'patched')
  assert snapshot(saved) == before
  assert bits(saved)


def test_local_cross_device_copies(saved, tmp_path, monkeypatch):
  def exdev(a, b):
    raise OSError(18, 'Invalid cross-device link')
  monkeypatch.setattr(os, 'link', exdev)
  stats = storage.copy_tree(epath.Path(saved), epath.Path(tmp_path / 'out'))
  assert stats.bytes_linked == 0 and stats.bytes_copied > 0
  assert bits(tmp_path / 'out') == bits(saved)


def test_local_copy_file_range_missing_falls_back(saved, tmp_path, monkeypatch):
  def enosys(*args):
    raise OSError(38, 'Function not implemented')
  monkeypatch.setattr(os, 'copy_file_range', enosys)
  storage.copy_tree(epath.Path(saved), epath.Path(tmp_path / 'out'))
  assert snapshot(tmp_path / 'out').keys() == snapshot(saved).keys()
  assert bits(tmp_path / 'out') == bits(saved)


def test_error_names_the_file(saved, tmp_path):
  out = tmp_path / 'out'
  out.mkdir()
  (out / '_METADATA').write_bytes(b'already here')
  with pytest.raises(storage.CopyError, match='_METADATA'):
    storage.copy_tree(epath.Path(saved), epath.Path(out))


def test_gcs_copy_is_server_side(gcs, bucket):
  src, dst = f'{bucket}/in', f'{bucket}/out'
  ocp.PyTreeCheckpointer().save(epath.Path(src), tree())
  sizes = listing(src)

  gcs.reset_counters()
  stats = storage.copy_tree(epath.Path(src), epath.Path(dst))
  counted = gcs.reset_counters()

  assert (counted['bytes_uploaded'], counted['bytes_rewritten']) == (0, sum(sizes.values()))
  assert stats == storage.CopyStats(len(sizes), 0, 0, sum(sizes.values()), 0)
  assert listing(dst) == sizes
  assert bits(epath.Path(dst)) == bits(epath.Path(src))


def test_gcs_to_and_from_local(gcs, bucket, saved, tmp_path):
  gcs.reset_counters()
  up = storage.copy_tree(epath.Path(saved), epath.Path(f'{bucket}/up'))
  assert gcs.reset_counters()['bytes_uploaded'] >= up.bytes_uploaded == up.bytes_copied > 0
  down = storage.copy_tree(epath.Path(f'{bucket}/up'), epath.Path(tmp_path / 'down'))
  assert (down.bytes_copied, down.bytes_uploaded) == (up.bytes_copied, 0)
  assert snapshot(tmp_path / 'down').keys() == snapshot(saved).keys()
  assert bits(tmp_path / 'down') == bits(saved)
