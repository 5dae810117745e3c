"""Proof that a committed output is what was computed, and that an input we
wrote still holds what we recorded.

An output written by copy-and-patch is proven by its index and stored
bytes (`copy_patch.verify`); one written by Orbax's save is read back, a
batch of bytes at a time (`verify_saved`); each writer's `verify` step
(`write.protocol`) calls its own. A migration of a migration first
checks its input against the checksums our provenance recorded
(`check_recorded`).
"""
from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

import transforms
from pipeline import checkpoint
from pipeline.checkpoint import VerificationError
from pipeline.compute.batching import byte_batches


def check_recorded(src: epath.Path, layout: checkpoint.Layout, meta: dict[str, Any],
                   state: Any = None, budget: int | None = None) -> None:
  """An input we wrote (a migration of a migration) must still hold what we
  recorded: each leaf whose checksum its provenance lists must match it.
  Storage formats do not checksum array data; we did. `state`: the restored
  state, where the caller has it; else those leaves are read here, at most
  `budget` bytes at a time where given, each batch let go before the next."""
  recorded = (checkpoint.read_provenance(src) or {}).get('checksums') or {}
  if not recorded:
    return
  mismatched = lambda state: [p for p, x in transforms.leaf_paths(state).items()
                              if p in recorded and checkpoint.is_array(x) and
                              transforms.fingerprint(x).checksum != recorded[p]]
  if state is not None:
    bad = mismatched(state)
  else:
    whole, bad = layout.join(checkpoint.trees(meta)), []
    for batch in batches(whole, set(recorded), budget):
      only = jax.tree_util.tree_map_with_path(
          lambda k, m: m if transforms.key_path(k) in batch else ocp.PLACEHOLDER, whole)
      _, items = checkpoint.restore(src, like=layout.split(only, {}))
      bad += mismatched(layout.join(items))
      del items  # before the next batch
  if bad:
    bad.sort()
    raise checkpoint.CheckpointError(
        f'{src}: {", ".join(bad[:3])}{" ..." if len(bad) > 3 else ""} no longer match the '
        'checksums ckpt-surgery recorded when it wrote this checkpoint: its stored data changed '
        'since (a flipped bit, a partial overwrite)')


def batches(tree: Any, paths: set[str], budget: int | None) -> list[set[str]]:
  """The leaf paths of `tree` in `paths`, in batches of at most `budget`
  bytes (a leaf larger than that alone; one batch where None)."""
  leaves = [(transforms.key_path(k), m) for k, m in jax.tree_util.tree_flatten_with_path(tree)[0]
            if transforms.key_path(k) in paths]
  return [{path for path, _ in batch}
          for batch in byte_batches(leaves, lambda leaf: transforms.tree_bytes(leaf[1]), budget)]


VERIFY_BATCH_BYTES = 256 << 20  # read back at most this much at once: memory stays bounded


def verify_saved(dst: epath.Path, written: dict[str, Any],
                 prints: dict[str, transforms.Fingerprint]) -> None:
  """Reopen what Orbax's save committed at dst: it must hold the arrays of
  `written` (the items as saved, arrays or their abstract form), reading
  back `prints`' checksums, and the stored chunks of its StoredArrays as
  copied. Arrays are read back a batch of VERIFY_BATCH_BYTES at a time."""
  expected = checkpoint.array_specs(written)
  arrays = {transforms.key_path(k) for k, x in jax.tree_util.tree_flatten_with_path(written)[0]
            if checkpoint.is_array(x)}
  got, back = {}, {}
  for batch in batches(written, arrays, VERIFY_BATCH_BYTES):
    like = jax.tree_util.tree_map_with_path(
        lambda k, x, batch=batch: ocp.PLACEHOLDER if checkpoint.is_array(x) and
        transforms.key_path(k) not in batch else x, written)
    layout, items = checkpoint.restore(dst, like=like)
    got.update(checkpoint.array_specs(items))
    back.update(transforms.fingerprints(layout.join(items)))
    del items  # before the next batch
  if got != expected:
    differ = sorted(set(got.items()) ^ set(expected.items()))[:3]
    raise VerificationError(f'{dst}: committed arrays differ from what was computed: {differ}')
  bad = sorted(p for p, f in prints.items() if p not in back or back[p].checksum != f.checksum)
  for name, tree in written.items():
    names = dict(jax.tree_util.tree_flatten_with_path(ocp.tree.get_param_names(tree))[0])
    stored = [(names[k], x) for k, x in jax.tree_util.tree_flatten_with_path(tree)[0]
              if isinstance(x, checkpoint.StoredArray)]
    if stored:
      sums = checkpoint.stored_checksums(str(dst / name if name else dst), [n for n, _ in stored])
      bad += [f'{name}:{n}' for (n, x), got_sum in zip(stored, sums) if got_sum != x.checksum]
  if bad:
    raise VerificationError(f'{dst}: committed data differ from what was computed in {bad[:5]}')
