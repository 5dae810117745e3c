"""Test-only: when CKPT_SURGERY_TEST_SLOW_COMMIT=SECONDS, every writer waits
that long between writing a checkpoint's data and committing it (the rename
locally, commit_success.txt on GCS): Orbax's save and copy-and-patch alike,
in every process that has this folder on its PYTHONPATH (the launcher and
Beam's worker processes alike). A test that kills the run during the wait
kills it mid-write.
"""
import asyncio
import os
import time

_delay = float(os.environ.get('CKPT_SURGERY_TEST_SLOW_COMMIT') or 0)
if _delay:
  from orbax.checkpoint._src.path import atomicity
  from pipeline.write import copy_patch

  for cls in (atomicity.AtomicRenameTemporaryPath, atomicity.CommitFileTemporaryPath):
    def _slow(finalize):
      async def finalize_slowly(self, *args, **kwargs):
        await asyncio.sleep(_delay)
        return await finalize(self, *args, **kwargs)
      return finalize_slowly
    cls.finalize = _slow(cls.finalize)

  def _commit_slowly(commit):
    def commit_slowly(*args, **kwargs):
      time.sleep(_delay)
      return commit(*args, **kwargs)
    return commit_slowly
  copy_patch.writing.commit = _commit_slowly(copy_patch.writing.commit)
