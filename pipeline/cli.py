"""The command line: `ckpt-surgery run|plan|inspect|report|demo` (a contract: scripts call it).

Exit codes: 0 nothing failed; 1 some checkpoint failed; 2 a usage, spec or
discovery error found before any checkpoint was touched. Every argument that
is not ours goes to Beam as a pipeline option.

Parsing and the short commands are here; `launch` runs one `run` (checks,
the job, its report). Each command imports what it needs once its
arguments are parsed, so `--help` and a usage error import no JAX. Beam
(and the pipeline, which needs it) is imported only by `run` and `demo`:
`plan`, `inspect`, `report` and `--help` start without it (`plan` in 0.8 s instead of 1.4 s, measured).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import re
import sys
import webbrowser

from pipeline import ARENAS, storage
from pipeline.report.tidy import KEEP_RUNS
from pipeline.usage import USAGE_ERROR, UsageError


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
  run.add_argument('--keep_runs', type=_whole_number, default=KEEP_RUNS, metavar='N',
                   help=f'keep the reports of the newest N runs under PREFIX/_surgery/runs and '
                        f'remove older ones (default {KEEP_RUNS}; 0 keeps every run)')
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


def _whole_number(text: str) -> int:
  if not text.isdigit():
    raise argparse.ArgumentTypeError(f'{text!r} is not a whole number')
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


def show_plan(pattern: str, spec_path: str, as_json: bool, budget: int = 0,
              in_flight: int = 2) -> int:
  """Plan every checkpoint PATTERN names; exit 1 if some would fail."""
  # pylint: disable=g-import-not-at-top
  from pipeline import launch, plan
  from pipeline.checkpoint import discovery
  spec, _ = launch.load_spec(spec_path)
  try:
    pairs = discovery.discover(pattern)
  except discovery.DiscoveryError as e:
    raise UsageError(str(e)) from None
  sources = [src for src, _ in pairs]
  if spec.merge:
    result = plan.plan_merges(sources, spec, budget, in_flight)
    print(json.dumps(result, indent=2) if as_json else plan.format_merges(result))
    return 1 if result['would_fail'] else 0
  result = plan.plan_checkpoints(sources, spec, budget, in_flight)
  print(json.dumps(result, indent=2) if as_json else plan.format_plan(result))
  return 1 if result['would_fail'] else 0


def show_checkpoint(path: str, spec_path: str | None) -> int:
  """Print one checkpoint's tree; exit 1 if it cannot be read."""
  # pylint: disable=g-import-not-at-top
  import transforms
  from pipeline import checkpoint, inspection, launch
  spec = launch.load_spec(spec_path)[0] if spec_path else transforms.Spec(ops=())  # its default keys
  try:
    print(inspection.describe(path, spec.params, spec.opt_state))
  except checkpoint.CheckpointError as e:
    print(f'ckpt-surgery: error: {e}', file=sys.stderr)
    return 1
  return 0


def build_page(prefix: str, run: str | None, open_it: bool) -> int:
  """Rebuild a run's report page from what it left; print its path."""
  # pylint: disable=g-import-not-at-top
  from pipeline import report
  from pipeline.report import html_page
  from pipeline.storage import files
  try:
    page = html_page.write(prefix, run)
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
      # pylint: disable=g-import-not-at-top
      from pipeline import demo, launch
      from pipeline.migrate import Settings
    if args.command == 'run':
      settings = Settings(args.overwrite, args.allow_nonfinite, args.gcs_endpoint, args.full_decode,
                          in_flight=args.checkpoints_in_flight, memory_budget=args.memory_budget,
                          checkpoint_timeout=args.checkpoint_timeout, keep_runs=args.keep_runs)
      return launch.migrate_all(args.input, args.output, args.spec, settings, rest, not args.detach)
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
    return launch.migrate_all(pattern, output, spec, Settings(), [])
  except UsageError as e:
    print(f'ckpt-surgery: error: {e}', file=sys.stderr)
    return USAGE_ERROR
