"""What verifying each output costs: migrate_one with and without the read-back.

A benchmark, not a test. Writes N sample checkpoints (the demo's CNN, Adam
moments not zeros), then migrates them with the seed's surgery in this
process, alternating: verification on (the product), and off (verify
replaced by a no-op). Prints seconds per checkpoint and the ratio.

  python -m benchmarks.verify_cost [--count 8] [--repeat 3]
"""
from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
import statistics
import time
from unittest import mock

from pipeline import demo, migrate
from pipeline.compute import worker
from pipeline.verify import verification
from pipeline.write import copy_patch


def run_all(sources: list[str], out: str) -> float:
  shutil.rmtree(out, ignore_errors=True)
  surgery = worker.surgery_for(demo.SEED_SPEC)
  start = time.perf_counter()
  for src in sources:
    rec = migrate.migrate_one(src, out + src[src.rindex('/in/') + 3:], surgery)
    assert rec['status'] == 'ok', rec
  return time.perf_counter() - start


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--count', type=int, default=8)
  parser.add_argument('--repeat', type=int, default=3)
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    demo.make_samples(tmp, count=args.count)
    from pipeline.checkpoint import discovery
    sources = [s for s, _ in discovery.discover(tmp + '/in/*')]
    run_all(sources, tmp + '/warm')  # compile once, warm the page cache
    times = {'verified': [], 'unverified': []}
    for _ in range(args.repeat):
      times['verified'].append(run_all(sources, tmp + '/out'))
      with mock.patch.object(copy_patch, 'verify', lambda *a, **k: None), \
           mock.patch.object(verification, 'verify_saved', lambda *a, **k: None):
        times['unverified'].append(run_all(sources, tmp + '/out'))
  median = {k: statistics.median(v) for k, v in times.items()}  # the median: best-of flatters
  n = len(sources)
  for k, v in median.items():
    print(f'{k:<10} {v / n * 1000:6.0f} ms per checkpoint ({n} checkpoints, median of {args.repeat})')
  print(f'verified / unverified = {median["verified"] / median["unverified"]:.2f}')


if __name__ == '__main__':
  with contextlib.suppress(KeyboardInterrupt):
    main()
