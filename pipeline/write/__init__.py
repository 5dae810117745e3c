"""The write stage: which writer makes an output, the writers, and the
protocol around them that keeps outputs whole.

`writers.choose` is the one decision among the four writers, cheapest first:
`copy_patch` (the input's files copied and patched), `copy_through` (Orbax's
save, untouched leaves copied as stored), a fresh tree (`copy_patch` with
`fresh=True`), and `orbax_save` (Orbax's save of the whole state).
`protocol` gives them one shape (begin, write a pack, finish, commit,
verify) and `open_writer` makes the one chosen. Around them: `lease` (one attempt per output at a time) and `outputs` (the
attempt mark, the overwrite swap, the commit rules).
"""
