"""A night at scale: N tiny checkpoints migrated, then a rerun that finds all done.

A benchmark, not a test. Makes N tiny checkpoints (CheckpointManager roots
of 10 steps each, a 3-layer MLP with Adam's moments: 17 arrays, 6 KB), then
runs `ckpt-surgery run` on them twice, as a scheduler would, in a process of
its own on the local runner with 2 worker processes: the first run
migrates every checkpoint, the second finds every one done. For each N it
prints:

- seconds per run, and ms per checkpoint beyond the run's fixed cost (its
  start, discovery, report), taken as the slope between the smallest N and
  this one: the same slope at every N means a cost linear in N;
- the workers' peak resident memory over their idle footprint (the
  report's `peak_rss_over_idle`): the same at every N means no growth per
  checkpoint;
- how many files `_surgery/` holds after each run;
- with `--gcs`, on the GCS test server (tests/gcs_server.py), the requests
  each run sent, counted at the server's proxy: per migrated and per skipped
  checkpoint, again as slopes, beside each run's total.

  python -m benchmarks.scale [--counts 1000,10000] [--repeat 1] [--gcs]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from pipeline import demo
from pipeline.storage import files

STEPS = 10  # per CheckpointManager root


def make_roots(root: str, count: int) -> str:
  """`count` checkpoints under root/in: count / STEPS CheckpointManager roots; the pattern."""
  first = f'{root}/in/run_0'
  params = {f'Dense_{i}': {'kernel': np.ones((8, 8), np.float32), 'bias': np.zeros(8, np.float32)}
            for i in range(3)}
  with ocp.CheckpointManager(epath.Path(first)) as manager:
    for step in range(STEPS):
      manager.save(step, args=ocp.args.StandardSave(
          {'params': params, 'opt_state': [{'count': np.int32(step), 'mu': params, 'nu': params}]}))
    manager.wait_until_finished()
  for i in range(1, count // STEPS):
    if files.is_gcs(root):
      bare = first.removeprefix('gs://')
      objects = files.gcs().find(bare)
      target = f'{root}/in/run_{i}'.removeprefix('gs://')
      files.gcs().copy([o for o in objects], [target + o[len(bare):] for o in objects])
    else:
      shutil.copytree(first, f'{root}/in/run_{i}')
  return f'{root}/in/*'


def surgery_files(out: str) -> int:
  return len(files.tree(epath.Path(out) / '_surgery'))


def run_once(pattern: str, out: str, spec: str, endpoint: str | None) -> tuple[float, dict]:
  """One `ckpt-surgery run`, as a scheduler starts it: (seconds, its summary)."""
  command = [sys.executable, '-m', 'pipeline', 'run', '--input', pattern, '--output', out,
             '--spec', spec, '--direct_num_workers=2', '--direct_running_mode=multi_processing']
  if endpoint:
    command.append(f'--gcs_endpoint={endpoint}')
  start = time.perf_counter()
  done = subprocess.run(command, capture_output=True, text=True)
  seconds = time.perf_counter() - start
  if done.returncode != 0:
    raise RuntimeError(f'run failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}')
  summary = json.loads((epath.Path(out) / '_surgery' / 'summary.json').read_text())
  return seconds, summary


def night(root: str, count: int, spec: str, proxy) -> dict[str, float]:
  """Make `count` checkpoints under `root`, migrate them, rerun: the figures."""
  pattern, out = make_roots(root, count), f'{root}/out'
  endpoint = proxy.url if proxy else None
  figures = {}
  for name, status in (('run', 'ok'), ('rerun', 'skipped')):
    if proxy:
      proxy.reset_counters()
    seconds, summary = run_once(pattern, out, spec, endpoint)
    assert summary[status] == count, summary
    figures[f'{name}_s'] = seconds
    figures[f'{name}_requests'] = proxy.reset_counters()['requests'] if proxy else 0
    figures[f'{name}_files'] = surgery_files(out)
    if name == 'run':
      figures['peak_rss_mb'] = summary['peak_rss_over_idle'] / 1e6
  return figures


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--counts', default='1000,10000', help='checkpoints per night, comma-separated')
  parser.add_argument('--repeat', type=int, default=1)
  parser.add_argument('--gcs', action='store_true', help='on the GCS test server (tests/gcs_server.py)')
  args = parser.parse_args(argv)
  counts = [int(c) for c in args.counts.split(',')]
  results: dict[int, list[dict[str, float]]] = {c: [] for c in counts}
  with contextlib.ExitStack() as stack:
    proxy = None
    if args.gcs:
      from tests.gcs_server import serving  # pylint: disable=g-import-not-at-top
      proxy = stack.enter_context(serving())
    work = stack.enter_context(tempfile.TemporaryDirectory())
    spec = os.path.join(work, 'spec.yaml')
    with open(spec, 'w') as f:
      f.write(demo.SEED_SPEC)  # normalizes Dense_1/kernel
    for repeat in range(args.repeat):
      for count in counts:
        if args.gcs:
          bucket = f'scale-{count}-{repeat}'
          files.gcs().mkdir(bucket)
          root = f'gs://{bucket}'
        else:
          root = os.path.join(work, f'n{count}-{repeat}')
        results[count].append(night(root, count, spec, proxy))
        print(f'  {count}: {results[count][-1]}', file=sys.stderr, flush=True)
        if not args.gcs:
          shutil.rmtree(root)
  median = {c: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for c, rs in results.items()}
  where = 'gs:// (test server)' if args.gcs else 'local disk'
  print(f'{where}; 2 worker processes; median of {args.repeat}')
  print(f'{"N":>7} {"run s":>8} {"ms/ckpt":>8} {"rerun s":>8} {"ms/skip":>8} '
        f'{"peak RSS MB":>11} {"_surgery files":>15}' + ('  requests: run, /ckpt, rerun, /skip'
                                                         if args.gcs else ''))
  small = median[counts[0]]
  for count in counts:
    m = median[count]
    extra = count - counts[0]
    slope = lambda key: (m[key] - small[key]) / extra if extra else float('nan')  # pylint: disable=cell-var-from-loop
    line = (f'{count:>7} {m["run_s"]:8.1f} {slope("run_s") * 1000:8.2f} {m["rerun_s"]:8.1f} '
            f'{slope("rerun_s") * 1000:8.2f} {m["peak_rss_mb"]:11.1f} '
            f'{m["run_files"]:>7.0f} {m["rerun_files"]:>7.0f}')
    if args.gcs:
      line += (f'  {m["run_requests"]:.0f}, {slope("run_requests"):.1f}, '
               f'{m["rerun_requests"]:.0f}, {slope("rerun_requests"):.2f}')
    print(line)


if __name__ == '__main__':
  with contextlib.suppress(KeyboardInterrupt):
    main()
