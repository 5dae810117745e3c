"""What proving a skip costs: a skip-all rerun with the input's identity checked, and without.

A benchmark, not a test. Writes one small Adam checkpoint (an MLP, two
tree items' worth of files) and N copies of it, migrates them once with the
seed's surgery in this process, then times skip-all passes (`migrate_one`
over every checkpoint, each `skipped`), alternating: the product, which
lists each input to compare its identity with the one its output recorded;
and the same pass with that listing replaced by a lookup (the cost of a
skip before identities). Prints the median of the repeats, per pass and per
skip, and the ratio. `--gcs` runs it on the GCS test server (started here).

  python -m benchmarks.skip_cost [--count 1000] [--repeat 3] [--gcs]
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from unittest import mock

import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from pipeline import demo, migrate
from pipeline.checkpoint import identity
from pipeline.compute import worker
from pipeline.storage import files


def make_inputs(root: str, count: int) -> list[str]:
  first = f'{root}/in/0'
  checkpointer = ocp.StandardCheckpointer()
  params = {f'Dense_{i}': {'kernel': np.ones((16, 16), np.float32), 'bias': np.zeros(16, np.float32)}
            for i in range(3)}
  checkpointer.save(epath.Path(first), {'params': params, 'opt_state': [{'mu': params, 'nu': params}]})
  checkpointer.wait_until_finished()
  sources = [first]
  for i in range(1, count):
    sources.append(f'{root}/in/{i}')
    if files.is_gcs(root):
      for obj in files.gcs().find(first):
        files.gcs().cp_file(obj, sources[-1] + obj[len(first.removeprefix('gs://')):])
    else:
      import shutil  # pylint: disable=g-import-not-at-top
      shutil.copytree(first, sources[-1])
  return sources


def skip_all(sources: list[str], root: str) -> float:
  surgery = worker.surgery_for(demo.SEED_SPEC)
  start = time.perf_counter()
  for src in sources:
    rec = migrate.migrate_one(src, f'{root}/out/{src.rsplit("/", 1)[1]}', surgery)
    assert rec['status'] == 'skipped', rec
  return time.perf_counter() - start


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--count', type=int, default=1000)
  parser.add_argument('--repeat', type=int, default=3)
  parser.add_argument('--gcs', action='store_true', help='on the GCS test server (tests/gcs_server.py)')
  args = parser.parse_args(argv)
  with contextlib.ExitStack() as stack:
    if args.gcs:
      from tests.gcs_server import serving  # pylint: disable=g-import-not-at-top
      stack.enter_context(serving())
      files.gcs().mkdir('bench')
      root = 'gs://bench'
    else:
      root = stack.enter_context(tempfile.TemporaryDirectory())
    sources = make_inputs(root, args.count)
    surgery = worker.surgery_for(demo.SEED_SPEC)  # normalizes Dense_1/kernel
    for src in sources:
      rec = migrate.migrate_one(src, f'{root}/out/{src.rsplit("/", 1)[1]}', surgery)
      assert rec['status'] == 'ok', rec
    known = {src: identity.identity(epath.Path(src)) for src in sources}
    times = {'proven': [], 'unproven': []}
    for _ in range(args.repeat):
      times['proven'].append(skip_all(sources, root))
      listed = identity.identity  # outputs are still listed (their identity is recorded)
      with mock.patch.object(identity, 'identity',
                             lambda path: known.get(str(path)) or listed(path)):
        times['unproven'].append(skip_all(sources, root))
  median = {k: statistics.median(v) for k, v in times.items()}
  where = 'gs:// (test server)' if args.gcs else 'local disk'
  for k, v in median.items():
    print(f'{k:<9} {v:7.2f} s for {args.count} skips, {v / args.count * 1000:6.2f} ms each '
          f'({where}, median of {args.repeat}: {", ".join(f"{t:.2f}" for t in times[k])})')
  print(f'proven / unproven = {median["proven"] / median["unproven"]:.2f}')


if __name__ == '__main__':
  with contextlib.suppress(KeyboardInterrupt):
    main()
