"""The verify stage: an output is proven to be what was computed before it is
published; what cannot be proven fails by name.

`verification` checks an input against the checksums a previous run
recorded, and reads an output back (in byte-bounded batches) to compare it
with what the surgery computed. A copy-and-patch output is also checked
without reading its carried data (`write.copy_patch.verify_index`).
"""
