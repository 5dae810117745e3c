"""Safe to run twice: concurrent attempts, leases, untouched inputs."""
from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from pipeline import lease, migrate
from pipeline.demo import SEED_SPEC
from tests.test_cli import cli

ATTEMPT = '''
import json, sys
from pipeline import migrate
print(json.dumps(migrate.migrate_one(sys.argv[1], sys.argv[2], migrate.surgery_for(sys.argv[3]))))
'''


def concurrent_attempts(src: str, dst: str, n: int = 3) -> list[dict]:
  """n processes migrating the same checkpoint at the same moment."""
  procs = [subprocess.Popen([sys.executable, '-c', ATTEMPT, src, dst, SEED_SPEC],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
           for _ in range(n)]
  return [json.loads(p.communicate(timeout=300)[0].splitlines()[-1]) for p in procs]


def siblings(dst: epath.Path) -> list[str]:
  return sorted(p.name for p in dst.parent.iterdir())


@pytest.mark.parametrize('where', ['local', 'gcs'])
def test_concurrent_attempts_write_once_and_agree(request, inputs, tmp_path, where):
  if where == 'gcs':
    request.getfixturevalue('gcs')
    src = request.getfixturevalue('gcs_samples') + '/run_b'
    dst = request.getfixturevalue('bucket') + '/out/run_b'
  else:
    src, dst = str(inputs / 'run_b'), str(tmp_path / 'out' / 'run_b')
  records = concurrent_attempts(src, dst)
  assert sorted(r['status'] for r in records) == ['ok', 'skipped', 'skipped'], records
  out = epath.Path(dst)
  assert siblings(out) == ['run_b']  # no temporaries, no lease left behind
  restored = ocp.PyTreeCheckpointer().restore(out)
  before = ocp.PyTreeCheckpointer().restore(epath.Path(src))
  kernel = np.asarray(before['params']['Dense_1']['kernel'])
  np.testing.assert_allclose(restored['params']['Dense_1']['kernel'], kernel / np.linalg.norm(kernel), rtol=1e-6)


def test_a_live_lease_is_respected_and_a_dead_ones_is_broken(tmp_path):
  dst = epath.Path(tmp_path) / 'out'
  held = lease.try_claim(dst)
  assert held is not None and lease.try_claim(dst) is None
  with pytest.raises(TimeoutError, match='being written by another attempt'):
    lease.claim(dst, wait=0.3, poll=0.1)
  held.release()
  # A holder that was killed: a process of this host that no longer exists.
  dead = subprocess.Popen([sys.executable, '-c', 'from etils import epath; from pipeline import lease; '
                           f'lease.try_claim(epath.Path({str(dst)!r})); import os; os._exit(0)'])
  dead.wait()
  assert siblings(dst) == ['out' + lease.SUFFIX]
  with lease.claim(dst, wait=5, poll=0.1):
    pass
  assert siblings(dst) == []  # released: nothing left beside the output


def test_a_lease_not_refreshed_goes_stale(tmp_path):
  dst = epath.Path(tmp_path) / 'out'
  held = lease.try_claim(dst, heartbeat=3600)
  held._stop.set()  # a holder on another machine that stopped beating
  assert lease.try_claim(dst, stale_after=3600) is None
  time.sleep(0.2)
  assert lease.try_claim(dst, stale_after=0.1) is None  # breaks it...
  assert lease.try_claim(dst, stale_after=0.1) is not None  # ...then claims


def digest(tree) -> str:
  h = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(tree)):
    dirs.sort()
    for name in sorted(files):
      path = os.path.join(root, name)
      h.update(path.encode())
      h.update(str(os.stat(path).st_mode).encode())
      with open(path, 'rb') as f:
        h.update(f.read())
  return h.hexdigest()


def test_inputs_are_never_written(inputs, tmp_path):
  """Not one byte, and no write is even attempted: the input tree is read-only."""
  spec = tmp_path / 'spec.yaml'
  spec.write_text(SEED_SPEC)
  for root, dirs, files in os.walk(inputs):
    for name in dirs + files:
      path = os.path.join(root, name)
      os.chmod(path, os.stat(path).st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
  os.chmod(inputs, 0o555)
  before = digest(inputs)  # contents, names and modes
  try:
    result = cli('run', '--input', inputs / '*', '--output', tmp_path / 'out', '--spec', spec)
    assert result.returncode == 0, result.stderr
    again = cli('run', '--input', inputs / '*', '--output', tmp_path / 'out', '--spec', spec,
                '--overwrite')
    assert again.returncode == 0, again.stderr
    assert digest(inputs) == before
  finally:
    for root, dirs, files in os.walk(inputs):
      os.chmod(root, 0o755)


def test_nonfinite_results_fail_unless_allowed(inputs, tmp_path):
  spec = "ops: [{scale: {match: '^Dense_1/kernel$', by: .inf}}]"
  migrate._SURGERIES.clear()
  rec = migrate.migrate_one(str(inputs / 'run_b'), str(tmp_path / 'o' / 'run_b'), migrate.surgery_for(spec))
  assert rec['status'] == 'failed'
  assert 'non-finite values (NaN or inf) in 1 leaf(s): params/Dense_1/kernel' in rec['error']
  assert not (tmp_path / 'o' / 'run_b').exists()
  rec = migrate.migrate_one(str(inputs / 'run_b'), str(tmp_path / 'o' / 'run_b'), migrate.surgery_for(spec),
                            migrate.Settings(allow_nonfinite=True))
  assert rec['status'] == 'ok'


def test_an_output_that_does_not_read_back_as_computed_is_removed(inputs, tmp_path, monkeypatch):
  """A writer that commits something else than what was computed (a bug, a
  bad disk) is caught by reading the output back, and the output removed."""
  from pipeline import checkpoint_io
  real_save = checkpoint_io.save

  def corrupting_save(path, layout, items, provenance):
    state = layout.join(items)
    kernel = state['params']['Dense_0']['kernel']
    state['params']['Dense_0']['kernel'] = kernel.at[0, 0].add(1.0)
    real_save(path, layout, layout.split(state, items), provenance)

  monkeypatch.setattr(checkpoint_io, 'save', corrupting_save)
  migrate._SURGERIES.clear()
  rec = migrate.migrate_one(str(inputs / 'run_b'), str(tmp_path / 'o' / 'run_b'),
                            migrate.surgery_for(SEED_SPEC), attempts=1)
  assert rec['status'] == 'failed' and 'VerificationError' in rec['error']
  assert 'params/Dense_0/kernel' in rec['error']
  assert sorted(p.name for p in (tmp_path / 'o').iterdir()) == []


def test_provenance_records_the_digest(inputs, tmp_path):
  from pipeline import checkpoint_io
  migrate._SURGERIES.clear()
  rec = migrate.migrate_one(str(inputs / 'run_b'), str(tmp_path / 'o' / 'run_b'), migrate.surgery_for(SEED_SPEC))
  provenance = checkpoint_io.read_provenance(epath.Path(tmp_path / 'o' / 'run_b'))
  assert provenance['digest'] == rec['digest'] and len(provenance['checksums']) > 10
  assert {'src', 'spec_hash', 'spec', 'version', 'time'} <= set(provenance)
  shown = cli('inspect', tmp_path / 'o' / 'run_b').stdout
  assert f'"digest": "{rec["digest"]}"' in shown and 'leaves"' in shown
