"""The report's totals and its terminal table."""
from __future__ import annotations

import time

from pipeline import report
from pipeline.migrate import record


def test_summary_and_table_round_trip(tmp_path):
  records = [
      record('/in/b', '/out/b', 'ok', bytes_in=2000, bytes_out=1000, seconds=1.5, signature='s1', compiled=True),
      record('/in/a', '/out/a', 'ok', bytes_in=2000, bytes_out=1000, seconds=0.5, signature='s1'),
      record('/in/c', '/out/c', 'skipped'),
      record('/in/d', '/out/d', 'failed', error='ValueError: broken'),
  ]
  summary = report.write_report(str(tmp_path), records, started_at=time.time() - 2)
  assert {k: summary[k] for k in ('ok', 'skipped', 'failed', 'compilations', 'signatures',
                                   'bytes_read', 'bytes_written', 'checkpoint_seconds')} == {
      'ok': 2, 'skipped': 1, 'failed': 1, 'compilations': 1, 'signatures': 1,
      'bytes_read': 4000, 'bytes_written': 2000, 'checkpoint_seconds': 2.0}
  assert summary['seconds'] >= 2
  back, back_summary = report.read_report(str(tmp_path))
  assert [r['src'] for r in back] == ['/in/a', '/in/b', '/in/c', '/in/d'] and back_summary == summary
  table = report.format_table(back, back_summary)
  assert 'error: /in/d: ValueError: broken' in table
  assert table.splitlines()[-1].startswith('2 ok, 1 skipped, 1 failed; 1 compilation(s) for 1 signature(s)')
