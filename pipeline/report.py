"""The run's report: one record per checkpoint, the totals, a terminal table.

`PREFIX/_surgery/report.jsonl` holds every record; `PREFIX/_surgery/summary.json`
the totals. Both are written by the pipeline's last step through etils.epath,
so they land wherever PREFIX is (a local folder or gs://), on any runner; the
launcher reads them back to print the table and choose the exit code.
"""
from __future__ import annotations

import json
import time
from typing import Any, Iterable

from etils import epath

REPORT_DIR = '_surgery'
STATUSES = ('ok', 'skipped', 'failed')


def report_dir(prefix: str) -> epath.Path:
  return epath.Path(prefix) / REPORT_DIR


def summarize(records: Iterable[dict[str, Any]], started_at: float) -> dict[str, Any]:
  records = list(records)
  summary: dict[str, Any] = {s: sum(r['status'] == s for r in records) for s in STATUSES}
  summary.update(
      checkpoints=len(records),
      compilations=sum(bool(r['compiled']) for r in records),
      signatures=len({r['signature'] for r in records if r['signature']}),
      bytes_read=sum(r['bytes_in'] for r in records),
      bytes_written=sum(r['bytes_out'] for r in records),
      bytes_carried=sum(r.get('bytes_carried', 0) for r in records),  # of bytes_written: copied, not re-encoded
      peak_rss_over_idle=max((r.get('peak_rss_over_idle', 0) for r in records), default=0),  # of any worker
      seconds=round(time.time() - started_at, 3),
      started_at=started_at,  # identifies the run that wrote this summary
      checkpoint_seconds=round(sum(r['seconds'] for r in records), 3),
  )
  return summary


def write_report(prefix: str, records: list[dict[str, Any]], started_at: float) -> dict[str, Any]:
  """Write report.jsonl and summary.json under PREFIX/_surgery; the summary."""
  records = sorted(records, key=lambda r: r['src'])
  summary = summarize(records, started_at)
  out = report_dir(prefix)
  out.mkdir(parents=True, exist_ok=True)
  (out / 'report.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
  (out / 'summary.json').write_text(json.dumps(summary, indent=2) + '\n')
  return summary


def read_report(prefix: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  out = report_dir(prefix)
  lines = (out / 'report.jsonl').read_text().splitlines()
  return [json.loads(l) for l in lines if l], json.loads((out / 'summary.json').read_text())


def size(n: float) -> str:
  for unit in ('B', 'KB', 'MB', 'GB', 'TB'):
    if n < 1000 or unit == 'TB':
      return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
    n /= 1000
  raise AssertionError


def format_table(records: list[dict[str, Any]], summary: dict[str, Any]) -> str:
  """A short table: one row per checkpoint, errors in full, then the totals."""
  rows = [('status', 'seconds', 'bytes in', 'bytes out', 'checkpoint')]
  rows += [(r['status'], f"{r['seconds']:.2f}", size(r['bytes_in']), size(r['bytes_out']),
            r['src']) for r in records]
  widths = [max(len(row[i]) for row in rows) for i in range(4)]
  lines = ['  '.join(c.ljust(w) for c, w in zip(row[:4], widths)) + '  ' + row[4] for row in rows]
  lines += [f"  error: {r['src']}: {r['error']}" for r in records if r['error']]
  lines.append(
      f"{summary['ok']} ok, {summary['skipped']} skipped, {summary['failed']} failed; "
      f"{summary['compilations']} compilation(s) for {summary['signatures']} signature(s); "
      f"read {size(summary['bytes_read'])}, wrote {size(summary['bytes_written'])} "
      f"({size(summary['bytes_carried'])} of it copied through) in {summary['seconds']:.1f}s")
  return '\n'.join(lines)
