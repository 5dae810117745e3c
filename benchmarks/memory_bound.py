"""Memory bound: a worker's peak memory, streamed under a budget and not, as checkpoints grow.

A benchmark, not a test. For each size it writes one transformer-like
checkpoint (width-1024 layers, Adam moments that are NOT zeros) and runs,
each as a whole process (`ckpt-surgery run`, one checkpoint: the launcher's
own process is the worker), two surgeries that rewrite every leaf:
  cast   every leaf to bfloat16, the moments too (opt_state: follow)
  full   a rename, with --full_decode
each twice: under `--memory_budget` (streamed: a pack of dependency groups
at a time) and unbounded (a budget larger than the checkpoint: the whole
state held at once). It prints a table and writes JSON: wall seconds and
the worker's peak RSS over its idle footprint (summary.json's
peak_rss_over_idle), streamed/unbounded time, and that peak over the budget.

  python -m benchmarks.memory_bound [--sizes 0.5,1,2,4] [--budget 512MB] [--repeat 1] [--json out.json]

The goal: streamed peaks stay flat from the smallest size to the largest
(within the budget plus 300 MB), at no more than 1.2x the unbounded time.
Sizes whose unbounded run would not fit this machine's memory (3.5x the
checkpoint, and more) run streamed only.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks.surgery_speed import disk_bytes
from pipeline.cli import size_in_bytes

WIDTH = 1024
LAYER_BYTES = 3 * 4 * 12 * WIDTH * WIDTH  # params and two moments of a layer's 12 W^2 floats
SPECS = {
    'cast': ("ops: [{cast: {match: '.*', dtype: bfloat16, opt_state: follow}}]\n", []),
    'full': ("ops: [{rename: {match: '^layer_0/', to: 'first/'}}]\n", ['--full_decode']),
}
UNBOUNDED = 1 << 40


def run(src: str, out: str, spec: str, flags: list[str], budget: int) -> dict:
  """One whole `ckpt-surgery run`: wall seconds and the worker's peak RSS over idle."""
  shutil.rmtree(out, ignore_errors=True)
  start = time.perf_counter()
  result = subprocess.run(
      [sys.executable, '-m', 'pipeline', 'run', '--input', src, '--output', out, '--spec', spec,
       '--memory_budget', str(budget), *flags], capture_output=True, text=True)
  seconds = time.perf_counter() - start
  if result.returncode:
    raise RuntimeError(f'ckpt-surgery failed:\n{result.stderr[-3000:]}')
  with open(os.path.join(out, '_surgery', 'summary.json')) as f:
    summary = json.load(f)
  with open(os.path.join(out, '_surgery', 'report.jsonl')) as f:
    (record,) = [json.loads(line) for line in f]
  shutil.rmtree(out, ignore_errors=True)
  return {'seconds': seconds, 'peak_rss_over_idle': summary['peak_rss_over_idle'],
          'packs': record['packs']}


def memory_bytes() -> int:
  return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')


def bench(size_gb: float, budget: int, repeat: int, work: str) -> list[dict]:
  layers = max(1, round(size_gb * 1e9 / LAYER_BYTES))
  src = os.path.join(work, f'in_{size_gb}')
  # In a process of its own: a child's peak RSS starts from its parent's at the fork (Linux).
  subprocess.run([sys.executable, '-c', f'from benchmarks.surgery_speed import make_inputs; '
                  f'make_inputs({src!r}, 1, {layers}, {WIDTH})'], check=True)
  (checkpoint,) = [os.path.join(src, n) for n in os.listdir(src)]
  nbytes = disk_bytes(src)
  rows = []
  for name, (text, flags) in SPECS.items():
    spec = os.path.join(work, f'{name}.yaml')
    with open(spec, 'w') as f:
      f.write(text)
    modes = {'streamed': budget}
    if 4 * nbytes < memory_bytes():
      modes['unbounded'] = UNBOUNDED
    results = {mode: [] for mode in modes}
    for r in range(repeat):
      for mode in (list(modes) if r % 2 == 0 else list(reversed(modes))):  # alternate
        results[mode].append(run(checkpoint, os.path.join(work, 'out'), spec, flags, modes[mode]))
    # The run of median time (best-of flatters).
    median = {mode: sorted(rs, key=lambda x: x['seconds'])[len(rs) // 2] for mode, rs in results.items()}
    peak = {mode: max(x['peak_rss_over_idle'] for x in rs) for mode, rs in results.items()}
    row = {'size_gb': size_gb, 'bytes': nbytes, 'surgery': name, 'budget': budget,
           'seconds': {m: b['seconds'] for m, b in median.items()},
           'peak_rss_over_idle': peak, 'packs': median['streamed']['packs'],
           'peak_over_budget': peak['streamed'] / budget}
    if 'unbounded' in median:
      row['streamed_over_unbounded'] = median['streamed']['seconds'] / median['unbounded']['seconds']
    rows.append(row)
  shutil.rmtree(src)
  return rows


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sizes', default='0.5,1,2,4', help='checkpoint sizes, GB')
  parser.add_argument('--budget', type=size_in_bytes, default='512MB')
  parser.add_argument('--repeat', type=int, default=1)
  parser.add_argument('--json')
  args = parser.parse_args(argv)
  budget = args.budget
  rows = []
  with tempfile.TemporaryDirectory(dir=os.environ.get('BENCH_DIR')) as work:
    for size in (float(s) for s in args.sizes.split(',') if s):
      rows += bench(size, budget, args.repeat, work)
  gb = lambda n: f'{n / 1e9:.2f}'
  print(f"{'GB':>5} {'surgery':>7} {'packs':>5} {'unbounded s':>11} {'streamed s':>10} "
        f"{'ratio':>5}  {'peak over idle, GB: unbounded':>29} {'streamed':>8} {'streamed/budget':>15}")
  for r in rows:
    s, p = r['seconds'], r['peak_rss_over_idle']
    print(f"{r['bytes'] / 1e9:>5.2f} {r['surgery']:>7} {r['packs']:>5} "
          f"{s.get('unbounded', float('nan')):>11.2f} {s['streamed']:>10.2f} "
          f"{r.get('streamed_over_unbounded', float('nan')):>5.2f}  "
          f"{gb(p['unbounded']) if 'unbounded' in p else '-':>29} {gb(p['streamed']):>8} "
          f"{r['peak_over_budget']:>15.2f}")
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(rows, f, indent=2)
  return rows


if __name__ == '__main__':
  main()
