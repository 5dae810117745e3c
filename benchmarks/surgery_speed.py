"""Surgery speed: a floor, a baseline and ckpt-surgery, each as a whole process.

A benchmark, not a test. It writes N transformer-like checkpoints (embedding,
attention and MLP kernels, layer norms; Adam moments that are NOT zeros,
since zeros compress and flatter every reader), then times, alternating,
each as a whole process:
  floor     `cp -r` of the input tree
  baseline  the seed's loop, as a user writes it from the Flax guide: one
            process restoring, flattening, normalizing one kernel,
            unflattening and saving each checkpoint in turn
  ours      `ckpt-surgery run` with the same surgery (local runner: in-process
            below IN_PROCESS_MAX checkpoints, else worker processes); the
            untouched ~94% of the bytes are copied through
  full      the same with --full_decode: every leaf restored, moved through
            the device and re-encoded
It prints a table and writes JSON: wall seconds, bytes on disk, peak RSS of
the whole process tree, the workers' peak RSS over their idle footprint (from
summary.json), ours/floor, baseline/ours and baseline/full.

  python -m benchmarks.surgery_speed --counts 8,32,128 [--big] [--repeat 2] [--json out.json]

--big adds one checkpoint of about 1 GB (wider, deeper layers).
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

import numpy as np

# Normalizes the first layer's two MLP kernels: ~6% of the bytes (params and Adam moments).
SPEC = "ops:\n  - normalize: {match: '^layer_0/mlp/kernel_(in|out)$'}\n"

SEED_LOOP = r'''
import sys, os
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import traverse_util
src, dst = sys.argv[1], sys.argv[2]
checkpointer = ocp.PyTreeCheckpointer()
for name in sorted(os.listdir(src)):
  state = checkpointer.restore(os.path.join(src, name))
  flat = traverse_util.flatten_dict(state['params'], sep='/')
  for path in ('layer_0/mlp/kernel_in', 'layer_0/mlp/kernel_out'):
    flat[path] = flat[path] / jnp.linalg.norm(flat[path])
  state['params'] = traverse_util.unflatten_dict(flat, sep='/')
  checkpointer.save(os.path.join(dst, name), state)
'''


def transformer_params(rng, layers: int, width: int = 256, vocab: int = 2048):
  def dense(*shape):
    return (rng.standard_normal(shape, np.float32) / np.sqrt(shape[0])).astype(np.float32)
  params = {'embed': {'table': dense(vocab, width)}}
  for i in range(layers):
    params[f'layer_{i}'] = {
        'attention': {n: dense(width, width) for n in ('query', 'key', 'value', 'out')},
        'mlp': {'kernel_in': dense(width, 4 * width), 'kernel_out': dense(4 * width, width)},
        'norm': {'scale': np.ones(width, np.float32), 'bias': np.zeros(width, np.float32)},
    }
  return params


def make_inputs(root: str, count: int, layers: int, width: int = 256) -> None:
  """`count` checkpoints {params, opt_state (Adam, moments not zeros), step}."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  params = transformer_params(rng, layers, width)
  tx = optax.adam(1e-3)
  checkpointer = ocp.PyTreeCheckpointer()
  for i in range(count):
    state = tx.init(params)
    noisy = lambda x: x + rng.standard_normal(x.shape).astype(x.dtype) * 1e-3  # pylint: disable=cell-var-from-loop
    opt_state = (state[0]._replace(mu=jax.tree.map(noisy, state[0].mu),
                                   nu=jax.tree.map(lambda x: np.abs(noisy(x)), state[0].nu)),) + state[1:]
    checkpointer.save(os.path.join(root, f'ckpt_{i:04d}'),
                      {'params': params, 'opt_state': opt_state, 'step': i})


def timed(cmd: list[str]) -> tuple[float, int]:
  """(wall seconds, peak RSS in bytes of the process and the children it waited for)."""
  start = time.perf_counter()
  result = subprocess.run(['/usr/bin/time', '-f', '%M', *cmd], capture_output=True, text=True)
  seconds = time.perf_counter() - start
  if result.returncode:
    raise RuntimeError(f'{cmd[:4]} failed:\n{result.stderr[-2000:]}')
  return seconds, int(result.stderr.strip().splitlines()[-1]) * 1024


def disk_bytes(root: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)


def bench(count: int, layers: int, width: int, repeat: int, work: str) -> dict:
  src = os.path.join(work, f'in_{count}_{width}')
  make_inputs(src, count, layers, width)
  spec = os.path.join(work, 'spec.yaml')
  with open(spec, 'w') as f:
    f.write(SPEC)
  ours = lambda *flags: lambda out: [sys.executable, '-m', 'pipeline', 'run', '--input', src + '/*',
                                     '--output', out, '--spec', spec, *flags]
  runs = {
      'floor': lambda out: ['cp', '-r', src, out],
      'baseline': lambda out: [sys.executable, '-c', SEED_LOOP, src, out],
      'ours': ours(),
      'full': ours('--full_decode'),
  }
  times = {k: [] for k in runs}
  rss = {k: 0 for k in runs}
  worker_rss = {'ours': 0, 'full': 0}
  for r in range(repeat):
    order = list(runs) if r % 2 == 0 else list(reversed(runs))  # alternate
    for name in order:
      out = os.path.join(work, f'out_{name}')
      shutil.rmtree(out, ignore_errors=True)
      if name == 'baseline':
        os.makedirs(out)
      seconds, peak = timed(runs[name](out))
      times[name].append(seconds)
      rss[name] = max(rss[name], peak)
      if name in worker_rss:
        with open(os.path.join(out, '_surgery', 'summary.json')) as f:
          summary = json.load(f)
        assert summary['ok'] == count, summary
        worker_rss[name] = max(worker_rss[name], summary['peak_rss_over_idle'])
      shutil.rmtree(out, ignore_errors=True)
  median = {k: statistics.median(v) for k, v in times.items()}  # the median: best-of flatters
  nbytes = disk_bytes(src)
  shutil.rmtree(src)
  return {'checkpoints': count, 'bytes': nbytes, 'seconds': median, 'all_seconds': times,
          'peak_rss': rss, 'worker_peak_rss_over_idle': worker_rss,
          'worker_rss_over_checkpoint': {k: v / (nbytes / count) for k, v in worker_rss.items()},
          'ours_over_floor': median['ours'] / median['floor'],
          'baseline_over_ours': median['baseline'] / median['ours'],
          'baseline_over_full': median['baseline'] / median['full']}


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--counts', default='8,32')
  parser.add_argument('--layers', type=int, default=3, help='3 layers: about 35 MB per checkpoint')
  parser.add_argument('--big', action='store_true', help='add one checkpoint of about 1 GB')
  parser.add_argument('--repeat', type=int, default=2)
  parser.add_argument('--json')
  args = parser.parse_args(argv)
  cases = [(int(n), args.layers, 256) for n in args.counts.split(',') if n]
  if args.big:
    cases.append((1, 6, 1024))  # 6 layers of width 1024: about 1 GB with Adam's moments
  results = []
  with tempfile.TemporaryDirectory(dir=os.environ.get('BENCH_DIR')) as work:
    for count, layers, width in cases:
      results.append(bench(count, layers, width, args.repeat, work))
  print(f"{'N':>4} {'MB':>6} {'floor s':>8} {'baseline s':>10} {'ours s':>7} {'full s':>7} "
        f"{'ours/floor':>10} {'base/ours':>9} {'base/full':>9}  worker RSS over idle / ckpt (ours, full)")
  for r in results:
    s, w = r['seconds'], r['worker_rss_over_checkpoint']
    print(f"{r['checkpoints']:>4} {r['bytes'] / 1e6:>6.0f} {s['floor']:>8.2f} {s['baseline']:>10.2f} "
          f"{s['ours']:>7.2f} {s['full']:>7.2f} {r['ours_over_floor']:>10.2f} "
          f"{r['baseline_over_ours']:>9.2f} {r['baseline_over_full']:>9.2f}  "
          f"{w['ours']:.2f}, {w['full']:.2f}")
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=2)
  return results


if __name__ == '__main__':
  main()
