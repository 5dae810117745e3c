"""Where the local runner does the work, and the same `ckpt-surgery run` on
Beam's portable path and on Dask, for real.

Fixtures start the services as separate processes, as a cluster would run
them: a Beam job service and an EXTERNAL worker pool (how Flink and Spark
run Python), and a Dask scheduler with two worker processes. The spec
includes a user's `python:` op, so user code crosses the process boundary
the way a cluster carries it (installed where the workers run).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from apache_beam.options.pipeline_options import DirectOptions

from pipeline import migrate, report
from pipeline import run as run_lib
from pipeline.demo import SEED_SPEC
from tests.gcs_server import free_port
from tests.test_cli import cli

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPEC = """\
ops:
  - normalize: {match: '^Dense_1/kernel$'}
  - python: {fn: 'tests.fix_heads:double_bias'}
"""


def placed(args: list[str], checkpoints: int | None) -> tuple[str, int]:
  """(running mode, workers) of the local runner for `args` and that many checkpoints."""
  options = run_lib.make_pipeline(args, checkpoints).options.view_as(DirectOptions)
  return options.direct_running_mode, options.direct_num_workers


CORES = os.cpu_count() or 1
FEW, MANY = run_lib.IN_PROCESS_MAX - 1, run_lib.IN_PROCESS_MAX


@pytest.mark.parametrize('args, checkpoints, expected', [
    ([], 1, ('in_memory', 1)),
    ([], FEW, ('in_memory', 1)),
    ([], MANY, ('multi_processing', CORES)),
    ([], None, ('multi_processing', CORES)),  # a caller that does not say: as before
    (['--runner=DirectRunner'], FEW, ('in_memory', 1)),
    # The user's flags win, either one of them.
    (['--direct_num_workers=2'], FEW, ('multi_processing', 2)),
    (['--direct_num_workers', '2'], FEW, ('multi_processing', 2)),
    (['--direct_running_mode=multi_processing'], FEW, ('multi_processing', CORES)),
    (['--direct_running_mode=in_memory'], MANY, ('in_memory', 1)),
    (['--direct_running_mode=multi_threading'], FEW, ('multi_threading', CORES)),
    (['--direct_running_mode=multi_threading', '--direct_num_workers=3'], MANY, ('multi_threading', 3)),
])
def test_the_local_runner_works_in_process_for_few_checkpoints(args, checkpoints, expected):
  assert placed(args, checkpoints) == expected


def test_runs_that_will_patch_stay_in_process_longer():
  """Copy-and-patch is I/O: a spec that cannot remove data stays in this
  process up to IN_PROCESS_MAX_PATCHING checkpoints; one that may (or
  --full_decode) moves to workers from IN_PROCESS_MAX."""
  rename = "ops: [{rename: {match: '^a/', to: 'b/'}}, {normalize: {match: 'kernel$'}}]"
  drop = "ops: [{drop: {match: '^a/'}}]"
  assert run_lib.in_process_max(rename, migrate.Settings()) == run_lib.IN_PROCESS_MAX_PATCHING
  assert run_lib.in_process_max(rename, migrate.Settings(full_decode=True)) == run_lib.IN_PROCESS_MAX
  assert run_lib.in_process_max(drop, migrate.Settings()) == run_lib.IN_PROCESS_MAX
  limit = run_lib.IN_PROCESS_MAX_PATCHING
  mode = lambda n: run_lib.make_pipeline([], n, limit).options.view_as(DirectOptions).direct_running_mode
  assert (mode(limit - 1), mode(limit)) == ('in_memory', 'multi_processing')


def test_an_in_process_run_migrates_here_without_watching_for_orphans(inputs, tmp_path, monkeypatch):
  """No worker process: the records are this process's, and the DoFn's setup
  (run here, though Settings does not name this process the launcher) starts
  no orphan watch that would end it."""
  for attr, value in (('handlers', []), ('level', migrate.log.level),
                      ('propagate', migrate.log.propagate)):
    monkeypatch.setattr(migrate.log, attr, value)  # setup's progress handler, undone after
  out, run = str(tmp_path / 'out'), 'r1'
  watches = lambda: sum(t.name == 'orphan-watch' for t in threading.enumerate())
  before = watches()  # an earlier test's DoFn, set up in this process, may have left one
  pairs = [(str(inputs / n), str(tmp_path / 'out' / n)) for n in ('run_b', 'run_c')]
  state = run_lib.run_migration(pairs, SEED_SPEC, out, migrate.Settings(output=out, run=run), [])
  assert state == 'DONE'
  records, summary = report.read_report(out, run)
  assert [r['status'] for r in records] == ['ok', 'ok'] and summary['ok'] == 2
  assert {r['worker'] for r in records} == {f'{socket.gethostname()}:{os.getpid()}'}
  assert watches() == before


def worker_env() -> dict[str, str]:
  """Workers run the `python` first on PATH, with the user's code importable."""
  return {**os.environ, 'PATH': os.path.dirname(sys.executable) + os.pathsep + os.environ['PATH'],
          'PYTHONPATH': REPO}


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 60) -> None:
  import socket  # pylint: disable=g-import-not-at-top
  deadline = time.time() + timeout
  while time.time() < deadline:
    if process.poll() is not None:
      raise RuntimeError(f'{process.args} exited with {process.returncode}')
    with socket.socket() as s:
      if s.connect_ex(('127.0.0.1', port)) == 0:
        return
    time.sleep(0.2)
  raise RuntimeError(f'{process.args} did not listen on {port}')


def start(args: list[str], port: int) -> subprocess.Popen:
  process = subprocess.Popen(args, env=worker_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
  wait_for_port(port, process)
  return process


def stop(*processes: subprocess.Popen) -> None:
  for process in processes:
    os.killpg(process.pid, 9)
    process.wait()


@pytest.fixture(scope='module')
def portable():
  """A job service and an EXTERNAL worker pool: the Beam options that use them."""
  job_port, pool_port = free_port(), free_port()
  job = start([sys.executable, '-m', 'apache_beam.runners.portability.local_job_service_main',
               f'--port={job_port}'], job_port)
  pool = start([sys.executable, '-m', 'apache_beam.runners.worker.worker_pool_main',
                f'--service_port={pool_port}'], pool_port)
  yield ['--runner=PortableRunner', f'--job_endpoint=localhost:{job_port}',
         '--environment_type=EXTERNAL', f'--environment_config=localhost:{pool_port}']
  stop(job, pool)


@pytest.fixture(scope='module')
def dask_cluster():
  """A Dask scheduler and two single-threaded worker processes."""
  bin_dir = os.path.dirname(sys.executable)
  port = free_port()
  scheduler = start([os.path.join(bin_dir, 'dask'), 'scheduler', '--host', '127.0.0.1',
                     f'--port={port}', '--no-dashboard'], port)
  workers = subprocess.Popen(
      [os.path.join(bin_dir, 'dask'), 'worker', f'tcp://127.0.0.1:{port}', '--nworkers', '2',
       '--nthreads', '1', '--no-dashboard'],
      env=worker_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
      start_new_session=True)
  from distributed import Client  # pylint: disable=g-import-not-at-top
  with Client(f'tcp://127.0.0.1:{port}', timeout=60) as client:
    client.wait_for_workers(2, timeout=60)
  yield ['--runner=apache_beam.runners.dask.dask_runner.DaskRunner',
         f'--dask_client_address=tcp://127.0.0.1:{port}', '--dask_npartitions=6']
  stop(scheduler, workers)


def run_on(runner_args, inputs, tmp_path):
  spec = tmp_path / 'spec.yaml'
  spec.write_text(SPEC)
  out = tmp_path / 'out'
  result = cli('run', '--input', inputs / '*', '--output', out, '--spec', spec, *runner_args)
  assert result.returncode == 0, result.stdout + result.stderr
  records = [json.loads(l) for l in (out / '_surgery' / 'report.jsonl').read_text().splitlines()]
  assert [r['status'] for r in records] == ['ok'] * 6
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  before = ocp.PyTreeCheckpointer().restore(inputs / 'run_b')
  after = ocp.PyTreeCheckpointer().restore(out / 'run_b')
  np.testing.assert_array_equal(after['params']['Dense_0']['bias'], before['params']['Dense_0']['bias'] * 2)
  return records


def test_portable_runner_as_flink_and_spark_use_it(portable, inputs, tmp_path):
  records = run_on(portable, inputs, tmp_path)
  # Beam's local job service runs its FnApiRunner with one SDK worker (it
  # never reads --direct_num_workers); on Flink or Spark the cluster sets
  # the parallelism. What this proves: the work ran in the pool's process.
  assert all(r['worker'].rsplit(':', 1)[1] != str(os.getpid()) for r in records)


def test_dask_spreads_the_work_over_its_workers(dask_cluster, inputs, tmp_path):
  records = run_on(dask_cluster, inputs, tmp_path)
  assert len({r['worker'] for r in records}) == 2


def test_dask_merges_a_group_per_unit_of_work(dask_cluster, tmp_path):
  """A merge spec on Dask: each run's group is one element, merged on a
  worker, the same bits as the reference."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  from tests.test_merge_run import _state, reference, restored, same_bits, save_run  # pylint: disable=g-import-not-at-top
  for name in ('run_a', 'run_b', 'run_c'):
    save_run(epath.Path(tmp_path / 'in' / name), [1, 2])
  spec = tmp_path / 'merge.yaml'
  spec.write_text('merge: {group: run, take: {last: 2}, method: ema, decay: 0.5}\n')
  out = tmp_path / 'out'
  result = cli('run', '--input', tmp_path / 'in' / '*', '--output', out, '--spec', spec,
               *dask_cluster)
  assert result.returncode == 0, result.stdout + result.stderr
  records = [json.loads(l) for l in (out / '_surgery' / 'report.jsonl').read_text().splitlines()]
  assert sorted(r['dst'].rsplit('/', 2)[-2] for r in records) == ['run_a', 'run_b', 'run_c']
  assert {r['status'] for r in records} == {'ok'}
  assert all(r['worker'].rsplit(':', 1)[1] != str(os.getpid()) for r in records)
  same_bits(restored(out / 'run_b' / 'merged_ema_last2_2')['params'],
            reference([_state(1)['params'], _state(2)['params']], [0.5, 0.5]))
