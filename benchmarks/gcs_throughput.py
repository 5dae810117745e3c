"""gs:// -> gs:// throughput against a GCS-protocol server: ours next to a copy.

A benchmark, not a test. It starts gcp-storage-emulator (behind the tests'
header-fixing proxy), writes N sample checkpoints to a bucket with Orbax,
then times, alternating, each R times:
  copy  a plain gcsfs copy of every object under the input prefix (read each
        object, write it under another prefix): the I/O floor;
  ours  `ckpt-surgery run` gs -> gs with the seed's surgery, as a whole
        process (start-up, Beam's local workers, restore, jit, save, report);
  rename  the same with a spec that only renames modules (Dense_N -> Linear_N),
        which changes no stored array: what a copy-and-patch writer need not
        upload.
For each it also reports the bytes uploaded into the bucket, counted at the
proxy (server-side copies are not uploads), and those over the input's stored
bytes (`uploaded_over_stored`). It prints a table and writes JSON with bytes,
seconds, MB/s, uploads and the ratio.

  python -m benchmarks.gcs_throughput [--count 8] [--repeat 2] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import statistics
import time

import fsspec

from pipeline import demo, storage
from tests.gcs_server import Emulator, FlakyProxy


# Renames every Dense module of the demo's CNN (Conv_0, Conv_1, Dense_0, Dense_1).
RENAME_SPEC = r"""ops:
  - rename: {match: '^Dense_(\d+)/', to: 'Linear_\1/'}
"""
MODES = ('copy', 'ours', 'rename')


def gcs_copy(fs, src: str, dst: str) -> int:
  """Read every object under src and write it under dst; the bytes copied."""
  copied = 0
  for path in fs.find(src):
    data = fs.cat_file(path)
    fs.pipe_file(dst + path[len(src):], data)
    copied += len(data)
  return copied


def ours(src: str, dst: str, spec: str) -> None:
  subprocess.run([sys.executable, '-m', 'pipeline', 'run', '--input', src + '/*',
                  '--output', dst, '--spec', spec], check=True, capture_output=True)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--count', type=int, default=8)
  parser.add_argument('--repeat', type=int, default=2)
  parser.add_argument('--json', help='also write the results here')
  args = parser.parse_args(argv)

  emulator = Emulator()
  proxy = FlakyProxy(emulator.port)
  try:
    storage.use_gcs_emulator(proxy.url)
    fs = fsspec.filesystem('gs')
    fs.mkdir('bench')
    # Samples are written by a separate process, as users' training jobs do.
    subprocess.run([sys.executable, '-c', f'from pipeline import demo; '
                    f'demo.make_samples("gs://bench", count={args.count})'], check=True,
                   capture_output=True)
    src = 'bench/in'
    nbytes = sum(fs.du(src, total=False).values())
    with tempfile.TemporaryDirectory() as tmp:
      specs = {}
      for name, text in (('ours', demo.SEED_SPEC), ('rename', RENAME_SPEC)):
        specs[name] = os.path.join(tmp, f'{name}.yaml')
        with open(specs[name], 'w') as f:
          f.write(text)
      times = {k: [] for k in MODES}
      uploaded = {k: [] for k in MODES}
      for i in range(args.repeat):
        for mode in MODES:
          proxy.reset_counters()
          start = time.perf_counter()
          if mode == 'copy':
            gcs_copy(fs, src, f'bench/copy{i}')
          else:
            ours('gs://' + src, f'gs://bench/{mode}{i}', specs[mode])
          times[mode].append(time.perf_counter() - start)
          uploaded[mode].append(proxy.reset_counters()['bytes_uploaded'])
  finally:
    proxy.stop()
    emulator.stop()

  median = {k: statistics.median(v) for k, v in times.items()}  # the median: best-of flatters
  result = {
      'checkpoints': args.count, 'bytes': nbytes, 'repeat': args.repeat,
      'seconds': median, 'all_seconds': times,
      'mb_per_s': {k: nbytes / 1e6 / v for k, v in median.items()},
      'ours_over_copy': median['ours'] / median['copy'],
      'bytes_uploaded': {k: max(v) for k, v in uploaded.items()},
      'uploaded_over_stored': {k: max(v) / nbytes for k, v in uploaded.items()},
  }
  print(f"{args.count} checkpoints, {nbytes / 1e6:.1f} MB, median of {args.repeat}:")
  for k in MODES:
    print(f"  {k:<6} {median[k]:7.2f} s  {result['mb_per_s'][k]:6.1f} MB/s  "
          f"uploaded {result['bytes_uploaded'][k] / 1e6:6.2f} MB "
          f"({result['uploaded_over_stored'][k]:.0%} of stored)")
  print(f"  ours / copy = {result['ours_over_copy']:.2f}")
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=2)
  return result


if __name__ == '__main__':
  main()
