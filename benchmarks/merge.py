"""Merge: `ckpt-surgery run` of a mean of the last K steps against the loop users write.

A benchmark, not a test. For each input shape it writes one CheckpointManager
run of K steps, each about `--mb` MB ({params, opt_state (Adam, moments not
zeros), step}), and times, alternating, each as a whole process:
  loop   the by-hand merge: restore all K steps, `jax.tree.map` their mean
         over params, save it with the newest's optimizer state
  ours   `ckpt-surgery run` of `merge: {group: run, take: {last: K}}`: the
         newest step patched, params read an input at a time into sums
  rerun  the same again, which finds the merge done: ours's fixed cost
         (start-up, discovery, the skip's proof, the report), its floor
Two shapes: `few_large` (four kernels of about 2.7 MB) and `many_small`
(700 leaves of 16 KB). It prints, per shape and K, the median wall seconds
of `--repeat` runs, loop/ours, the work alone (the loop after its imports,
which it times itself; ours less its rerun) and each one's peak RSS over
its idle footprint (ours from summary.json; the loop's measured the same
way, after its imports); and writes JSON.

  python -m benchmarks.merge [--k 2,8] [--mb 32] [--repeat 3] [--json out.json]

The target: ours faster than the loop, and a peak that does not grow with K.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

SHAPES = {'few_large': (4, (768, 896)), 'many_small': (700, (64, 64))}  # leaves, shape

LOOP = r'''
import resource, sys, time
import jax, jax.numpy as jnp, orbax.checkpoint as ocp
from etils import epath
root, out, k = epath.Path(sys.argv[1]), epath.Path(sys.argv[2]), int(sys.argv[3])
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
jnp.zeros(1).block_until_ready()
idle, start = peak(), time.perf_counter()
with ocp.CheckpointManager(root) as manager:
  steps = manager.all_steps()[-k:]
  states = [manager.restore(s, args=ocp.args.StandardRestore()) for s in steps]
mean = jax.tree.map(lambda *xs: sum(xs) / len(xs), *[s['params'] for s in states])
checkpointer = ocp.StandardCheckpointer()
checkpointer.save(out, {'params': mean, 'opt_state': states[-1]['opt_state'],
                        'step': states[-1]['step']})
checkpointer.wait_until_finished()
print(peak() - idle, time.perf_counter() - start)
'''


def make_run(root: str, k: int, leaves: int, shape: tuple[int, int]) -> None:
  """A CheckpointManager run of k steps of one shape (in a process of its own:
  a child's peak RSS starts from its parent's at the fork)."""
  code = f'''
import numpy as np, optax, orbax.checkpoint as ocp, jax
from etils import epath
with ocp.CheckpointManager(epath.Path({root!r})) as manager:
  for step in range(1, {k} + 1):
    rng = np.random.default_rng(step)
    params = {{f'layer_{{i}}': {{'kernel': rng.normal(size={shape!r}).astype(np.float32)}}
              for i in range({leaves})}}
    tx = optax.adam(1e-3)
    grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
    _, opt_state = tx.update(grads, tx.init(params), params)
    manager.save(step, args=ocp.args.StandardSave(
        {{'params': params, 'opt_state': opt_state, 'step': step}}))
'''
  subprocess.run([sys.executable, '-c', code], check=True, capture_output=True)


def ours(root: str, out: str, spec: str) -> tuple[float, int, float]:
  """(seconds, peak RSS over idle, seconds of the rerun that skips it)."""
  times = []
  for _ in range(2):
    start = time.perf_counter()
    result = subprocess.run([sys.executable, '-m', 'pipeline', 'run', '--input', root, '--output',
                             out, '--spec', spec], capture_output=True, text=True)
    times.append(time.perf_counter() - start)
    if result.returncode:
      raise RuntimeError(f'ckpt-surgery failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}')
    if not times[1:]:
      with open(os.path.join(out, '_surgery', 'summary.json')) as f:
        peak = json.load(f)['peak_rss_over_idle']
  return times[0], peak, times[1]


def loop(root: str, out: str, k: int) -> tuple[float, int, float]:
  """(seconds, peak RSS over idle, seconds after its imports)."""
  start = time.perf_counter()
  result = subprocess.run([sys.executable, '-c', LOOP, root, out, str(k)], capture_output=True,
                          text=True)
  seconds = time.perf_counter() - start
  if result.returncode:
    raise RuntimeError(f'the loop failed:\n{result.stderr[-3000:]}')
  peak, after_imports = result.stdout.split()[-2:]
  return seconds, int(peak), float(after_imports)


def bench(shape_name: str, k: int, mb: float, repeat: int, work: str) -> dict:
  leaves, shape = SHAPES[shape_name]
  scale = mb / (3 * leaves * shape[0] * shape[1] * 4 / 1e6)  # params and two moments
  shape = (max(1, round(shape[0] * scale)), shape[1])
  root = os.path.join(work, f'{shape_name}_{k}')
  make_run(root, k, leaves, shape)
  spec = os.path.join(work, 'merge.yaml')
  with open(spec, 'w') as f:
    f.write(f'merge: {{group: run, take: {{last: {k}}}}}\n')
  runs = {'loop': [], 'ours': []}
  for r in range(repeat):
    for name in (('loop', 'ours') if r % 2 == 0 else ('ours', 'loop')):  # alternate
      out = os.path.join(work, 'out')
      shutil.rmtree(out, ignore_errors=True)
      runs[name].append(loop(root, out, k) if name == 'loop' else ours(root, out, spec))
  shutil.rmtree(root)
  seconds = {n: statistics.median(s for s, _, _ in rs) for n, rs in runs.items()}
  work = {'loop': statistics.median(w for _, _, w in runs['loop']),
          'ours': statistics.median(s - rerun for s, _, rerun in runs['ours'])}
  mb_each = round(3 * leaves * shape[0] * shape[1] * 4 / 1e6, 1)
  return {'shape': shape_name, 'k': k, 'checkpoint_mb': mb_each, 'leaves': leaves,
          'seconds': seconds, 'loop_over_ours': seconds['loop'] / seconds['ours'],
          'work_seconds': work, 'work_loop_over_ours': work['loop'] / work['ours'],
          'peak_rss_over_idle': {n: max(p for _, p, _ in rs) for n, rs in runs.items()},
          'repeat': repeat}


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--k', default='2,8', help='steps merged, a comma-separated list')
  parser.add_argument('--mb', type=float, default=32.0, help='each checkpoint, MB')
  parser.add_argument('--repeat', type=int, default=3)
  parser.add_argument('--json')
  args = parser.parse_args(argv)
  rows = []
  with tempfile.TemporaryDirectory(dir=os.environ.get('BENCH_DIR')) as work:
    for shape in SHAPES:
      for k in (int(k) for k in args.k.split(',') if k):
        rows.append(bench(shape, k, args.mb, args.repeat, work))
  mb = lambda n: f'{n / 1e6:.0f}'
  print(f"{'shape':>10} {'K':>2} {'MB each':>7} {'loop s':>6} {'ours s':>6} {'loop/ours':>9}  "
        f"{'work s: loop':>12} {'ours':>5} {'loop/ours':>9}  {'peak over idle, MB: loop':>24} "
        f"{'ours':>5}")
  for r in rows:
    s, w, p = r['seconds'], r['work_seconds'], r['peak_rss_over_idle']
    print(f"{r['shape']:>10} {r['k']:>2} {r['checkpoint_mb']:>7} {s['loop']:>6.2f} "
          f"{s['ours']:>6.2f} {r['loop_over_ours']:>9.2f}  {w['loop']:>12.2f} {w['ours']:>5.2f} "
          f"{r['work_loop_over_ours']:>9.2f}  {mb(p['loop']):>24} {mb(p['ours']):>5}")
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(rows, f, indent=2)
  return rows


if __name__ == '__main__':
  main()
