"""`ckpt-surgery inspect`: a checkpoint's tree from its metadata alone.

One row per leaf: path, shape, dtype, bytes, and its role: a param, a mirror
of a param in opt_state (found the way the surgery finds them), or other.
The params and opt_state keys are the spec's (default `params`, `opt_state`).
No array bytes are read, except from a legacy Flax msgpack file, which holds
no metadata apart from its arrays.
"""
from __future__ import annotations

import json
import math
from typing import Any

import jax
import numpy as np
from etils import epath

import transforms
from pipeline import checkpoint
from pipeline.checkpoint import discovery


def leaf_rows(state: Any, params_key: str = 'params',
              opt_state_key: str = 'opt_state') -> list[tuple[str, str, str, int, str]]:
  """(path, shape, dtype, bytes, role) for every array leaf of a metadata tree.

  Roles: `param`; `mirror` of a param in opt_state (`mirror of fast/` for a
  mirror of a sub-tree, `(factored)` where its shape is not the param's);
  `collection` for a sub-tree beside the params keyed by their modules
  (`batch_stats`), found the way the surgery finds them."""
  state = state if isinstance(state, dict) else {}
  if params_key == '':  # the params are the whole state but the optimizer's
    params = {k: v for k, v in state.items() if k != opt_state_key}
  else:
    params = state.get(params_key)
  param_leaves = transforms.flatten(params) if isinstance(params, dict) and params else {}
  found = transforms.find_mirrors(param_leaves, state.get(opt_state_key), opt_state_key)
  collections = {k for k, v in state.items() if params_key and k not in (params_key, opt_state_key)
                 and transforms.is_collection(v, param_leaves)}
  rows = []
  for keys, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    if not hasattr(leaf, 'shape'):
      continue
    path = transforms.key_path(keys)
    top = path.split('/')[0]
    role = ''
    if (top == params_key) or (params_key == '' and top != opt_state_key):
      role = 'param'
    elif top in collections:
      role = 'collection'
    for m in found:
      if path.startswith(m.label + '/'):
        param = param_leaves.get('/'.join(filter(None, (m.base, path[len(m.label) + 1:]))))
        factored = param is not None and tuple(param.shape) != tuple(leaf.shape)
        role = ('mirror' + (f' of {m.base}/' if m.base else '') +
                (' (factored)' if factored else ''))
    nbytes = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
    rows.append((path, str(tuple(leaf.shape)), str(np.dtype(leaf.dtype)), nbytes, role))
  return rows


def describe(path: str, params_key: str = 'params', opt_state_key: str = 'opt_state') -> str:
  """The text `inspect` prints for the checkpoint at `path`."""
  path = discovery.absolute(path)  # Orbax refuses relative paths
  ckpt = epath.Path(path)
  layout, state = checkpoint.read_metadata(ckpt)
  rows = leaf_rows(state, params_key, opt_state_key)
  if layout.msgpack:
    kind = 'Flax msgpack file'
  elif layout.is_step:
    kind = f"CheckpointManager step, items {', '.join(n for n, _ in layout.items)}"
  else:
    kind = 'single tree'
  out = [f'{path}  ({kind}; {len(rows)} arrays, {sum(r[3] for r in rows):,} bytes)']
  provenance = checkpoint.read_provenance(ckpt)
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
