"""A worker with several devices restores large leaves sharded over all of
them (four host devices stand in for a GPU host), and migrates them so."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent('''
    import json, sys
    import jax, jax.numpy as jnp, numpy as np, optax, orbax.checkpoint as ocp
    from etils import epath
    from pipeline import checkpoint, migrate
    from pipeline.compute import worker
    work = epath.Path(sys.argv[1])
    rng = np.random.default_rng(0)
    params = {'big': jnp.asarray(rng.standard_normal((1024, 1030)), jnp.float32),  # 4.2 MB
              'small': jnp.arange(3.0)}
    ocp.PyTreeCheckpointer().save(work / 'in', {'params': params, 'opt_state': optax.adam(1e-3).init(params)})
    _, items = checkpoint.restore(work / 'in')
    big, small = items['']['params']['big'], items['']['params']['small']
    surgery = worker.surgery_for("ops: [{normalize: {match: '^big$'}}]")
    names = ('full', 'carried', 'streamed')  # streamed: a pack of one leaf and its moments at a time
    records = [migrate.migrate_one(str(work / 'in'), str(work / name), surgery, migrate.Settings(
                   full_decode=name != 'carried', memory_budget=(24 << 20) * (name == 'streamed')))
               for name in names]
    outs = [ocp.PyTreeCheckpointer().restore(work / name)['params'] for name in names]
    # Orbax's own save of the full path's output, restored as a worker places it.
    ocp.PyTreeCheckpointer().save(work / 'orbax', checkpoint.restore(work / 'full')[1][''])
    from pipeline import storage
    zarray = lambda n: json.loads(storage.ocdbt_index(work / n)[b'params.big/.zarray'])['chunks']
    tree = lambda n: json.loads((work / n / '_METADATA').read_text())['tree_metadata']
    write_shape = lambda n: tree(n)["('params', 'big')"]['value_metadata']['write_shape']
    print(json.dumps({
        'devices': jax.local_device_count(),
        'big': [len(big.sharding.device_set), str(big.sharding.spec)],
        'small': [len(small.sharding.device_set), small.sharding.is_fully_replicated],
        'records': [(r['status'], r['error'], r['bytes_carried'], r['packs']) for r in records],
        'normalized': [np.asarray(o['big']).tolist()[0][:4] for o in outs],
        'same': all(np.array_equal(o[k], outs[0][k]) for o in outs for k in ('big', 'small')),
        'preallocate': __import__('os').environ.get('XLA_PYTHON_CLIENT_PREALLOCATE'),
        'writers': [(r['write_path'], r['why_not_patched']) for r in records],
        'chunks': [zarray(n) for n in ('full', 'streamed', 'orbax')],
        'write_shapes': [write_shape(n) for n in ('full', 'streamed', 'orbax')],
    }))
''')


def test_large_leaves_are_restored_and_migrated_sharded_over_local_devices(tmp_path):
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=4',
         'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu'}
  env.pop('XLA_PYTHON_CLIENT_PREALLOCATE', None)
  result = subprocess.run([sys.executable, '-c', SCRIPT, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  got = json.loads(result.stdout.strip().splitlines()[-1])
  assert got['devices'] == 4
  assert got['big'] == [4, "P('devices', None)"]  # split along its axis that divides
  assert got['small'] == [4, True]                             # small leaves replicated
  assert [r[:2] for r in got['records']] == [['ok', None]] * 3
  assert got['records'][0][2] == 0 and got['records'][1][2] > 0
  assert [r[3] for r in got['records']] == [0, 0, 3]  # each leaf with its moments' alike
  assert got['same']  # copy-through, the full path and the streamed one agree
  rng = np.random.default_rng(0)
  big = rng.standard_normal((1024, 1030)).astype(np.float32)
  np.testing.assert_allclose(got['normalized'][0], (big / np.linalg.norm(big))[0, :4], rtol=1e-5)
  # The full path writes a fresh tree (not Orbax's save), chunked per shard as Orbax's save is.
  assert got['writers'][0] == ['full', '--full_decode']
  assert got['chunks'] == [[256, 1030]] * 3 and got['write_shapes'] == [[256, 1030]] * 3
  # Importing the pipeline keeps JAX from preallocating accelerator memory.
  assert got['preallocate'] == 'false'
