"""The Beam pipeline: pairs -> fan out -> migrate -> report.

The default runner is Beam's local batch engine (the FnApiRunner behind the
DirectRunner). A run of fewer than IN_PROCESS_MAX checkpoints runs in the
launcher's own process (`in_memory`): no worker process to start, import JAX,
Orbax and Beam in, and wait for at exit. A larger one runs in
multi-processing mode, one worker process per core. The user's own
--direct_running_mode or --direct_num_workers decides instead. We name the
engine directly: the DirectRunner would first try the Prism runner, which
downloads a binary at run time. `--runner=DirectRunner` means the same local
engine here; any other `--runner` is passed to Beam as it is.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time

import apache_beam as beam
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions
from apache_beam.portability.api import beam_provision_api_pb2
from apache_beam.runners.portability.fn_api_runner import fn_runner
from apache_beam.runners.portability.portable_runner import JobServiceHandle

import transforms
from pipeline import storage
from pipeline.migrate import Settings
from pipeline.migrate_fn import MigrateFn
from pipeline.report import write_report

LOCAL_RUNNERS = (None, 'DirectRunner', 'FnApiRunner')


@dataclasses.dataclass
class MigrateCheckpoints(beam.PTransform):
  """(src, dst) pairs -> one record per checkpoint, spread over all workers."""
  spec_text: str
  settings: Settings = Settings()

  def __post_init__(self):
    super().__init__()

  def expand(self, pairs):
    return (pairs
            | 'Fan out' >> beam.Reshuffle()
            | 'Migrate' >> beam.ParDo(MigrateFn(self.spec_text, self.settings)))


@dataclasses.dataclass
class WriteReport(beam.PTransform):
  """Records -> the run's report.jsonl and summary.json under PREFIX/_surgery
  (and the latest copies); one summary out."""
  output: str
  started_at: float
  gcs_endpoint: str | None = None
  run: str | None = None

  def __post_init__(self):
    super().__init__()

  def expand(self, records):
    return (records
            | 'Collect' >> beam.combiners.ToList()
            | 'Write' >> beam.Map(functools.partial(
                _write_report, output=self.output, started_at=self.started_at,
                gcs_endpoint=self.gcs_endpoint, run=self.run)))


def _write_report(records, output, started_at, gcs_endpoint, run):
  storage.configure(gcs_endpoint)  # on whichever worker runs this step
  return write_report(output, records, started_at, run)


# Below this many checkpoints the local runner works in the launcher's own
# process. Measured on 2 (busy) cores, a whole `ckpt-surgery run` of 35 MB
# checkpoints: in-process saves the ~2.5 s worker processes take to start
# (each imports JAX, Orbax and Beam) and to exit; worker processes, each with
# its own GIL, reader and saver, win long runs of CPU-bound checkpoints. With
# copy-through in-process drew at 32 and 64 and lost at 132; with
# copy-and-patch (I/O, which releases the GIL) it still won at 132, by more
# than at 64: so a run that will write by copy-and-patch stays in-process up
# to IN_PROCESS_MAX_PATCHING. More cores favour workers sooner (not
# measured). README, "Where a local run works".
IN_PROCESS_MAX = 64
IN_PROCESS_MAX_PATCHING = 256
IN_PROCESS_MODES = ('in_memory', 'multi_threading')


def in_process_max(spec_text: str, settings: Settings) -> int:
  """Below how many checkpoints a local run works in this process: more
  where outputs will be written by copy-and-patch (no --full_decode, no op
  that may remove data)."""
  patching = not settings.full_decode and not transforms.may_remove(transforms.load_spec(spec_text))
  return IN_PROCESS_MAX_PATCHING if patching else IN_PROCESS_MAX


def local_defaults(beam_args: list[str], checkpoints: int | None = None,
                   limit: int = IN_PROCESS_MAX) -> list[str]:
  """Quiet workers, and where the work runs unless the user said so: in this
  process, for fewer than `limit` `checkpoints`; else one worker process
  per core."""
  given = {a.split('=')[0].lstrip('-') for a in beam_args if a.startswith('--')}
  extra = []
  if 'default_sdk_harness_log_level' not in given:
    extra.append('--default_sdk_harness_log_level=ERROR')
  if 'direct_running_mode' in given:
    mode = PipelineOptions(beam_args).view_as(DirectOptions).direct_running_mode
  elif 'direct_num_workers' not in given and checkpoints is not None and checkpoints < limit:
    mode = 'in_memory'
  else:
    mode = 'multi_processing'
  if 'direct_running_mode' not in given:
    extra.append(f'--direct_running_mode={mode}')
  if 'direct_num_workers' not in given:
    # in_memory has one worker, this process: more would only warn.
    extra.append(f'--direct_num_workers={1 if mode == "in_memory" else os.cpu_count() or 1}')
  return beam_args + extra


def in_process(options: PipelineOptions) -> bool:
  """Whether a local run does its work in this very process (no workers)."""
  return options.view_as(DirectOptions).direct_running_mode in IN_PROCESS_MODES


def local_runner(options: PipelineOptions) -> fn_runner.FnApiRunner:
  """The FnApiRunner as the DirectRunner builds it: the provision info carries
  the options to the worker processes (their log level among them)."""
  encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
  return fn_runner.FnApiRunner(provision_info=fn_runner.ExtendedProvisionInfo(
      beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded)))


def make_pipeline(beam_args: list[str], checkpoints: int | None = None,
                  limit: int = IN_PROCESS_MAX) -> beam.Pipeline:
  """The pipeline for `beam_args`; on the local runner, placed by how many
  `checkpoints` it will migrate (see local_defaults)."""
  options = PipelineOptions(beam_args)
  if options.view_as(StandardOptions).runner in LOCAL_RUNNERS:
    options = PipelineOptions(local_defaults(beam_args, checkpoints, limit))
    return beam.Pipeline(runner=local_runner(options), options=options)
  logging.getLogger('apache_beam').setLevel(logging.INFO)  # job ids, console URLs
  return beam.Pipeline(options=options)


def run_migration(pairs: list[tuple[str, str]], spec_text: str, output: str,
                  settings: Settings, beam_args: list[str], wait: bool = True,
                  started_at: float | None = None, known: list[dict] = ()) -> str:
  """Run the job (or only submit it, without `wait`); its state. The report
  lands under `output`/_surgery (as run `settings.run`) when the job's last
  step runs, with `started_at` in its summary, and the `known` records
  (checkpoints skipped before the job) beside the job's own."""
  started_at = started_at or time.time()
  p = make_pipeline(beam_args, len(pairs), in_process_max(spec_text, settings))
  if isinstance(p.runner, fn_runner.FnApiRunner) and in_process(p.options):
    # The DoFn runs here: this process is the launcher, which no orphan watch may end.
    settings = dataclasses.replace(settings, launcher=os.getpid())
  if type(p.runner).__name__ == 'DaskRunner':
    # It drops what a DoFn emits from finish_bundle, where the last records of
    # a bundle come out when checkpoints overlap.
    settings = dataclasses.replace(settings, in_flight=1)
  migrated = (p
              | 'Checkpoints' >> beam.Create(pairs)
              | 'Migrate checkpoints' >> MigrateCheckpoints(spec_text, settings))
  if known:
    migrated = (migrated, p | 'Known' >> beam.Create(list(known))) | 'With known' >> beam.Flatten()
  _ = migrated | 'Report' >> WriteReport(output, started_at, settings.gcs_endpoint,
                                         settings.run or None)
  result = p.run()
  if wait:
    result.wait_until_finish()
  return str(result.state)
