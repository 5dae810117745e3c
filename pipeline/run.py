"""The Beam pipeline: pairs -> fan out -> migrate -> report.

The default runner is Beam's local batch engine (the FnApiRunner behind the
DirectRunner) in multi-processing mode, one worker process per core. We name
it directly: the DirectRunner would first try the Prism runner, which
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
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.portability.api import beam_provision_api_pb2
from apache_beam.runners.portability.fn_api_runner import fn_runner
from apache_beam.runners.portability.portable_runner import JobServiceHandle

from pipeline import storage
from pipeline.migrate import MigrateFn, Settings
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


def local_defaults(beam_args: list[str]) -> list[str]:
  """Multi-processing, one worker per core, quiet workers, unless the user said otherwise."""
  given = {a.split('=')[0].lstrip('-') for a in beam_args if a.startswith('--')}
  extra = []
  if 'default_sdk_harness_log_level' not in given:
    extra.append('--default_sdk_harness_log_level=ERROR')
  if 'direct_running_mode' not in given:
    extra.append('--direct_running_mode=multi_processing')
  if 'direct_num_workers' not in given:
    extra.append(f'--direct_num_workers={os.cpu_count() or 1}')
  return beam_args + extra


def local_runner(options: PipelineOptions) -> fn_runner.FnApiRunner:
  """The FnApiRunner as the DirectRunner builds it: the provision info carries
  the options to the worker processes (their log level among them)."""
  encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
  return fn_runner.FnApiRunner(provision_info=fn_runner.ExtendedProvisionInfo(
      beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded)))


def make_pipeline(beam_args: list[str]) -> beam.Pipeline:
  options = PipelineOptions(beam_args)
  if options.view_as(StandardOptions).runner in LOCAL_RUNNERS:
    options = PipelineOptions(local_defaults(beam_args))
    return beam.Pipeline(runner=local_runner(options), options=options)
  logging.getLogger('apache_beam').setLevel(logging.INFO)  # job ids, console URLs
  return beam.Pipeline(options=options)


def run_migration(pairs: list[tuple[str, str]], spec_text: str, output: str,
                  settings: Settings, beam_args: list[str], wait: bool = True,
                  started_at: float | None = None) -> str:
  """Run the job (or only submit it, without `wait`); its state. The report
  lands under `output`/_surgery (as run `settings.run`) when the job's last
  step runs, with `started_at` in its summary."""
  started_at = started_at or time.time()
  p = make_pipeline(beam_args)
  if type(p.runner).__name__ == 'DaskRunner':
    # It drops what a DoFn emits from finish_bundle, where the last records of
    # a bundle come out when checkpoints overlap.
    settings = dataclasses.replace(settings, in_flight=1)
  _ = (p
       | 'Checkpoints' >> beam.Create(pairs)
       | 'Migrate checkpoints' >> MigrateCheckpoints(spec_text, settings)
       | 'Report' >> WriteReport(output, started_at, settings.gcs_endpoint, settings.run or None))
  result = p.run()
  if wait:
    result.wait_until_finish()
  return str(result.state)
