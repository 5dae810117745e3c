"""Copy a checkpoint tree's files to another place, local or gs://, the
cheapest way each pair allows (a hard link, a server-side copy, a plain
copy), and make what was written durable."""
from __future__ import annotations

import concurrent.futures
import ctypes
import errno
import os
import re
import shutil
from typing import Any, NamedTuple

from etils import epath

from pipeline.storage import files


class CopyStats(NamedTuple):
  """What `copy_tree` did. bytes_copied passed through this worker (read and
  written); bytes_copied_server_side never left the bucket; bytes_uploaded
  is the part of bytes_copied written to GCS."""
  files: int
  bytes_linked: int
  bytes_copied: int
  bytes_copied_server_side: int
  bytes_uploaded: int


class CopyError(OSError):
  """A file of a tree that could not be copied (the message names it)."""


# OCDBT data files: content-addressed (32 hex digits), written once, never
# rewritten in place (TensorStore writes new ones), so a hard link is as good
# as a copy. Orbax's per-process databases keep them in ocdbt.process_N/d/;
# a merged root, and the trees we write ourselves, in d/.
_IMMUTABLE = re.compile(r'(^|/)(ocdbt\.process_\d+/)?d/[0-9a-f]{32}$')
# What os.link raises where this file system (or pair of them) cannot link.
_CANNOT_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP,
                errno.ENOSYS, errno.EACCES}
_GCS_REQUESTS = 16  # concurrent copies: 50 small objects are not 50 round trips in series


def copy_tree(src: epath.Path, dst: epath.Path, skip: frozenset[str] = frozenset()) -> CopyStats:
  """Copy every file under checkpoint directory `src` to the same relative
  path under `dst` (absent or empty): the start of a copy-and-patch write,
  which then rewrites some files of `dst` and commits it by renaming.

  So that the copy costs as little as the storage allows: locally, OCDBT data
  files (immutable) are hard-linked, every other file is copied (the patch
  rewrites metadata in place, and that must not reach `src`), by
  copy_file_range where the kernel can (a reflink on CoW file systems); on
  GCS each object is rewritten server-side, no byte through this worker.
  Between local and GCS bytes go through the worker. Nothing is fsynced:
  the caller `sync`s once, after its own writes, before its commit. `skip`:
  paths relative to src not to copy (the commit file, written last).
  """
  source, target = str(src).rstrip('/'), str(dst).rstrip('/')
  src_gs, dst_gs = files.is_gcs(source), files.is_gcs(target)
  if not src_gs and not dst_gs:
    return _copy_local(source, target, skip)
  fs = files.gcs()
  if src_gs:  # one listing, with sizes
    sizes = {'gs://' + p.removeprefix('gs://'): int(info['size'])
             for p, info in fs.find(source, detail=True).items()
             if info.get('type') == 'file' and not p.endswith('/')}
    prefix = 'gs://' + source.removeprefix('gs://')
  else:
    sizes = {os.path.join(d, f): os.path.getsize(os.path.join(d, f))
             for d, _, names in os.walk(source) for f in names}
    prefix = source
  if not sizes:
    raise CopyError(errno.ENOENT, f'{source} holds no files to copy')
  pairs = [(f, target + f[len(prefix):]) for f in sorted(sizes)
           if f[len(prefix):].lstrip('/') not in skip]
  sizes = {f: sizes[f] for f, _ in pairs}
  copy = _copier(src_gs, dst_gs)
  with concurrent.futures.ThreadPoolExecutor(_GCS_REQUESTS) as pool:
    list(pool.map(lambda pair: _named(copy, *pair), pairs))
  if dst_gs:
    files.forget_listings()
  total = sum(sizes.values())
  if src_gs and dst_gs:
    return CopyStats(len(sizes), 0, 0, total, 0)
  return CopyStats(len(sizes), 0, total, 0, total if dst_gs else 0)


def _copier(src_gs: bool, dst_gs: bool) -> Any:
  """copy(a, b) of one file, with GCS at either end."""
  fs = files.gcs()
  if src_gs and dst_gs:
    return fs.cp_file  # objects.rewrite: server-side
  if dst_gs:
    return fs.put_file

  def copy(a, b):
    os.makedirs(os.path.dirname(b), exist_ok=True)
    fs.get_file(a, b)
  return copy


def copy_entry(src: epath.Path, dst: epath.Path) -> None:
  """Copy the file or directory `src` to `dst` (absent) as `copy_tree` copies."""
  source, target = str(src), str(dst)
  if src.is_dir():
    copy_tree(src, dst)
  elif not files.is_gcs(source) and not files.is_gcs(target):
    _named(_copy_file, source, target)
  else:
    _named(_copier(files.is_gcs(source), files.is_gcs(target)), source, target)
    files.forget_listings()


def _named(copy: Any, a: str, b: str) -> None:
  try:
    copy(a, b)
  except Exception as e:  # pylint: disable=broad-except
    raise CopyError(f'copying {a} to {b} failed: {type(e).__name__}: {e}') from e


def _copy_local(source: str, target: str, skip: frozenset[str]) -> CopyStats:
  if not os.path.isdir(source):
    raise CopyError(errno.ENOENT, f'{source} is not a directory to copy')
  count = linked = copied = 0
  can_link = True
  for d, _, names in os.walk(source):
    rel = os.path.relpath(d, source)
    out = os.path.normpath(os.path.join(target, rel))
    os.makedirs(out, exist_ok=True)
    for name in names:
      if os.path.normpath(os.path.join(rel, name)) in skip:
        continue
      a, b = os.path.join(d, name), os.path.join(out, name)
      size = os.path.getsize(a)
      count += 1
      if can_link and _IMMUTABLE.search(os.path.join(rel, name).replace(os.sep, '/')):
        try:
          os.link(a, b)
          linked += size
          continue
        except OSError as e:
          if e.errno not in _CANNOT_LINK:
            raise CopyError(f'linking {a} to {b} failed: {e}') from e
          can_link = False  # another file system: copy the rest
      _named(_copy_file, a, b)
      copied += size
  return CopyStats(count, linked, copied, 0, 0)


def _copy_file(a: str, b: str) -> None:
  """a's bytes to a new file b, in the kernel where it can."""
  with open(a, 'rb') as fa, open(b, 'xb') as fb:
    try:
      while os.copy_file_range(fa.fileno(), fb.fileno(), 1 << 30):
        pass
      return
    except (OSError, AttributeError):  # EXDEV, ENOSYS, EINVAL...; or no copy_file_range here
      pass
  shutil.copyfile(a, b)


def sync(path: epath.Path) -> None:
  """Make what was written under a local `path` durable: one syncfs of its
  file system (os.sync where there is none), cheaper than an fsync per file.
  Nothing to do on GCS, where a finished upload is durable."""
  if files.is_gcs(path):
    return
  path = str(path)
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
      if libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise CopyError(err, f'syncing {path}: {os.strerror(err)}')
    finally:
      os.close(fd)
  except AttributeError:
    os.sync()


def sync_directory(path: epath.Path) -> None:
  """Make a local directory's entries (a rename into it) durable."""
  fd = os.open(str(path), os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)
