"""Checkpoints as stored: finding them, what each is, its metadata, reading it.

The first stage. `discovery` expands `--input` into checkpoints and names
their outputs; `layout` says what a checkpoint is (one tree, a
CheckpointManager step of items, a Flax msgpack file); `metadata` reads
Orbax's metadata of its trees without reading arrays; `reading` restores
them; `stored` names a carried leaf (a `StoredArray`) by where its chunks
are, for writers that copy rather than decode it. `roots` and `identity`
carry a CheckpointManager root's metadata and fingerprint a checkpoint.

The names below are the package's surface: the other stages use them as
`checkpoint.restore`, `checkpoint.Layout`, ... (tests replace them there).
"""
from pipeline.checkpoint.errors import CheckpointError, VerificationError
from pipeline.checkpoint.layout import (HANDLER_CLASSES, TREE_HANDLERS, Layout,
                                        is_checkpoint, is_msgpack, read_layout)
from pipeline.checkpoint.metadata import (PROVENANCE_KEY, abstract, array_specs,
                                          custom_metadata, is_array, item_metadata, read_provenance,
                                          skipped, stored_formats, trees)
from pipeline.checkpoint.reading import open_stored, param_name, read_metadata, restore
from pipeline.checkpoint.stored import StoredArray, stand_ins, stored_checksums, stored_format
