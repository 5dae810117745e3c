"""The report's totals and its terminal table."""
from __future__ import annotations

import io
import time

from pipeline import report
from pipeline.report import progress
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


class _Terminal(io.StringIO):
  def isatty(self):
    return True


def test_progress_is_one_line_redrawn_on_a_terminal_and_nothing_in_a_log():
  terminal, log = _Terminal(), io.StringIO()
  for stream in (terminal, log):
    bar = progress.Progress(1000, stream)
    bar.show(0, 1.2)
    bar.show(412, 125.0)
    bar.close()
  assert log.getvalue() == ''
  first, second = terminal.getvalue().split('\r')[1:]
  assert first.startswith('[' + '.' * progress.WIDTH + ']    0/1000 checkpoints  0 min 01 s')
  assert second == '[' + '#' * 12 + '.' * 18 + ']  412/1000 checkpoints  2 min 05 s\n'
