"""The command line: `ckpt-surgery run|plan|inspect|report|demo` (a contract: scripts call it).

Exit codes: 0 nothing failed; 1 some checkpoint failed; 2 a usage, spec or
discovery error found before any checkpoint was touched. Every argument that
is not ours goes to Beam as a pipeline option.

Beam (and the pipeline, which needs it) is imported only by `run` and `demo`:
`plan`, `inspect`, `report` and `--help` start without it (`plan` in 0.8 s instead of 1.4 s, measured).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import pathlib
import re
import sys
import threading
import time
import webbrowser
from typing import TYPE_CHECKING

from etils import epath

import transforms
from pipeline import (ARENAS, checkpoint_io, demo, discovery, files, inspection, plan, report,
                      report_page, roots, storage, supervisor)

if TYPE_CHECKING:
  from pipeline.migrate import Settings

USAGE_ERROR = 2


class UsageError(Exception):
  """Refused before any checkpoint is touched: exit 2."""


def _parser() -> argparse.ArgumentParser:
  # No abbreviations: `--ove` is not `--overwrite` (it goes to Beam, which refuses it).
  parser = argparse.ArgumentParser(
      prog='ckpt-surgery', allow_abbrev=False,
      description='Apply one model surgery to many JAX/Flax checkpoints.')
  commands = parser.add_subparsers(dest='command', required=True)
  common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  common.add_argument(
      '--gcs_endpoint', metavar='URL', default=os.environ.get(storage.ENDPOINT_ENV),
      help='send gs:// to this GCS-protocol server (an emulator) instead of Google '
           f'Cloud Storage; default ${storage.ENDPOINT_ENV}')
  memory = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  memory.add_argument('--checkpoints_in_flight', type=_at_least_one, default=2, metavar='N',
                      help='checkpoints each worker holds at once: while one is written the next '
                           'is read (default 2; 1 halves the memory a worker needs)')
  memory.add_argument('--memory_budget', type=size_in_bytes, default=0, metavar='BYTES',
                      help='bytes a worker may hold per checkpoint in flight (512MB, 4GiB, ...): '
                           'a checkpoint that computes more is migrated a pack of leaves at a '
                           "time (default: the worker's memory per core, less 1 GB, shared by "
                           'its checkpoints in flight)')
  run = commands.add_parser(
      'run', parents=[common, memory], allow_abbrev=False, help='migrate every checkpoint PATTERN names',
      epilog='Every other --option is a Beam pipeline option (--runner, ...).')
  run.add_argument('--input', required=True, metavar='PATTERN',
                   help='checkpoint directories, CheckpointManager roots or legacy Flax '
                        'msgpack files; globs allowed')
  run.add_argument('--output', required=True, metavar='PREFIX')
  run.add_argument('--spec', required=True, metavar='SPEC.yaml')
  run.add_argument('--overwrite', action='store_true',
                   help='replace outputs written with a different spec')
  run.add_argument('--allow_nonfinite', action='store_true',
                   help='write outputs even where the surgery made NaN or inf')
  run.add_argument('--full_decode', action='store_true',
                   help='restore, move through the device and rewrite every leaf, even those '
                        'the surgery leaves untouched (default: carry their stored bytes over)')
  run.add_argument('--checkpoint_timeout', type=_seconds, default=7200.0, metavar='SECONDS',
                   help='a checkpoint not done after this long fails and its lease is freed, so '
                        'a rerun can take it (default 7200; set it above your slowest checkpoint)')
  run.add_argument('--detach', action='store_true',
                   help='submit the job and exit without waiting (Dataflow, flex templates)')
  plan = commands.add_parser(
      'plan', parents=[common, memory], allow_abbrev=False, help='what run would do, from metadata only: per-signature diffs and errors')
  plan.add_argument('--input', required=True, metavar='PATTERN')
  plan.add_argument('--spec', required=True, metavar='SPEC.yaml')
  plan.add_argument('--json', action='store_true', help='print the plan as JSON')
  inspect = commands.add_parser('inspect', parents=[common], allow_abbrev=False, help='print a checkpoint tree from its metadata')
  inspect.add_argument('checkpoint')
  inspect.add_argument('--spec', metavar='SPEC.yaml',
                       help='take the params and opt_state keys from this spec '
                            '(default: params, opt_state)')
  page = commands.add_parser(
      'report', parents=[common], allow_abbrev=False,
      help="build a run's HTML report page (PREFIX/_surgery/report.html) from its report.jsonl")
  page.add_argument('prefix', metavar='PREFIX', help='the --output of the run')
  page.add_argument('--run', metavar='RUN', help='which run (a name under PREFIX/_surgery/runs; '
                                                 'default: the latest)')
  page.add_argument('--open', action='store_true', help='open the page in a web browser')
  demo_cmd = commands.add_parser('demo', allow_abbrev=False, help='make sample checkpoints and migrate them')
  demo_cmd.add_argument('--workdir', default='demo')
  demo_cmd.add_argument('--count', type=int, default=6)
  return parser


def _at_least_one(text: str) -> int:
  if not text.isdigit() or int(text) < 1:
    raise argparse.ArgumentTypeError(f'{text!r} is not a whole number of at least 1')
  return int(text)


_UNITS = {'': 1, 'B': 1, 'KB': 10**3, 'MB': 10**6, 'GB': 10**9, 'TB': 10**12,
          'KIB': 2**10, 'MIB': 2**20, 'GIB': 2**30, 'TIB': 2**40}


def size_in_bytes(text: str) -> int:
  """'512MB', '4GiB', '1000000' -> bytes (the benchmarks parse sizes with it too)."""
  match = re.fullmatch(r'\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*', text)
  unit = match and _UNITS.get(match.group(2).upper())
  if not unit or float(match.group(1)) * unit < 1:
    raise argparse.ArgumentTypeError(f'{text!r} is not a size in bytes (512MB, 4GiB, 1000000)')
  return int(float(match.group(1)) * unit)


def _seconds(text: str) -> float:
  try:
    seconds = float(text)
  except ValueError:
    seconds = 0.0
  if not seconds > 0:
    raise argparse.ArgumentTypeError(f'{text!r} is not a positive number of seconds')
  return seconds


def run_arguments() -> dict[str, argparse.Action]:
  """`run`'s own options by name (what a flex template must expose)."""
  commands = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))  # pylint: disable=protected-access
  return {a.dest: a for a in commands.choices['run']._actions if a.dest != 'help'}  # pylint: disable=protected-access


def _check_beam_args(beam_args: list[str]) -> None:
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


def _run_job(pairs: list[tuple[str, str]], spec_text: str, output: str, settings: Settings,
             beam_args: list[str], wait: bool, started_at: float, local: bool) -> tuple[str, str]:
  """Run the job in a thread: (its state, what went wrong or ''). On the local
  runner, returns early when every checkpoint's record is saved but the job
  has not ended JOB_GRACE_SECONDS later (a runner can hang on a dead worker)."""
  from pipeline.run import run_migration  # pylint: disable=g-import-not-at-top
  outcome = [('FAILED', 'the job ended without a word')]

  def job():
    try:
      outcome[0] = (run_migration(pairs, spec_text, output, settings, beam_args, wait,
                                  started_at), '')
    except Exception as e:  # a dead worker, a failed report step: report what finished
      lines = str(e).strip().splitlines()
      outcome[0] = ('FAILED', f'{type(e).__name__}: {lines[-1][:300]}' if lines else type(e).__name__)

  thread = threading.Thread(target=job, daemon=True, name='job')
  thread.start()
  all_saved_since = None
  while thread.is_alive():
    thread.join(1.0)
    if not (wait and local) or not thread.is_alive():
      continue
    if (_count_records(output, settings.run) or 0) < len(pairs):
      all_saved_since = None
    elif all_saved_since is None:
      all_saved_since = time.monotonic()
    elif time.monotonic() - all_saved_since > JOB_GRACE_SECONDS:
      return 'HUNG', (f'the job had not ended {JOB_GRACE_SECONDS:g} s after its last checkpoint; '
                      'reported from the records its workers saved')
  return outcome[0]


def migrate(pattern: str, output: str, spec_path: str, settings: Settings,
            beam_args: list[str], wait: bool = True) -> int:
  """Discover, run, print the table; the exit code, from this run's own records."""
  # pylint: disable=g-import-not-at-top
  from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
  from pipeline.run import LOCAL_RUNNERS
  _check_beam_args(beam_args)
  _, spec_text = load_spec(spec_path)
  try:
    pairs = discovery.discover(pattern, output)
  except discovery.DiscoveryError as e:
    raise UsageError(str(e)) from None
  output = discovery.absolute(output)
  started_at = time.time()
  run = report.new_run_id(started_at)
  settings = dataclasses.replace(settings, output=output, run=run, launcher=os.getpid())
  try:  # the report's place, tried before any checkpoint is touched
    report.check_writable(output, run)
  except Exception as e:  # pylint: disable=broad-except  # 403 and friends: say so, exit 2
    raise UsageError(f'cannot write the report under {report.report_dir(output)}: '
                     f'{_cause(e)}') from None
  try:
    roots.carry_root_metadata(pairs)
  except Exception as e:  # pylint: disable=broad-except  # unreadable input, unwritable output
    raise UsageError(f'cannot carry a checkpoint root\'s metadata: {_cause(e)}') from None
  print(f'migrating {len(pairs)} checkpoint(s) to {output} (run {run})', flush=True)
  supervisor.started(output, run, started_at, pairs, spec_text, settings.gcs_endpoint)
  local = PipelineOptions(beam_args).view_as(StandardOptions).runner in LOCAL_RUNNERS
  state, trouble = _run_job(pairs, spec_text, output, settings, beam_args, wait, started_at, local)
  return report_run(pairs, output, run, started_at, spec_text, trouble, state, wait, local)


def _cause(error: BaseException) -> str:
  """An OSError's reason, or a storage library's error in one line."""
  if isinstance(error, OSError) and error.strerror:
    return error.strerror
  lines = str(error).strip().splitlines()
  return f'{type(error).__name__}: {lines[0][:300] if lines else ""}'


def report_run(pairs: list[tuple[str, str]], output: str, run: str, started_at: float,
               spec_text: str, trouble: str = '', state: str = 'FAILED', wait: bool = True,
               local: bool = True) -> int:
  """Print the run's table from its report (completed from the records its
  checkpoints saved where the job did not write it all: `trouble` says
  why), write its page; the exit code. What storage cannot give (an outage)
  is said, not raised: the terminal gets the table all the same."""
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
    print(f'report page: {report_page.write(output, run)}')
  except Exception as e:  # pylint: disable=broad-except  # a view of the report, which is written
    print(f'ckpt-surgery: error: cannot write the report page: {_cause(e)}', file=sys.stderr)
  return 1 if summary['failed'] or trouble else 0


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


def show_plan(pattern: str, spec_path: str, as_json: bool, budget: int = 0,
              in_flight: int = 2) -> int:
  """Plan every checkpoint PATTERN names; exit 1 if some would fail."""
  spec, _ = load_spec(spec_path)
  try:
    pairs = discovery.discover(pattern)
  except discovery.DiscoveryError as e:
    raise UsageError(str(e)) from None
  result = plan.plan_checkpoints([src for src, _ in pairs], spec, budget, in_flight)
  print(json.dumps(result, indent=2) if as_json else plan.format_plan(result))
  return 1 if result['would_fail'] else 0


def show_checkpoint(path: str, spec_path: str | None) -> int:
  """Print one checkpoint's tree; exit 1 if it cannot be read."""
  spec = load_spec(spec_path)[0] if spec_path else transforms.Spec(ops=())  # its default keys
  try:
    print(inspection.describe(path, spec.params, spec.opt_state))
  except checkpoint_io.CheckpointError as e:
    print(f'ckpt-surgery: error: {e}', file=sys.stderr)
    return 1
  return 0


def build_page(prefix: str, run: str | None, open_it: bool) -> int:
  """Rebuild a run's report page from what it left; print its path."""
  try:
    page = report_page.write(prefix, run)
  except FileNotFoundError:
    where = report.run_dir(prefix, run) if run else report.report_dir(prefix)
    raise UsageError(f'no report at {where}') from None
  print(page)
  if open_it and files.is_gcs(page):
    print('ckpt-surgery: --open: a browser cannot open gs://; download the page', file=sys.stderr)
  elif open_it:
    webbrowser.open(pathlib.Path(str(page)).resolve().as_uri())
  return 0


def main(argv: list[str] | None = None) -> int:
  # Inherited by the worker processes a local run starts (see pipeline/__init__),
  # set while this process has no thread that could read its environment.
  os.environ.setdefault('MALLOC_ARENA_MAX', str(ARENAS))
  # Our output is the progress lines and the table; libraries speak up on errors.
  logging.basicConfig(level=logging.ERROR, format='%(levelname)s %(name)s: %(message)s')
  logging.getLogger('absl').setLevel(logging.ERROR)  # Orbax logs through absl's own logger
  try:
    args, rest = _parser().parse_known_args(argv)
  except SystemExit as e:  # --help, or a usage error argparse has printed
    return e.code if isinstance(e.code, int) else USAGE_ERROR
  storage.configure(getattr(args, 'gcs_endpoint', None))
  try:
    if args.command in ('run', 'demo'):
      from pipeline.migrate import Settings  # pylint: disable=g-import-not-at-top
    if args.command == 'run':
      settings = Settings(args.overwrite, args.allow_nonfinite, args.gcs_endpoint, args.full_decode,
                          in_flight=args.checkpoints_in_flight, memory_budget=args.memory_budget,
                          checkpoint_timeout=args.checkpoint_timeout)
      return migrate(args.input, args.output, args.spec, settings, rest, not args.detach)
    if rest:
      raise UsageError(f'unrecognized arguments: {" ".join(rest)}')
    if args.command == 'plan':
      return show_plan(args.input, args.spec, args.json, args.memory_budget,
                       args.checkpoints_in_flight)
    if args.command == 'inspect':
      return show_checkpoint(args.checkpoint, args.spec)
    if args.command == 'report':
      return build_page(args.prefix, args.run, args.open)
    pattern, output, spec = demo.prepare(args.workdir, args.count)
    return migrate(pattern, output, spec, Settings(), [])
  except UsageError as e:
    print(f'ckpt-surgery: error: {e}', file=sys.stderr)
    return USAGE_ERROR
