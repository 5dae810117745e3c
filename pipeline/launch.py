"""Launch one `run`: refuse what would fail before any checkpoint is touched,
run the Beam job, and report it from its own records.

The launcher checks Beam's options, reads the spec, discovers the checkpoints
and their outputs, tries the report's place, carries roots' metadata, and
only then starts the job, in a thread it watches: on the local runner a job
still running JOB_GRACE_SECONDS after every checkpoint saved its record is
reported as hung from those records. The table, the report and its page are
built from what the run's checkpoints saved, whatever the job's end.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import sys
import threading
import time
from typing import TYPE_CHECKING

from etils import epath

import transforms
from pipeline import report, supervisor
from pipeline.checkpoint import discovery, merge_groups, roots
from pipeline.report import done, html_page, progress, tidy
from pipeline.usage import UsageError

if TYPE_CHECKING:
  from pipeline.migrate import Settings

def check_beam_args(beam_args: list[str]) -> None:
  """Refuse an argument neither we nor Beam know (a typo would otherwise be
  dropped by Beam with a warning nobody reads)."""
  # pylint: disable=g-import-not-at-top
  from apache_beam.options import pipeline_options
  from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
  from apache_beam.runners.runner import create_runner
  from pipeline.run import LOCAL_RUNNERS
  options = PipelineOptions(beam_args)
  runner = options.view_as(StandardOptions).runner or ''
  if '.' in runner:  # a runner named by its module registers its own options
    try:
      importlib.import_module(runner.rsplit('.', 1)[0])
    except ImportError as e:
      raise UsageError(f'cannot import --runner={runner}: {e}') from None
  if runner and runner not in LOCAL_RUNNERS:
    try:
      create_runner(runner)
    except (ValueError, ImportError) as e:
      raise UsageError(f'--runner={runner}: {e}') from None
  workers = options.view_as(pipeline_options.DirectOptions).direct_num_workers
  if workers is not None and workers < 0:
    raise UsageError(f'--direct_num_workers={workers}: give a number of worker processes '
                     '(0 for one per core)')
  # As PipelineOptions.get_all_options parses: every options class's flags.
  parser = pipeline_options._BeamArgumentParser(allow_abbrev=False)  # pylint: disable=protected-access
  for cls in {str(c): c for c in PipelineOptions.__subclasses__()}.values():
    cls._add_argparse_args(parser)  # pylint: disable=protected-access
  _, unknown = parser.parse_known_args(beam_args)
  if unknown:
    raise UsageError(f'unknown option {unknown[0].split("=")[0]} (not ours, not a Beam option)')


def load_spec(path: str) -> tuple[transforms.Spec, str]:
  try:
    text = epath.Path(path).read_text()
  except (OSError, ValueError) as e:
    raise UsageError(f'cannot read spec {path}: {e}') from None
  try:
    return transforms.load_spec(text), text
  except transforms.SpecError as e:
    raise UsageError(f'{path}: {e}') from None


# After every checkpoint has saved its record, how long the launcher waits for
# the job itself to end (a runner can hang on a dead worker) before it reports.
JOB_GRACE_SECONDS = 60.0
LOOK_EVERY_MAX = 30.0  # seconds between two counts of the records saved, at most


def _run_job(pairs: list[tuple[str, str]], known: list[dict], spec_text: str, output: str,
             settings: Settings, beam_args: list[str], wait: bool, started_at: float,
             local: bool) -> tuple[str, str]:
  """Run the job on `pairs` (`known`: the records of those skipped without
  it) in a thread: (its state, what went wrong or ''). On the local runner,
  returns early when every checkpoint's record is saved but the job has not
  ended JOB_GRACE_SECONDS later (a runner can hang on a dead worker)."""
  from pipeline.run import run_migration  # pylint: disable=g-import-not-at-top
  outcome = [('FAILED', 'the job ended without a word')]

  def job():
    try:
      outcome[0] = (run_migration(pairs, spec_text, output, settings, beam_args, wait,
                                  started_at, known), '')
    except Exception as e:  # a dead worker, a failed report step: report what finished
      lines = str(e).strip().splitlines()
      outcome[0] = ('FAILED', f'{type(e).__name__}: {lines[-1][:300]}' if lines else type(e).__name__)

  thread = threading.Thread(target=job, daemon=True, name='job')
  thread.start()
  bar = progress.Progress(len(pairs))
  try:
    all_saved_since, begun, next_look = None, time.monotonic(), 1.0
    while thread.is_alive():
      thread.join(1.0)
      elapsed = time.monotonic() - begun
      if not (wait and (local or bar.drawn)) or not thread.is_alive() or elapsed < next_look:
        continue
      # Each look lists the run's records: looks grow apart as the job runs (a
      # twentieth of its time so far, up to LOOK_EVERY_MAX), so a long job of
      # many checkpoints does not pay a listing of them all every second.
      next_look = elapsed + min(LOOK_EVERY_MAX, max(1.0, elapsed / 20))
      saved = _count_records(output, settings.run)
      if saved is not None:
        bar.show(saved, elapsed)
      if not local or (saved or 0) < len(pairs):
        all_saved_since = None
      elif all_saved_since is None:
        all_saved_since = time.monotonic()
      elif time.monotonic() - all_saved_since > JOB_GRACE_SECONDS:
        return 'HUNG', (f'the job had not ended {JOB_GRACE_SECONDS:g} s after its last checkpoint; '
                        'reported from the records its workers saved')
    return outcome[0]
  finally:
    bar.close()


def migrate_all(pattern: str, output: str, spec_path: str, settings: Settings,
            beam_args: list[str], wait: bool = True) -> int:
  """Discover, run, print the table; the exit code, from this run's own records."""
  # pylint: disable=g-import-not-at-top
  from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
  from pipeline.run import LOCAL_RUNNERS
  check_beam_args(beam_args)
  spec, spec_text = load_spec(spec_path)
  try:
    pairs = discovery.discover(pattern, output)
  except discovery.DiscoveryError as e:
    raise UsageError(str(e)) from None
  output = discovery.absolute(output)
  work, unformed = merge_work(pairs, output, spec) if spec.merge else (pairs, [])
  pairs = [tuple(w[:2]) for w in work] + [(u.name, '') for u in unformed]
  started_at = time.time()
  run = report.new_run_id(started_at)
  settings = dataclasses.replace(settings, output=output, run=run, launcher=os.getpid())
  try:  # the report's place, tried before any checkpoint is touched
    report.check_writable(output, run)
  except Exception as e:  # pylint: disable=broad-except  # 403 and friends: say so, exit 2
    raise UsageError(f'cannot write the report under {report.report_dir(output)}: '
                     f'{_cause(e)}') from None
  try:
    if not spec.merge:  # a merge's outputs are no steps of the inputs' roots
      roots.carry_root_metadata(pairs)
  except Exception as e:  # pylint: disable=broad-except  # unreadable input, unwritable output
    raise UsageError(f'cannot carry a checkpoint root\'s metadata: {_cause(e)}') from None
  known = [] if settings.overwrite or spec.merge else done.known(pairs, output, spec.hash)
  if known:
    print(f'{len(known)} of {len(pairs)} checkpoint(s) done already and unchanged since '
          f'({report.report_dir(output)}/{done.DONE_FILE}): skipped', flush=True)
  for group in unformed:  # each error begins with its group's name, which the record has
    print(f'failed  {group.error}', file=sys.stderr)
    error = f"MergeError: {group.error.removeprefix(f'{group.name}: ')}"
    known.append(report.record(group.name, '', 'failed', error=error))
  if known:
    report.save_known(output, run, known)  # the report's, whatever becomes of the job
  skipped = {r['src'] for r in known}
  todo = [w for w in work if w[0] not in skipped]
  print(f'{"merging" if spec.merge else "migrating"} {len(todo)} '
        f'{"group(s) of checkpoints" if spec.merge else "checkpoint(s)"} to {output} (run {run})',
        flush=True)
  supervisor.started(output, run, started_at, pairs, spec_text, settings.gcs_endpoint,
                     settings.keep_runs)
  local = PipelineOptions(beam_args).view_as(StandardOptions).runner in LOCAL_RUNNERS
  if todo and local:  # its workers die with this process: a later run can tell it is over
    tidy.started(output, run, started_at)
  if todo:
    state, trouble = _run_job(todo, known, spec_text, output, settings, beam_args, wait,
                              started_at, local)
  else:  # nothing for a worker to do: no job
    report.write_report(output, known, started_at, run)
    state, trouble, wait = 'DONE', '', True
  return report_run(pairs, output, run, started_at, spec_text, trouble, state, wait, local,
                    settings.keep_runs)


def merge_work(pairs: list[tuple[str, str]], output: str, spec: transforms.Spec
               ) -> tuple[list[tuple[str, str, merge_groups.MergeGroup]],
                          list[merge_groups.Unformed]]:
  """A merge's work, one element per group (its name, output and inputs),
  and the groups that cannot be formed."""
  groups, unformed = merge_groups.merge_groups([src for src, _ in pairs], spec.merge)
  dst_of = dict(pairs)
  return [(g.name, merge_groups.merged_dst(g, spec.merge, dst_of, output), g)
          for g in groups], unformed


def _cause(error: BaseException) -> str:
  """An OSError's reason, or a storage library's error in one line."""
  if isinstance(error, OSError) and error.strerror:
    return error.strerror
  lines = str(error).strip().splitlines()
  return f'{type(error).__name__}: {lines[0][:300] if lines else ""}'


def report_run(pairs: list[tuple[str, str]], output: str, run: str, started_at: float,
               spec_text: str, trouble: str = '', state: str = 'FAILED', wait: bool = True,
               local: bool = True, keep_runs: int = tidy.KEEP_RUNS) -> int:
  """Print the run's table from its report (completed from the records its
  checkpoints saved where the job did not write it all: `trouble` says
  why), write its page, keep what it found done and tidy `_surgery/`
  (`keep_runs`); the exit code. What storage cannot give (an outage) is
  said, not raised: the terminal gets the table all the same."""
  try:
    records, summary = report.read_report(output, run)
    if {r['src'] for r in records} != {src for src, _ in pairs}:
      raise ValueError('the report does not list every checkpoint')
  except Exception:  # pylint: disable=broad-except  # the job did not write it (all of it)
    if not trouble and (not wait or not local and not _count_records(output, run)):
      # Submitted and left running (--detach), or a job that ran nothing (Dataflow's --dry_run).
      if not wait:
        report.save_spec(output, run, spec_text)  # for its report page, built later
      print(f'job {state}; its report will be at {report.run_dir(output, run)}/')
      return 0
    records, summary = report_from_records(pairs, output, run, started_at, trouble or state)
  print(report.format_table(records, summary))
  if trouble:
    print(f'ckpt-surgery: error: {trouble}', file=sys.stderr)
  if not summary.get('unwritten'):
    print(f'report: {report.run_dir(output, run)}/report.jsonl')
  try:
    report.save_spec(output, run, spec_text)  # beside the report: the page, now or rebuilt later
    print(f'report page: {html_page.write(output, run)}')
  except Exception as e:  # pylint: disable=broad-except  # a view of the report, which is written
    print(f'ckpt-surgery: error: cannot write the report page: {_cause(e)}', file=sys.stderr)
  if not summary.get('unwritten'):
    _keep(output, run, records, spec_text, keep_runs)
  return 1 if summary['failed'] or trouble else 0


def _keep(output: str, run: str, records: list[dict], spec_text: str, keep_runs: int) -> None:
  """Once the run's report is written: what it found done, for the next
  run's skips (`done`), and `_surgery/` tidied (`tidy`). Either only saves
  later work: a failure is said, and changes no outcome."""
  try:
    done.update(output, records, transforms.load_spec(spec_text).hash)
    removed = tidy.tidy(output, run, keep_runs)
  except Exception as e:  # pylint: disable=broad-except
    print(f'ckpt-surgery: error: cannot tidy {report.report_dir(output)}: {_cause(e)}',
          file=sys.stderr)
    return
  if removed:
    print(f'removed {len(removed)} old run(s) from {report.report_dir(output)}/runs '
          f'(--keep_runs={keep_runs})')


def _count_records(output: str, run: str) -> int | None:
  """How many records the run's checkpoints saved; None while storage does not say."""
  try:
    return report.count_records(output, run)
  except Exception:  # pylint: disable=broad-except  # an outage: ask again later
    return None


def report_from_records(pairs: list[tuple[str, str]], output: str, run: str, started_at: float,
                        why: str) -> tuple[list[dict], dict]:
  """Every checkpoint that finished, from its saved record; the others failed
  as unfinished. Written as the run's report when storage allows (where it
  does not, the summary says `unwritten`)."""
  try:
    saved = report.saved_records(output, run)
  except Exception as e:  # pylint: disable=broad-except  # an outage: the rest is unknown
    print(f'ckpt-surgery: error: cannot read the records the run saved under '
          f'{report.run_dir(output, run)}: {_cause(e)}', file=sys.stderr)
    saved = []
  records = {r['src']: r for r in saved}
  for src, dst in pairs:
    if src not in records:
      records[src] = report.record(
          src, dst, 'failed', error=f'unfinished: the job ended ({why}) before this checkpoint did',
          finished_at=None)
  records = list(records.values())
  try:
    return records, report.write_report(output, records, started_at, run)
  except Exception as e:  # pylint: disable=broad-except  # a full disk, an outage: the table still
    print(f'ckpt-surgery: error: cannot write the report under {report.run_dir(output, run)}: '
          f'{_cause(e)}', file=sys.stderr)
    return records, {**report.summarize(records, started_at), 'run': run, 'unwritten': True}
