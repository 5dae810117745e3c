"""Test-only: when CKPT_SURGERY_TEST_SLOW_COMMIT=SECONDS, Orbax waits that long
between writing a checkpoint's data and committing it (the rename locally,
commit_success.txt on GCS), in every process that has this folder on its
PYTHONPATH (the launcher and Beam's worker processes alike). A test that
kills the run during the wait kills it mid-write.
"""
import asyncio
import os

_delay = float(os.environ.get('CKPT_SURGERY_TEST_SLOW_COMMIT') or 0)
if _delay:
  from orbax.checkpoint._src.path import atomicity

  for cls in (atomicity.AtomicRenameTemporaryPath, atomicity.CommitFileTemporaryPath):
    def _slow(finalize):
      async def finalize_slowly(self, *args, **kwargs):
        await asyncio.sleep(_delay)
        return await finalize(self, *args, **kwargs)
      return finalize_slowly
    cls.finalize = _slow(cls.finalize)
