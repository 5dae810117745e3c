"""Copy-and-patch: an output made by copying the input's files and patching the copy.

When every output leaf is carried (untouched or only renamed) or computed,
and the surgery provably removes nothing (`transforms.Route.removes`), most
of an output is the input's bytes. Instead of re-saving them through Orbax:
  1. copy  the input's files (`storage.copy_tree`: hard links for the OCDBT
           data files TensorStore never rewrites, a server-side copy on GCS);
  2. patch the copy, one tree item at a time. In an OCDBT database: a
           renamed leaf's keys are copied index-only (the new key points at
           the same file, offset and length) and its old keys deleted, in
           one TensorStore transaction; then computed leaves are written, in
           a second, as the bytes the zarr driver encodes them to with the
           spec Orbax itself would use (below), in the input's zarr format (v2, or
           zarr3 as Orbax v1 writes by default). In per-array directories, a
           renamed leaf's directory is moved;
  3. rewrite Orbax's metadata (`_METADATA`, `_sharding`, `array_metadatas`,
           `_CHECKPOINT_METADATA` with our provenance), built with Orbax's own
           metadata classes;
  4. commit as Orbax does: a temporary directory renamed into place locally;
           on GCS, `commit_success.txt` written last.
`verify_index` then proves what was carried without reading its data: the
output's index maps each carried key to the input's very value (the same
inline bytes, or the same place in a data file identical to the input's),
and holds no key but those and the computed leaves'.

Computed leaves are encoded once, into memory, with Orbax's write spec (one
chunk per shard, as Orbax writes them; where `chunk_bytes` is given, as a
streamed checkpoint's are, chunks of whole rows at most that large, so a
leaf may be written a Slab of rows at a time), and those bytes are what is
written: `begin`, `write_pack` (a pack of computed leaves, one transaction
per tree item; a state held whole is one pack), `finish` and `commit`, the
steps of the writer protocol (`write.protocol`).
Verification links each stored byte to the values computed without decoding
anything a second time (a decode costs as much as the encode): the array
handed to the encoder has the checksum the surgery's result had
(`transforms.fingerprint`, by leaf path); the encoder made every key of the
array's chunk grid; the output stores exactly those keys; and every value
read back raw has the CRC32 of the bytes encoded.

A fresh patch (`make_patches(fresh=True)`: `--full_decode`, or no leaf
carried) copies no array data at all: every leaf is computed and written
into an empty tree (a new OCDBT database configured as Orbax configures
its own, or a directory per array, as the input had), so it is the full
path's writer too, and a surgery that removes data may take it.

Limits, where `make_patches` says why and another writer is used: old OCDBT
versions and copied data files keep overwritten values readable, so a
surgery that removes data takes only fresh patches; and neither kind takes
inputs whose format this module does not know (per-process
databases without a merged root, metadata fields or value types Orbax 0.12
does not write), typed PRNG keys computed, or leaves of other types.

The package: `patches` (the patch, or NotPatchable), `encoding` (computed
leaves to stored bytes), `writing` (begin, write a pack, finish; `writing.commit`)
and `verifying` (the committed output proven by its index).
"""
from pipeline.write.copy_patch.encoding import Slab
from pipeline.write.copy_patch.patches import (NOTHING_CARRIED, ZERO_FILLS, NotPatchable,
                                                PatchProgress, TreePatch, check_input, make_patches)
from pipeline.write.copy_patch.verifying import IndexMismatch, verify, verify_index
from pipeline.write.copy_patch.writing import Work, begin, finish, moved, write_pack

__all__ = ['NOTHING_CARRIED', 'ZERO_FILLS', 'IndexMismatch', 'NotPatchable', 'PatchProgress',
           'Slab', 'TreePatch', 'Work', 'begin', 'check_input', 'finish', 'moved', 'make_patches',
           'verify', 'verify_index', 'write_pack']
