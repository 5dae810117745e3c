"""TensorStore's key-value stores of checkpoint trees: the one opener of a
directory's files or of an OCDBT database, local or gs://, and a read of an
OCDBT index without its values."""
from __future__ import annotations

import functools
from typing import Any, Callable, Hashable

from etils import epath

from pipeline.storage import files
from pipeline.storage.json_results import released


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
  spec = orbax_spec(_ocdbt_spec, str(directory), fresh) if use_ocdbt else kvstore_spec(directory)
  return ts.KvStore.open(spec if synced else _unsynced(spec),
                         context=ts_utils.get_ts_context(use_ocdbt=use_ocdbt))


def _ocdbt_spec(directory: str, fresh: bool) -> dict[str, Any]:
  from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils  # pylint: disable=g-import-not-at-top
  options = ts_utils.OcdbtKvStoreWriteOptions(ts_utils.OcdbtWriteMode.WRITE) if fresh else None
  return ts_utils.build_kvstore_tspec(directory, use_ocdbt=True, ocdbt_write_options=options)


_PLACEHOLDER = 'ckpt-surgery-placeholder'


def orbax_spec(build: Callable[..., Any], directory: str, *args: Hashable) -> Any:
  """`build(directory, *args)`: a TensorStore spec as Orbax builds it. Orbax
  builds one through a TensorStore JSON result, which leaks
  (`json_results`): so it is built once per kind of place (a bucket, or
  local) and `args`, for a placeholder directory, and each directory is put
  in the placeholder's place."""
  if files.is_gcs(directory):
    bucket, _, rest = directory.removeprefix('gs://').partition('/')
    head = f'gs://{bucket}/'
  else:
    rest = directory.lstrip('/')
    head = directory[:len(directory) - len(rest)]
  return _put(_template(build, head, args), rest)


@functools.lru_cache(maxsize=4096)  # a run's trees share their leaves' names
def _template(build: Callable[..., Any], head: str, args: tuple[Hashable, ...]) -> Any:
  return build(head + _PLACEHOLDER, *args)


def _put(template: Any, rest: str) -> Any:
  """`template` with the placeholder directory replaced by `rest`."""
  if isinstance(template, dict):
    return {k: _put(v, rest) for k, v in template.items()}
  if isinstance(template, list):
    return [_put(v, rest) for v in template]
  if isinstance(template, str):
    return template.replace(_PLACEHOLDER, rest)
  return template


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
  manifest = released(ts.ocdbt.dump(base).result())
  entries, pending = {}, [(b'', manifest['versions'][-1]['root']['location'])]
  while pending:
    prefix, location = pending.pop()
    for entry in released(ts.ocdbt.dump(base, location).result())['entries']:
      if 'location' in entry:
        pending.append((prefix + entry['subtree_common_prefix'], entry['location']))
      elif 'inline_value' in entry:
        entries[prefix + entry['key']] = entry['inline_value']
      else:  # value:<base path>:<data file>:<offset>:<length>
        head, file, offset, length = entry['indirect_value'].rsplit(':', 3)
        entries[prefix + entry['key']] = (head.removeprefix('value:') + file, offset, length)
  return entries
