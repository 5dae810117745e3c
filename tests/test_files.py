"""pipeline/storage/files.py: paths we derive are names, never patterns, locally and on gs://."""
from __future__ import annotations

import os

from etils import epath

from pipeline.storage import files

# Each name beside a decoy that a glob of it would also name.
DECOYS = {'run[1]': 'run1', 'run*x': 'run_any_x', 'run?x': 'runZx'}


def tree(root: str, names: list[str]) -> None:
  for name in names:
    path = epath.Path(root) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(name)


def everything(root: str) -> dict[str, str]:
  """{path under root: its text}: every file or object."""
  root = epath.Path(root)
  if files.is_gcs(root):
    bare = str(root).removeprefix('gs://')
    return {p[len(bare) + 1:]: files.gcs().cat_file(p).decode() for p in files.gcs().find(bare)}
  return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f)).read()
          for d, _, names in os.walk(root) for f in names}


def check_literal(root: str) -> None:
  names = [f'{n}/{leaf}' for pair in DECOYS.items() for n in pair for leaf in ('a', 'sub/b')]
  names += [f'{n}/{files.COMMIT_FILE}' for n in DECOYS]
  tree(root, names)
  decoys = {k: v for k, v in everything(root).items() if k.split('/')[0] in DECOYS.values()}
  for name in DECOYS:
    assert sorted(p.name for p in files.children(epath.Path(root) / name)) == sorted(
        ['a', 'sub', files.COMMIT_FILE])
    files.remove_file(epath.Path(root) / name / 'a')
    files.move_tree(epath.Path(root) / name / 'sub', epath.Path(root) / name / 'moved')
    assert everything(epath.Path(root) / name) == {'moved/b': f'{name}/sub/b',
                                                   files.COMMIT_FILE: f'{name}/{files.COMMIT_FILE}'}
    files.replace_tree(epath.Path(root) / name / 'moved', epath.Path(root) / name / 'replaced')
    files.remove_tree(epath.Path(root) / name)
  assert everything(root) == decoys  # every decoy as it was; nothing of the names left


def test_local_paths_are_names(tmp_path):
  check_literal(str(tmp_path))


def test_gcs_paths_are_names(bucket):
  check_literal(bucket + '/root')


def test_removing_what_is_not_there_is_nothing(tmp_path, bucket):
  for root in (tmp_path, epath.Path(bucket)):
    files.remove_tree(root / 'absent')
    files.remove_file(root / 'absent')
    assert files.children(root / 'absent') == []


def test_a_globbed_path_is_reached_through_a_plain_name(tmp_path):
  real = tmp_path / 'run[1]'
  real.mkdir()
  (real / 'x').write_text('x')
  (tmp_path / 'run1').mkdir()
  with files.unglobbed(epath.Path(real)) as plain:
    assert not files.globbed(plain)
    assert [p.name for p in plain.glob('*')] == ['x']  # what a glob of the real path misses
  assert not os.path.exists(plain) and (real / 'x').exists()
  with files.unglobbed(epath.Path(tmp_path / 'plain')) as same:
    assert same == epath.Path(tmp_path / 'plain')
