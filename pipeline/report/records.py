"""The run's report: one record per checkpoint, the totals, a terminal table.

Each run has its own: `PREFIX/_surgery/runs/RUN/report.jsonl` holds every
record and `summary.json` the totals, and `PREFIX/_surgery/report.jsonl` and
`summary.json` are copies of the latest run's (what schedulers read). Two
runs into one prefix never lose each other's report. Both are written by the
pipeline's last step through etils.epath, so they land wherever PREFIX is (a
local folder or gs://), on any runner; the launcher reads its own run's back
to print the table and choose the exit code.

Every record is also saved on its own, by the worker, the moment its
checkpoint finishes (`runs/RUN/records/`): if a worker or the job dies, the
launcher still reports every checkpoint that finished, from those.

The run's spec is kept beside its report (`runs/RUN/spec.yaml`) so that the
HTML page (`html_page`) can be rebuilt later from what the run left.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import uuid
from typing import Any, Iterable

from etils import epath

from pipeline.storage import files

REPORT_DIR = '_surgery'
STATUSES = ('ok', 'skipped', 'failed')
WRITE_PATHS = ('copy_and_patch', 'copy_through', 'full')  # the ways an output is written, cheapest first


def record(src: str, dst: str, status: str, **fields: Any) -> dict[str, Any]:
  """One checkpoint's record, every field present."""
  base = {'src': src, 'dst': dst, 'status': status, 'error': None, 'bytes_in': 0,
          'bytes_out': 0, 'seconds': 0.0, 'signature': None, 'compiled': False, 'attempts': 1,
          'digest': None, 'bytes_carried': 0, 'write_path': None, 'why_not_patched': None,
          'bytes_copied_server_side': 0, 'bytes_uploaded': 0,
          'memory_budget': 0, 'packs': 0, 'why_not_streamed': None,
          'input_identity': None, 'output_identity': None,  # for the run's done file (`done`)
          'worker': f'{socket.gethostname()}:{os.getpid()}',
          'finished_at': time.time()}  # records are made as their checkpoint ends
  rec = {**base, **fields}
  rec.setdefault('compilations', int(rec['compiled']))  # a streamed checkpoint may make several
  return rec


def report_dir(prefix: str) -> epath.Path:
  return epath.Path(prefix) / REPORT_DIR


def new_run_id(started_at: float) -> str:
  """When the run started (UTC), and a few random letters: sortable, unique."""
  return time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(started_at)) + '-' + uuid.uuid4().hex[:6]


def run_dir(prefix: str, run: str) -> epath.Path:
  return report_dir(prefix) / 'runs' / run


SPEC_FILE = 'spec.yaml'


def check_writable(prefix: str, run: str) -> None:
  """Raise what storage says if the run cannot write its report: locally
  its directory is made; on GCS, which has no directories, a probe object
  is written and removed (a bucket that refuses writes, or deletes, says so
  here, before any checkpoint is touched, not as a failed report step)."""
  where = run_dir(prefix, run)
  if not files.is_gcs(where):
    where.mkdir(parents=True, exist_ok=True)
    return
  probe = where / '.probe'
  probe.write_text('ckpt-surgery checks that it can write its report here')
  files.remove_file(probe)


def save_spec(prefix: str, run: str, spec_text: str) -> None:
  write_whole(run_dir(prefix, run) / SPEC_FILE, spec_text)


def read_spec(prefix: str, run: str) -> str | None:
  """The run's spec, or None for a run that did not keep it."""
  path = run_dir(prefix, run) / SPEC_FILE
  return path.read_text() if path.exists() else None


def write_whole(path: epath.Path, text: str) -> None:
  """Write `path` so that no reader sees half of it: beside, then renamed
  (an object write on GCS is whole anyway)."""
  if files.is_gcs(path):
    path.write_text(text)
    return
  part = path.parent / f'.{path.name}.{uuid.uuid4().hex[:8]}.part'
  try:
    part.write_text(text)
    part.replace(path)  # epath.rename refuses to overwrite
  except BaseException:  # a full disk, say: no half-written part left behind
    files.remove_file(part)
    raise


def save_record(prefix: str, run: str, record: dict[str, Any]) -> None:
  """One finished checkpoint's record, on its own (see the module's docstring)."""
  records = run_dir(prefix, run) / 'records'
  records.mkdir(parents=True, exist_ok=True)
  name = hashlib.sha256(record['src'].encode()).hexdigest()[:24]
  write_whole(records / f'{name}.json', json.dumps(record))


KNOWN_FILE = 'known.jsonl'  # the records of checkpoints the launcher skipped (`done`)


def save_known(prefix: str, run: str, records: list[dict[str, Any]]) -> None:
  """The records of the checkpoints skipped before the job, in one file."""
  write_whole(run_dir(prefix, run) / KNOWN_FILE, ''.join(json.dumps(r) + '\n' for r in records))


def _records(prefix: str, run: str) -> list[epath.Path]:
  return [p for p in files.children(run_dir(prefix, run) / 'records') if p.name.endswith('.json')]


def count_records(prefix: str, run: str) -> int:
  """How many checkpoints have saved their record (a listing, nothing read)."""
  return len(_records(prefix, run))


def saved_records(prefix: str, run: str) -> list[dict[str, Any]]:
  """Every record the run saved: its workers' one by one, and its known ones."""
  known = run_dir(prefix, run) / KNOWN_FILE
  lines = known.read_text().splitlines() if known.exists() else []
  return [json.loads(p.read_text()) for p in _records(prefix, run)] + [json.loads(l) for l in lines]


def summarize(records: Iterable[dict[str, Any]], started_at: float) -> dict[str, Any]:
  records = list(records)
  summary: dict[str, Any] = {s: sum(r['status'] == s for r in records) for s in STATUSES}
  summary.update(
      checkpoints=len(records),
      compilations=sum(r.get('compilations', bool(r['compiled'])) for r in records),
      signatures=len({r['signature'] for r in records if r['signature']}),
      bytes_read=sum(r['bytes_in'] for r in records),
      bytes_written=sum(r['bytes_out'] for r in records),
      bytes_carried=sum(r.get('bytes_carried', 0) for r in records),  # of bytes_written: copied, not re-encoded
      bytes_copied_server_side=sum(r.get('bytes_copied_server_side', 0) for r in records),
      bytes_uploaded=sum(r.get('bytes_uploaded', 0) for r in records),
      write_paths={p: n for p in WRITE_PATHS
                   if (n := sum(r.get('write_path') == p for r in records if r['status'] == 'ok'))},
      peak_rss_over_idle=max((r.get('peak_rss_over_idle', 0) for r in records), default=0),  # of any worker
      peak_rss_over_idle_by_worker=_worker_peaks(records),
      memory_budget=max((r.get('memory_budget', 0) for r in records), default=0),  # per checkpoint in flight
      streamed=sum(bool(r.get('packs')) for r in records if r['status'] == 'ok'),
      seconds=round(time.time() - started_at, 3),
      started_at=started_at,  # identifies the run that wrote this summary
      checkpoint_seconds=round(sum(r['seconds'] for r in records), 3),
  )
  return summary


def _worker_peaks(records: list[dict[str, Any]]) -> dict[str, int]:
  """{worker: its peak resident memory over its idle footprint}: each
  record has the peak of its worker so far."""
  peaks: dict[str, int] = {}
  for r in records:
    if 'peak_rss_over_idle' in r:
      peaks[r['worker']] = max(peaks.get(r['worker'], 0), r['peak_rss_over_idle'])
  return peaks


def write_report(prefix: str, records: list[dict[str, Any]], started_at: float,
                 run: str | None = None, latest: bool = True) -> dict[str, Any]:
  """Write report.jsonl and summary.json for `run`, and (`latest`) as the
  latest under PREFIX/_surgery; the summary."""
  records = sorted(records, key=lambda r: r['src'])
  summary = {**summarize(records, started_at), 'run': run}
  texts = {'report.jsonl': ''.join(json.dumps(r) + '\n' for r in records),
           'summary.json': json.dumps(summary, indent=2) + '\n'}
  for out in ([run_dir(prefix, run)] if run else []) + ([report_dir(prefix)] if latest else []):
    out.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
      write_whole(out / name, text)
  return summary


def read_report(prefix: str, run: str | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """A run's records and summary (default: the latest run's)."""
  out = run_dir(prefix, run) if run else report_dir(prefix)
  lines = (out / 'report.jsonl').read_text().splitlines()
  return [json.loads(l) for l in lines if l], json.loads((out / 'summary.json').read_text())


def latest_run(prefix: str) -> str | None:
  """The run whose report is the latest under PREFIX (None for a report written without one)."""
  return json.loads((report_dir(prefix) / 'summary.json').read_text()).get('run')


def size(n: float) -> str:
  for unit in ('B', 'KB', 'MB', 'GB', 'TB'):
    if n < 1000 or unit == 'TB':
      return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
    n /= 1000
  raise AssertionError


SKIPPED_ROWS = 100  # more skipped checkpoints than this are one line of the table


def format_table(records: list[dict[str, Any]], summary: dict[str, Any]) -> str:
  """A short table: one row per checkpoint (the skipped ones as one line,
  where there are many: a nightly rerun skips thousands), errors in full,
  then the totals."""
  skipped = sum(r['status'] == 'skipped' for r in records)
  shown = [r for r in records if r['status'] != 'skipped' or skipped <= SKIPPED_ROWS]
  rows = [('status', 'seconds', 'bytes in', 'bytes out', 'checkpoint')]
  rows += [(r['status'], f"{r['seconds']:.2f}", size(r['bytes_in']), size(r['bytes_out']),
            r['src']) for r in shown]
  widths = [max(len(row[i]) for row in rows) for i in range(4)]
  lines = ['  '.join(c.ljust(w) for c, w in zip(row[:4], widths)) + '  ' + row[4] for row in rows]
  if len(shown) < len(records):
    lines.append(f'skipped  {skipped} checkpoint(s) done already (each in report.jsonl)')
  lines += [f"  error: {r['src']}: {r['error']}" for r in records if r['error']]
  lines.append(
      f"{summary['ok']} ok, {summary['skipped']} skipped, {summary['failed']} failed; "
      f"{summary['compilations']} compilation(s) for {summary['signatures']} signature(s); "
      f"read {size(summary['bytes_read'])}, wrote {size(summary['bytes_written'])} "
      f"({size(summary['bytes_carried'])} of it carried over) in {summary['seconds']:.1f}s"
      + ''.join(f"; {n} by {p.replace('_', '-')}" for p, n in summary.get('write_paths', {}).items())
      + (f"; {summary['streamed']} streamed under a budget of {size(summary['memory_budget'])}"
         if summary.get('streamed') else ''))
  return '\n'.join(lines)
