"""The command line: `ckpt-surgery run|plan|inspect|demo` (a contract: scripts call it).

Exit codes: 0 nothing failed; 1 some checkpoint failed; 2 a usage, spec or
discovery error found before any checkpoint was touched. Every argument that
is not ours goes to Beam as a pipeline option.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time

from apache_beam.options import pipeline_options
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from etils import epath

import transforms
from pipeline import checkpoint_io, demo, discovery, inspection, plan, report, storage
from pipeline.migrate import Settings
from pipeline.run import run_migration

USAGE_ERROR = 2


class UsageError(Exception):
  """Refused before any checkpoint is touched: exit 2."""


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='ckpt-surgery',
      description='Apply one model surgery to many JAX/Flax checkpoints.')
  commands = parser.add_subparsers(dest='command', required=True)
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument(
      '--gcs_endpoint', metavar='URL', default=os.environ.get(storage.ENDPOINT_ENV),
      help='send gs:// to this GCS-protocol server (an emulator) instead of Google '
           f'Cloud Storage; default ${storage.ENDPOINT_ENV}')
  run = commands.add_parser(
      'run', parents=[common], help='migrate every checkpoint PATTERN names',
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
  run.add_argument('--checkpoints_in_flight', type=_at_least_one, default=2, metavar='N',
                   help='checkpoints each worker holds at once: while one is written the next '
                        'is read (default 2; 1 halves the memory a worker needs)')
  run.add_argument('--detach', action='store_true',
                   help='submit the job and exit without waiting (Dataflow, flex templates)')
  plan = commands.add_parser(
      'plan', parents=[common], help='what run would do, from metadata only: per-signature diffs and errors')
  plan.add_argument('--input', required=True, metavar='PATTERN')
  plan.add_argument('--spec', required=True, metavar='SPEC.yaml')
  plan.add_argument('--json', action='store_true', help='print the plan as JSON')
  inspect = commands.add_parser('inspect', parents=[common], help='print a checkpoint tree from its metadata')
  inspect.add_argument('checkpoint')
  inspect.add_argument('--spec', metavar='SPEC.yaml',
                       help='take the params and opt_state keys from this spec '
                            '(default: params, opt_state)')
  demo_cmd = commands.add_parser('demo', help='make sample checkpoints and migrate them')
  demo_cmd.add_argument('--workdir', default='demo')
  demo_cmd.add_argument('--count', type=int, default=6)
  return parser


def _at_least_one(text: str) -> int:
  if not text.isdigit() or int(text) < 1:
    raise argparse.ArgumentTypeError(f'{text!r} is not a whole number of at least 1')
  return int(text)


def run_arguments() -> dict[str, argparse.Action]:
  """`run`'s own options by name (what a flex template must expose)."""
  commands = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))  # pylint: disable=protected-access
  return {a.dest: a for a in commands.choices['run']._actions if a.dest != 'help'}  # pylint: disable=protected-access


def _check_beam_args(beam_args: list[str]) -> None:
  """Refuse an argument neither we nor Beam know (a typo would otherwise be
  dropped by Beam with a warning nobody reads)."""
  runner = PipelineOptions(beam_args).view_as(StandardOptions).runner or ''
  if '.' in runner:  # a runner named by its module registers its own options
    try:
      importlib.import_module(runner.rsplit('.', 1)[0])
    except ImportError as e:
      raise UsageError(f'cannot import --runner={runner}: {e}') from None
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


def migrate(pattern: str, output: str, spec_path: str, settings: Settings,
            beam_args: list[str], wait: bool = True) -> int:
  """Discover, run, print the table; the exit code."""
  _check_beam_args(beam_args)
  _, spec_text = load_spec(spec_path)
  try:
    pairs = discovery.discover(pattern, output)
  except discovery.DiscoveryError as e:
    raise UsageError(str(e)) from None
  output = discovery.absolute(output)
  print(f'migrating {len(pairs)} checkpoint(s) to {output}', flush=True)
  started_at = time.time()
  state = run_migration(pairs, spec_text, output, settings, beam_args, wait, started_at)
  summary_file = report.report_dir(output) / 'summary.json'
  if not summary_file.exists() or json.loads(summary_file.read_text())['started_at'] != started_at:
    print(f'job {state}; its report will be at {report.report_dir(output)}/')
    return 0
  records, summary = report.read_report(output)
  print(report.format_table(records, summary))
  print(f'report: {report.report_dir(output)}/report.jsonl')
  return 1 if summary['failed'] else 0


def show_plan(pattern: str, spec_path: str, as_json: bool) -> int:
  """Plan every checkpoint PATTERN names; exit 1 if some would fail."""
  spec, _ = load_spec(spec_path)
  try:
    pairs = discovery.discover(pattern)
  except discovery.DiscoveryError as e:
    raise UsageError(str(e)) from None
  result = plan.plan_checkpoints([src for src, _ in pairs], spec)
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


def main(argv: list[str] | None = None) -> int:
  # Our output is the progress lines and the table; libraries speak up on errors.
  logging.basicConfig(level=logging.ERROR, format='%(levelname)s %(name)s: %(message)s')
  logging.getLogger('absl').setLevel(logging.ERROR)  # Orbax logs through absl's own logger
  args, rest = _parser().parse_known_args(argv)
  storage.configure(getattr(args, 'gcs_endpoint', None))
  try:
    if args.command == 'run':
      settings = Settings(args.overwrite, args.allow_nonfinite, args.gcs_endpoint, args.full_decode,
                          args.checkpoints_in_flight)
      return migrate(args.input, args.output, args.spec, settings, rest, not args.detach)
    if rest:
      raise UsageError(f'unrecognized arguments: {" ".join(rest)}')
    if args.command == 'plan':
      return show_plan(args.input, args.spec, args.json)
    if args.command == 'inspect':
      return show_checkpoint(args.checkpoint, args.spec)
    pattern, output, spec = demo.prepare(args.workdir, args.count)
    return migrate(pattern, output, spec, Settings(), [])
  except UsageError as e:
    print(f'ckpt-surgery: error: {e}', file=sys.stderr)
    return USAGE_ERROR


def command() -> None:
  """The `ckpt-surgery` program: main(), then exit without Python's
  interpreter teardown, which unloads JAX, Orbax and Beam for about 0.75 s
  (measured) and does nothing a finished command needs. Output is flushed
  first."""
  code = main()
  sys.stdout.flush()
  sys.stderr.flush()
  logging.shutdown()
  os._exit(code)  # pylint: disable=protected-access
