"""`ckpt-surgery inspect`: a checkpoint's tree from its metadata alone.

One row per leaf: path, shape, dtype, bytes, and its role: a param, a mirror
of a param in opt_state (found the way the surgery finds them), or other.
No array bytes are read.
"""
from __future__ import annotations

import json
import math
from typing import Any

import jax
import numpy as np
from etils import epath

import transforms
from pipeline import checkpoint_io


def leaf_rows(state: Any, params_key: str = 'params',
              opt_state_key: str = 'opt_state') -> list[tuple[str, str, str, int, str]]:
  """(path, shape, dtype, bytes, role) for every array leaf of a metadata tree."""
  params = state.get(params_key) if isinstance(state, dict) else None
  param_leaves = transforms.flatten(params) if isinstance(params, dict) else {}
  opt_state = state.get(opt_state_key) if isinstance(state, dict) else None
  mirror_prefixes = [
      '/'.join([opt_state_key, *map(str, loc)])
      for loc in transforms.find_mirrors(param_leaves.keys(), opt_state)]
  rows = []
  for keys, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    if not hasattr(leaf, 'shape'):
      continue
    path = transforms.key_path(keys)
    role = ''
    if path.startswith(params_key + '/'):
      role = 'param'
    for prefix in mirror_prefixes:
      if path.startswith(prefix + '/'):
        param = param_leaves.get(path[len(prefix) + 1:])
        factored = param is not None and tuple(param.shape) != tuple(leaf.shape)
        role = 'mirror (factored)' if factored else 'mirror'
    nbytes = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
    rows.append((path, str(tuple(leaf.shape)), str(np.dtype(leaf.dtype)), nbytes, role))
  return rows


def describe(path: str) -> str:
  """The text `inspect` prints for the checkpoint at `path`."""
  ckpt = epath.Path(path)
  layout, state = checkpoint_io.read_metadata(ckpt)
  rows = leaf_rows(state)
  kind = (f"CheckpointManager step, items {', '.join(n for n, _ in layout.items)}"
          if layout.is_step else 'single tree')
  out = [f'{path}  ({kind}; {len(rows)} arrays, {sum(r[3] for r in rows):,} bytes)']
  provenance = checkpoint_io.read_provenance(ckpt)
  if provenance:
    shown = {k: v for k, v in provenance.items() if k not in ('spec', 'checksums', 'carried')}
    shown['checksums'] = f"{len(provenance.get('checksums', {}))} leaves"
    shown['carried'] = f"{len(provenance.get('carried', []))} leaves (stored bytes copied)"
    out.append('provenance: ' + json.dumps(shown, sort_keys=True))
    out.append('spec: ' + json.dumps(provenance.get('spec'), sort_keys=True))
  header = ('path', 'shape', 'dtype', 'bytes', 'role')
  table = [header] + [(p, s, d, f'{b:,}', r) for p, s, d, b, r in rows]
  widths = [max(len(row[i]) for row in table) for i in range(5)]
  out += ['  '.join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
  return '\n'.join(out)
