"""Where checkpoints live: local disk or gs://, and moving bytes between them.

`files` lists, removes and renames trees on either; `buckets` points gs:// at
GCS or an emulator and tells a transient failure from a lasting one;
`copying` copies a tree the cheapest way a pair of places allows;
`kvstores` opens TensorStore's key-value stores of a tree (its files, or its
OCDBT database) and reads an OCDBT index.

The names below are the package's surface, used as `storage.copy_tree`, ...
"""
from pipeline.storage.buckets import (ENDPOINT_ENV, StorageError, check_bucket, configure,
                                      emulator_environment, is_transient, use_gcs_emulator)
from pipeline.storage.copying import CopyError, CopyStats, copy_entry, copy_tree, sync, sync_directory
from pipeline.storage.kvstores import kvstore_spec, listing, ocdbt_index, open_store, orbax_spec
