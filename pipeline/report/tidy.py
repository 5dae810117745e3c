"""Keep `_surgery/` small: a finished run keeps a few files, old runs go.

A run's workers save each checkpoint's record on its own (`records/`), so a
job that dies still reports what finished. Once the run's report.jsonl holds
them all they are a second copy: `compact` removes them (and the launcher's
`known.jsonl`), and the run keeps its report, summary, spec, page and
launcher file, whatever its size. A run that died before its launcher could
(the machine lost, `kill -9` of the whole process group) is compacted by the
next run into the prefix, its report.jsonl built from the records it left,
once it is surely over: reported by its job (a detached run), its launcher
a dead process on this host (a local run, whose workers die with their
launcher, says which in `launcher.json`), or started more than
`STALE_AFTER` ago.

`prune` keeps the newest `keep_runs` runs (`--keep_runs`, default
`KEEP_RUNS`; 0 keeps every run) and removes older ones whole, except a run
that may still be under way.
"""
from __future__ import annotations

import calendar
import json
import time
from typing import Any

from pipeline.report.records import KNOWN_FILE, run_dir, saved_records, write_report, write_whole
from pipeline.storage import files

KEEP_RUNS = 30  # a month of nightly runs
STALE_AFTER = 7 * 24 * 3600.0  # a run started longer ago than this is over
LAUNCHER_FILE = 'launcher.json'


def _holder() -> dict[str, Any]:
  from pipeline.write import lease  # pylint: disable=g-import-not-at-top
  return lease.holder()


def started(prefix: str, run: str, started_at: float) -> None:
  """Note which process launches `run`, so a later run can tell it is over."""
  write_whole(run_dir(prefix, run) / LAUNCHER_FILE,
              json.dumps({**_holder(), 'started_at': started_at}))


def compact(prefix: str, run: str) -> None:
  """Remove what the run's report.jsonl holds a copy of."""
  where = run_dir(prefix, run)
  files.remove_tree(where / 'records')
  files.remove_file(where / KNOWN_FILE)


def _started_at(run: str) -> float:
  """When `run` started, from its id (`new_run_id`); 0 for another name."""
  try:
    return calendar.timegm(time.strptime(run.split('-')[0], '%Y%m%dT%H%M%SZ'))
  except ValueError:
    return 0.0


def _over(prefix: str, run: str, reported: set[str]) -> bool:
  """Whether `run` has surely ended (see the module's docstring); `reported`:
  the runs that have a summary."""
  from pipeline.write import lease  # pylint: disable=g-import-not-at-top
  if run in reported or time.time() - _started_at(run) > STALE_AFTER:
    return True
  try:
    return not lease.alive_here(json.loads((run_dir(prefix, run) / LAUNCHER_FILE).read_text()))
  except (FileNotFoundError, ValueError, KeyError):
    return False  # starting now, or an older version's: only time tells


def tidy(prefix: str, run: str, keep_runs: int = KEEP_RUNS) -> list[str]:
  """After `run` has reported: compact it and every earlier run that is over
  and still holds its records, and prune runs past the newest `keep_runs`.
  The runs removed. What each run holds comes from one listing of them all."""
  compact(prefix, run)
  listed = [p.split('/') for p in files.tree(run_dir(prefix, run).parent)]
  # This run is the newest, whatever its id: two runs that start in the same
  # second (a skip-all rerun takes less) sort by their random letters.
  others = sorted({p[0] for p in listed} - {run})
  reported = {p[0] for p in listed if p[1:] == ['summary.json']}
  for other in sorted({p[0] for p in listed if p[1:2] == ['records']} - {run}):
    if _over(prefix, other, reported):
      _finish(prefix, other)
  if keep_runs <= 0:
    return []
  removed = [other for other in others[:max(0, len(others) - (keep_runs - 1))]
             if _over(prefix, other, reported)]
  for other in removed:
    files.remove_tree(run_dir(prefix, other))
  return removed


def _finish(prefix: str, run: str) -> None:
  """A dead run's report, from the records it left (where its job wrote
  none), then compacted."""
  if not (run_dir(prefix, run) / 'report.jsonl').exists():
    write_report(prefix, saved_records(prefix, run), _started_at(run), run, latest=False)
  compact(prefix, run)
