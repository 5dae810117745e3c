"""Where gs:// paths go: Google Cloud Storage, or a GCS-protocol emulator.

Against real GCS nothing needs setting: gcsfs (under etils.epath) and
TensorStore (under Orbax) find Application Default Credentials as Google's
libraries do (`gcloud auth application-default login`, a service account on
Dataflow, GOOGLE_APPLICATION_CREDENTIALS). We never read or log a token.

Against an emulator (tests, or a user's own), `use_gcs_emulator(endpoint)`
points both at it. It sets environment variables, so processes started
afterwards (the local runner's workers) inherit it; DoFns call it again in
`setup()` so workers of any runner get it from the pipeline itself.
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import errno
import os
import re
import shutil
from typing import Any, NamedTuple

import fsspec
from etils import epath

from pipeline import files

ENDPOINT_ENV = 'CKPT_SURGERY_GCS_ENDPOINT'


def emulator_environment(endpoint: str) -> dict[str, str]:
  """The variables that point gcsfs and TensorStore at `endpoint`."""
  endpoint = endpoint.rstrip('/')
  return {
      'STORAGE_EMULATOR_HOST': endpoint,        # gcsfs
      'FSSPEC_GCS_TOKEN': 'anon',               # gcsfs: no credential search
      # Otherwise gcsfs waits 60 s per bucket on a gRPC call emulators do not answer.
      'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
      'TENSORSTORE_GCS_HTTP_URL': endpoint,     # TensorStore's GCS driver
      'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator',  # TensorStore: no credential search
  }


def use_gcs_emulator(endpoint: str) -> None:
  """Send every gs:// read and write of this process (and of the processes it
  starts) to the GCS-protocol server at `endpoint`, e.g. http://127.0.0.1:9023.

  Call it before the process first touches gs:// arrays: TensorStore reads
  its endpoint once per process.
  """
  os.environ.update(emulator_environment(endpoint))
  fsspec.config.conf.setdefault('gcs', {})['token'] = 'anon'  # read at import time
  import gcsfs  # pylint: disable=g-import-not-at-top
  gcsfs.GCSFileSystem.clear_instance_cache()


def configure(endpoint: str | None) -> None:
  """Use the emulator at `endpoint`, or the one in $CKPT_SURGERY_GCS_ENDPOINT, if any."""
  endpoint = endpoint or os.environ.get(ENDPOINT_ENV)
  if endpoint:
    use_gcs_emulator(endpoint)


class StorageError(OSError):
  """A bucket that is missing or cannot be reached."""


def check_bucket(url: str, role: str) -> None:
  """Refuse a gs:// URL whose bucket does not exist or cannot be seen."""
  if not files.is_gcs(url):
    return
  bucket = 'gs://' + url[len('gs://'):].split('/')[0]
  try:
    exists = epath.Path(bucket).exists()
  except Exception as e:  # 403 and friends: say which bucket, and why
    raise StorageError(f'{role} bucket {bucket} cannot be reached: {type(e).__name__}: {e}') from None
  if not exists:
    raise StorageError(f'{role} bucket {bucket} does not exist (or these credentials cannot see it)')


# HTTP statuses and gRPC/socket words that mean "try again".
_TRANSIENT = re.compile(
    r'\b(408|429|500|502|503|504)\b|UNAVAILABLE|DEADLINE_EXCEEDED|RESOURCE_EXHAUSTED|'
    r'[Cc]onnection (reset|refused|aborted)|timed out|Broken pipe')


def is_transient(error: BaseException) -> bool:
  """Whether an error (or one it was raised from) is worth retrying."""
  while error is not None:
    if isinstance(error, (ConnectionError, TimeoutError)) or _TRANSIENT.search(str(error)):
      return True
    error = error.__cause__ or error.__context__
  return False


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


def kvstore_spec(path: epath.Path) -> dict[str, Any]:
  """TensorStore's spec of the key-value store at a directory, local or
  gs://, as Orbax builds its own: a JSON spec, not a URL, so that no
  character of the path (`#`, `?`, `%`) is read as a URL's."""
  path = str(path).rstrip('/') + '/'
  if files.is_gcs(path):
    bucket, _, rest = path[len('gs://'):].partition('/')
    return {'driver': 'gcs', 'bucket': bucket, 'path': rest}
  return {'driver': 'file', 'path': path}


def _unsynced(kvstore: dict[str, Any]) -> dict[str, Any]:
  """A TensorStore kvstore spec whose local files are not fsynced one by one."""
  if kvstore.get('driver') == 'file':
    return {**kvstore, 'file_io_sync': False}
  return {k: _unsynced(v) if isinstance(v, dict) else v for k, v in kvstore.items()}


def open_store(directory: epath.Path, use_ocdbt: bool = False, *, fresh: bool = False,
               synced: bool = True) -> Any:
  """TensorStore's key-value store of a checkpoint tree's OCDBT database
  (`fresh`: a new one, configured as Orbax configures its own, small values
  inline), or of a directory's files, local or gs://, with Orbax's
  TensorStore context. `synced=False`: local files are not fsynced one by
  one (the writer syncs the whole output once, before its commit). A
  TensorStore future: await it, or take its `result()`."""
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils  # pylint: disable=g-import-not-at-top
  if use_ocdbt:
    options = ts_utils.OcdbtKvStoreWriteOptions(ts_utils.OcdbtWriteMode.WRITE) if fresh else None
    spec = ts_utils.build_kvstore_tspec(str(directory), use_ocdbt=True, ocdbt_write_options=options)
  else:
    spec = kvstore_spec(directory)
  return ts.KvStore.open(spec if synced else _unsynced(spec),
                         context=ts_utils.get_ts_context(use_ocdbt=use_ocdbt))


def listing(path: epath.Path) -> dict[str, dict[str, Any]]:
  """{gs:// path: its listing entry (size, crc32c, ...)} of every object
  under a gs:// `path`, from one listing: checksums without reading data."""
  fs = files.gcs()
  return {'gs://' + p.removeprefix('gs://'): info
          for p, info in fs.find(str(path), detail=True).items() if info.get('type') == 'file'}


def ocdbt_index(directory: epath.Path) -> dict[bytes, Any]:
  """{key: its value} in the latest version of the OCDBT database at
  `directory`: the inline bytes, or (data file, offset, length) as strings.
  From the B-tree's nodes alone (a node's keys are relative to the prefixes
  of the nodes above it): no value outside the index is read."""
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  base = open_store(directory).result()
  manifest = ts.ocdbt.dump(base).result()
  entries, pending = {}, [(b'', manifest['versions'][-1]['root']['location'])]
  while pending:
    prefix, location = pending.pop()
    for entry in ts.ocdbt.dump(base, location).result()['entries']:
      if 'location' in entry:
        pending.append((prefix + entry['subtree_common_prefix'], entry['location']))
      elif 'inline_value' in entry:
        entries[prefix + entry['key']] = entry['inline_value']
      else:  # value:<base path>:<data file>:<offset>:<length>
        head, file, offset, length = entry['indirect_value'].rsplit(':', 3)
        entries[prefix + entry['key']] = (head.removeprefix('value:') + file, offset, length)
  return entries
