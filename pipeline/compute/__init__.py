"""The compute stage: the worker's compiled surgery, run on a checkpoint held
whole (`worker`) or a pack at a time (`stream`), with what bounds it.

`worker` holds what a worker process keeps between checkpoints (compiled
surgeries, locks) as one object with a `clear()`; `stream` plans and runs a
checkpoint larger than the memory budget in packs and slabs; `finite` refuses
a non-finite computed leaf by name; `batching` splits work into byte-bounded
batches; `deadline` bounds one checkpoint's time.
"""
