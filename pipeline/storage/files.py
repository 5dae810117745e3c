"""Files and objects by name: every path the tool derives is a name, never a pattern.

A user's `--input` pattern is globbed once, at discovery; every path after
that (an output, its markers, a record) is literal, and may hold `[`, `*`,
`?`, `#`, `%`, spaces, whatever a sweep named its runs. The libraries'
convenient calls do not all agree: on gs://, fsspec's `rm`, `copy`, `mv` and
`glob` (and so etils.epath's `rmtree`, `unlink`, `rename` and `glob`) expand
glob characters in the path they are given, and locally epath's `glob`
globs its parent too. A path `run[1]/100` there names `run1/100`, someone
else's. So removal, listing and moves of paths we derived go through here:
listings by exact prefix (gcsfs's `find` and `ls` are literal), filtered
exactly, and one object removed or copied at a time by its name.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import os
import shutil
import tempfile
from typing import Any, Iterator

import aiohttp
import fsspec
from etils import epath
from etils.epath import backend as epath_backend

COMMIT_FILE = 'commit_success.txt'  # what Orbax writes last on GCS
_REQUESTS = 16  # concurrent object requests: many small objects are not round trips in series

# gcsfs sends each request with no timeout at all, so a response that never
# comes holds a worker forever (seen once in the suite: a 186-byte upload).
# A request given a minute to connect and two minutes between bytes of its
# answer fails with aiohttp's ServerTimeoutError instead, which gcsfs retries.
# Every gcsfs instance takes it, epath's (and so Orbax's) too.
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=60, sock_read=120)
fsspec.config.conf.setdefault('gcs', {}).setdefault('requests_timeout', REQUEST_TIMEOUT)


def is_gcs(path: Any) -> bool:
  return str(path).startswith('gs://')


def gcs() -> Any:
  """gcsfs's file system, without a listing cache: what we list is what is
  there now. (etils.epath, and so Orbax, keep their own instance, with a
  cache; `forget_listings` tells it we changed objects.)"""
  return fsspec.filesystem('gs', use_listings_cache=False)


def forget_listings() -> None:
  """Forget what epath's gcsfs instance had listed: we changed objects it
  may have seen (a removal it would still take for there, say)."""
  epath_backend.fsspec_backend.fs('gs://').invalidate_cache()


def _objects(path: str) -> list[str]:
  """Every object at or under gs:// `path`, as gs:// URLs (one listing)."""
  path = str(path).rstrip('/')
  bare = path.removeprefix('gs://')
  return sorted('gs://' + p for p in gcs().find(path)
                if p == bare or p.startswith(bare + '/'))


def _each(fn: Any, *arguments: list[str]) -> None:
  """fn over the arguments, as `map` takes them, a few requests at a time."""
  if len(arguments[0]) <= 1:
    list(map(fn, *arguments))
    return
  with concurrent.futures.ThreadPoolExecutor(min(_REQUESTS, len(arguments[0]))) as pool:
    list(pool.map(fn, *arguments))


def names(directory: epath.Path) -> list[str]:
  """The names of what is directly inside `directory` ([] where it is not a
  directory): no path made of each (a directory of 10,000 outputs would
  cost 10,000 of them)."""
  try:
    if is_gcs(directory):  # gcsfs's ls is literal; listed now, not from a cache
      bare = str(directory).removeprefix('gs://').rstrip('/')
      return [p.rstrip('/').rsplit('/', 1)[-1]
              for p in gcs().ls(bare, detail=False) if p.rstrip('/') != bare]
    return os.listdir(directory)
  except (FileNotFoundError, NotADirectoryError):
    return []


def tree(directory: epath.Path) -> list[str]:
  """The path, relative to `directory`, of every file beneath it (on gs://,
  from one listing)."""
  if is_gcs(directory):
    bare = str(directory).removeprefix('gs://').rstrip('/')
    return [p[len(bare) + 1:] for p in (o.removeprefix('gs://') for o in _objects(str(directory)))
            if p != bare]
  return [os.path.relpath(os.path.join(d, name), directory)
          for d, _, found in os.walk(directory) for name in found]


def children(directory: epath.Path) -> list[epath.Path]:
  """What is directly inside `directory` ([] where it is not a directory)."""
  directory = epath.Path(directory)
  return [directory / name for name in names(directory)]


def remove_file(path: epath.Path) -> None:
  """Remove one file or object, if it is there."""
  if is_gcs(path):
    if gcs().exists(str(path)):
      gcs().rm_file(str(path))
      forget_listings()
    return
  try:
    os.unlink(path)
  except FileNotFoundError:
    pass


def remove_tree(path: epath.Path) -> None:
  """Remove a directory and everything under it (or a file), if it is there.
  On GCS its commit file goes first, so no reader takes what is left of it
  for a committed checkpoint while the rest goes."""
  if not is_gcs(path):
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path)
    else:
      remove_file(path)
    return
  objects = _objects(str(path))
  commit = [o for o in objects if o == str(path).rstrip('/') + '/' + COMMIT_FILE]
  _each(gcs().rm_file, commit)
  _each(gcs().rm_file, [o for o in objects if o not in commit])
  if objects:
    forget_listings()


def _copy_objects(objects: list[str], source: str, target: str) -> None:
  """Copy gs:// `objects` under `source` to the same names under `target`,
  server-side, each by its name."""
  _each(gcs().cp_file, objects, [target + o[len(source):] for o in objects])


def move_tree(src: epath.Path, dst: epath.Path) -> None:
  """Move a directory: a rename locally; on GCS a server-side copy of each
  object, then its removal."""
  if not is_gcs(src):
    os.rename(src, dst)
    return
  source, target = str(src).rstrip('/'), str(dst).rstrip('/')
  objects = _objects(source)
  _copy_objects(objects, source, target)
  _each(gcs().rm_file, objects)
  forget_listings()


def replace_tree(src: epath.Path, dst: epath.Path) -> None:
  """dst's contents replaced by src's, then src removed. Locally a rename
  (atomic). On GCS, where a rename is a copy and a delete: dst's commit file
  goes first, src's is copied last and removed first, so a reader never sees
  a committed dst that holds part of either, and src stays whole until dst is
  (a caller that was killed does it again from src)."""
  if not is_gcs(dst):
    remove_tree(dst)
    os.rename(src, dst)
    return
  remove_tree(dst)
  source, target = str(src).rstrip('/'), str(dst).rstrip('/')
  objects = _objects(source)
  commits = [o for o in objects if o.endswith('/' + COMMIT_FILE)]  # the step's and its items'
  _copy_objects([o for o in objects if o not in commits], source, target)
  _copy_objects(commits, source, target)  # last
  forget_listings()
  remove_tree(src)


GLOB_CHARACTERS = '*?[]'


def globbed(path: Any) -> bool:
  """Whether a glob of `path` would not name it as written."""
  return any(c in GLOB_CHARACTERS for c in str(path))


@contextlib.contextmanager
def unglobbed(path: epath.Path) -> Iterator[epath.Path]:
  """`path` under a name no glob misreads, for the length of the block: a
  local path that holds glob characters is reached through a symbolic link
  from a fresh temporary directory. For code that globs the paths it is
  given (Orbax's save merges the per-process databases it finds by globbing
  the checkpoint's directory; its array metadata is found so too)."""
  if is_gcs(path) or not globbed(path):
    yield path
    return
  home = tempfile.mkdtemp(prefix='ckpt-surgery-')
  link = os.path.join(home, 'path')
  os.symlink(os.path.abspath(path), link)
  try:
    yield epath.Path(link)
  finally:
    os.unlink(link)
    os.rmdir(home)
