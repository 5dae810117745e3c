"""deploy/ without a cloud: the template, the image and the Dataflow job agree
with the code, and the pipeline builds for Dataflow (pickling included)."""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import re

from apache_beam.options import pipeline_options
from etils import epath

from pipeline import cli
from pipeline.demo import SEED_SPEC
from tests.test_cli import cli as run_cli

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEPLOY = os.path.join(REPO, 'deploy')
LAUNCHER_ONLY = {'detach'}  # the flex template's launcher always submits and exits


def template_parameters() -> set[str]:
  with open(os.path.join(DEPLOY, 'flex_template', 'metadata.json')) as f:
    return {p['name'] for p in json.load(f)['parameters']}


def beam_flags() -> set[str]:
  parser = pipeline_options._BeamArgumentParser(allow_abbrev=False)  # pylint: disable=protected-access
  for cls in {str(c): c for c in pipeline_options.PipelineOptions.__subclasses__()}.values():
    cls._add_argparse_args(parser)  # pylint: disable=protected-access
  return {s.lstrip('-') for s in parser._option_string_actions}  # pylint: disable=protected-access


def test_template_parameters_are_the_cli_options():
  """Fails when an option is added to the CLI or to the template alone."""
  ours = set(cli.run_arguments()) - LAUNCHER_ONLY
  params = template_parameters()
  assert ours - params == set(), 'CLI options missing from deploy/flex_template/metadata.json'
  extra = params - ours
  assert extra <= beam_flags(), f'template parameters that are neither ours nor Beam options: {extra - beam_flags()}'


def test_the_image_runs_the_pinned_beam():
  with open(os.path.join(REPO, 'pyproject.toml')) as f:
    pinned = re.search(r'"apache-beam\[[^\]]*\]==([^"]+)"', f.read()).group(1)
  with open(os.path.join(DEPLOY, 'Dockerfile')) as f:
    dockerfile = f.read()
  assert re.search(r'^ARG BEAM_VERSION=(\S+)$', dockerfile, re.M).group(1) == pinned
  assert 'FROM apache/beam_python3.12_sdk:${BEAM_VERSION}' in dockerfile
  assert 'apache-beam[gcp,dask]==${BEAM_VERSION}' in dockerfile
  assert 'XLA_PYTHON_CLIENT_PREALLOCATE=false' in dockerfile


def test_flex_template_arguments_become_the_cli_run():
  spec = importlib.util.spec_from_file_location('flex_main', os.path.join(DEPLOY, 'flex_template', 'main.py'))
  flex_main = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(flex_main)
  assert flex_main.to_cli(['--input=gs://a/*', '--overwrite=true', '--allow_nonfinite=false',
                           '--runner=DataflowRunner']) == [
      'run', '--detach', '--input=gs://a/*', '--overwrite', '--runner=DataflowRunner']


def test_schedules_launch_the_template_with_its_own_parameters():
  with open(os.path.join(DEPLOY, 'schedule', 'airflow_dag.py')) as f:
    dag = ast.parse(f.read())
  used = next(ast.literal_eval(n.value) for n in ast.walk(dag)
              if isinstance(n, ast.Assign) and getattr(n.targets[0], 'id', '') == 'PARAMETERS')
  assert set(used) <= template_parameters()
  with open(os.path.join(DEPLOY, 'schedule', 'cloud_scheduler.sh')) as f:
    body = f.read()
  parameters = re.search(r'"parameters": \{([^}]*)\}', body).group(1)
  assert set(re.findall(r'"(\w+)":', parameters)) == set(used)
  assert 'flexTemplates:launch' in body and '0 2 * * *' in body


def test_the_pipeline_builds_for_dataflow_without_submitting(gcs, gcs_samples, bucket):
  """DataflowRunner with --dry_run builds the whole job (every DoFn pickled)
  and stops before staging or submitting; storage is the GCS emulator."""
  spec = epath.Path(bucket) / 'spec.yaml'
  spec.write_text(SEED_SPEC + "  - python: {fn: 'tests.fix_heads:double_bias'}\n")
  result = run_cli('run', '--input', gcs_samples + '/*', '--output', bucket + '/v2', '--spec', spec,
                   '--runner=DataflowRunner', '--project=test-project', '--region=us-central1',
                   f'--temp_location={bucket}/tmp', '--sdk_container_image=example.com/ckpt-surgery:test',
                   '--experiments=use_runner_v2,no_use_multiple_sdk_containers',
                   '--dataflow_service_options=worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver',
                   '--dry_run=True')
  assert result.returncode == 0, result.stdout + result.stderr
  assert f'job DONE; its report will be at {bucket}/v2/_surgery/runs/' in result.stdout
  assert not epath.Path(bucket + '/v2').exists()  # nothing ran, nothing written
