"""The run's report as one HTML page people can look at: `_surgery/report.html`.

The page is built from what the run left (report.jsonl, summary.json and the
spec kept beside them), so `ckpt-surgery report PREFIX` rebuilds it for any
earlier run. It is one self-contained file: inline CSS, inline SVG charts, a
small inline script that sorts and filters the table (the page reads fine
without it), nothing fetched, so it opens from a bucket download or an email
attachment. Past TABLE_ROWS checkpoints the table keeps every failure and the
slowest, and says so: 10,000 checkpoints stay well under 1 MB.

On it: the totals, failures grouped by error, throughput over the run's time
and seconds per checkpoint, what each write path moved, the spec and the
plan's diff per signature (planned again from one checkpoint's metadata), and
the table of every checkpoint. Status is always written out, never shown by
colour alone; every number carries its unit.
"""
from __future__ import annotations

import collections
import html
import time
from typing import Any

from etils import epath

import transforms
from pipeline import plan, report

PAGE = 'report.html'
TABLE_ROWS = 2000      # rows of the checkpoint table before it summarises
GROUP_CHECKPOINTS = 50  # checkpoints named under one failure group
FAILURE_GROUPS = 50    # failure groups shown before they are summarised
OPEN_GROUPS = 3        # failure groups shown open, their checkpoints listed
MARKS = {'ok': '✓ ok', 'skipped': '– skipped', 'failed': '✗ failed'}


def write(prefix: str, run: str | None = None) -> epath.Path:
  """Build the page of `run` (default: the latest) and write it beside its
  report, and as `_surgery/report.html` when it is the latest run's; its path."""
  records, summary = report.read_report(prefix, run)
  latest = report.latest_run(prefix)
  run = run or latest
  spec_text = report.read_spec(prefix, run) if run else None
  text = build(records, summary, spec_text, plan_signatures(records, spec_text))
  pages = ([report.run_dir(prefix, run) / PAGE] if run else []) + (
      [report.report_dir(prefix) / PAGE] if run == latest else [])
  for page in pages:
    report.write_whole(page, text)
  return pages[0]


def plan_signatures(records: list[dict[str, Any]], spec_text: str | None) -> dict[str, Any] | str:
  """The plan of one checkpoint per signature of the run (metadata only), by
  signature; or why there is none (no spec kept, inputs gone, ...)."""
  if spec_text is None:
    return 'this run did not keep its spec, so its plan cannot be made again'
  one_each = {r['signature']: r['src'] for r in records if r['signature']}
  try:
    result = plan.plan_checkpoints(list(one_each.values()), transforms.load_spec(spec_text))
  except Exception as e:  # the page still shows everything else
    return f'the plan could not be made again: {type(e).__name__}: {e}'
  planned = {g['checkpoints'][0]: g for g in result['groups']}
  missing = {u['src']: u['error'] for u in result['unreadable']}
  return {sig: planned.get(src) or {'error': f'{src} is not readable now: {missing.get(src)}'}
          for sig, src in one_each.items()}


def build(records: list[dict[str, Any]], summary: dict[str, Any], spec_text: str | None,
          plans: dict[str, Any] | str) -> str:
  """The page's HTML (pure: no I/O)."""
  started = time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(summary['started_at']))
  title = f"ckpt-surgery run {summary.get('run') or ''}".strip()
  return ''.join([
      '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">',
      f'<title>{_e(title)}</title><style>{CSS}</style></head><body>',
      f'<h1>{_e(title)}</h1><p>Started {started}. The data: '
      '<a href="report.jsonl">report.jsonl</a> (one record per checkpoint), '
      '<a href="summary.json">summary.json</a> (the totals).</p>',
      _totals(summary), _failures(records), _charts(records, summary),
      _write_paths(records), _spec_and_plans(records, spec_text, plans), _table(records),
      f'<script>{SCRIPT}</script></body></html>\n'])


def _e(value: Any) -> str:
  return html.escape(str(value), quote=True)


def _seconds(s: float) -> str:
  return f'{s:.2f} s' if s < 600 else f'{s / 60:.1f} min'


TOTALS = (  # (summary key, label, unit)
    ('checkpoints', 'checkpoints', ''), ('ok', 'ok', ''), ('skipped', 'skipped', ''),
    ('failed', 'failed', ''), ('bytes_read', 'bytes read', 'bytes'),
    ('bytes_written', 'bytes written', 'bytes'),
    ('bytes_carried', 'of it carried over (not re-encoded)', 'bytes'),
    ('bytes_copied_server_side', 'copied server-side', 'bytes'),
    ('bytes_uploaded', 'uploaded', 'bytes'), ('compilations', 'compilations', ''),
    ('signatures', 'signatures', ''), ('seconds', 'wall time', 'seconds'),
    ('checkpoint_seconds', 'checkpoint time (sum over workers)', 'seconds'),
    ('peak_rss_over_idle', 'peak memory of a worker over its idle footprint', 'bytes'))


def _totals(summary: dict[str, Any]) -> str:
  cells = []
  for key, label, unit in TOTALS:
    value = summary.get(key, 0)
    shown = report.size(value) if unit == 'bytes' else _seconds(value) if unit == 'seconds' else value
    cells.append(f'<div class="total"><dt>{_e(label)}</dt>'
                 f'<dd data-key="{key}" data-v="{_e(value)}">{_e(shown)}</dd></div>')
  return f'<h2>Totals</h2><dl class="totals">{"".join(cells)}</dl>'


def failure_groups(records: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
  """(error, checkpoints) for the failed records, the largest group first; an
  error that names its own checkpoint is grouped with the checkpoint left out."""
  groups = collections.defaultdict(list)
  for r in records:
    if r['status'] == 'failed':
      groups[(r['error'] or 'no error recorded').replace(r['src'], '{checkpoint}')].append(r['src'])
  return sorted(groups.items(), key=lambda g: (-len(g[1]), g[0]))


def _failures(records: list[dict[str, Any]]) -> str:
  groups = failure_groups(records)
  if not groups:
    return '<h2>Failures</h2><p>None: no checkpoint failed.</p>'
  parts = [f'<h2>Failures</h2><p>{sum(len(g) for _, g in groups)} failed checkpoint(s), '
           f'{len(groups)} distinct error(s).</p>']
  for i, (error, srcs) in enumerate(groups[:FAILURE_GROUPS]):
    more = (f'<li>… and {len(srcs) - GROUP_CHECKPOINTS} more (see the table)</li>'
            if len(srcs) > GROUP_CHECKPOINTS else '')
    shown_open = ' open' if i < OPEN_GROUPS else ''
    parts.append(f'<details class="failure" data-count="{len(srcs)}"{shown_open}><summary><b>{len(srcs)} ×</b> '
                 f'<code>{_e(error)}</code></summary><ul>'
                 + ''.join(f'<li>{_e(s)}</li>' for s in srcs[:GROUP_CHECKPOINTS]) + more + '</ul></details>')
  if len(groups) > FAILURE_GROUPS:
    rest = groups[FAILURE_GROUPS:]
    parts.append(f'<p>… and {len(rest)} more error(s), {sum(len(g) for _, g in rest)} checkpoint(s): '
                 'see the table.</p>')
  return ''.join(parts)


W, H, LEFT, RIGHT, BOTTOM = 640, 220, 56, 28, 40  # chart size and the room for axis labels


def _chart(title: str, x_label: str, y_label: str, x_max: float, y_max: float, body: str,
           x_unit: str) -> str:
  """An SVG frame: axes with 0, half and full ticks, labelled with units."""
  ticks = []
  for f in (0, 0.5, 1):
    x, y = LEFT + f * (W - LEFT - RIGHT), H - BOTTOM - f * (H - BOTTOM - 10)
    ticks.append(f'<text x="{x:.0f}" y="{H - BOTTOM + 16}" text-anchor="middle">'
                 f'{_e(_number(f * x_max, x_unit))}</text>'
                 f'<text x="{LEFT - 6}" y="{y + 4:.0f}" text-anchor="end">{_number(f * y_max, "")}</text>'
                 f'<line class="grid" x1="{LEFT}" x2="{W - RIGHT}" y1="{y:.0f}" y2="{y:.0f}"/>')
  return (f'<figure><svg viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" '
          f'aria-label="{_e(title)}"><title>{_e(title)}</title>{"".join(ticks)}{body}'
          f'<line class="axis" x1="{LEFT}" y1="{H - BOTTOM}" x2="{W - RIGHT}" y2="{H - BOTTOM}"/>'
          f'<line class="axis" x1="{LEFT}" y1="10" x2="{LEFT}" y2="{H - BOTTOM}"/>'
          f'<text x="{(W + LEFT) / 2:.0f}" y="{H - 6}" text-anchor="middle">{_e(x_label)}</text>'
          f'<text transform="translate(14 {(H - BOTTOM) / 2:.0f}) rotate(-90)" text-anchor="middle">'
          f'{_e(y_label)}</text></svg><figcaption>{_e(title)}</figcaption></figure>')


def _number(value: float, unit: str) -> str:
  text = f'{value:.0f}' if value >= 10 or value == int(value) else f'{value:.2g}'
  return f'{text} {unit}'.strip()


def _charts(records: list[dict[str, Any]], summary: dict[str, Any]) -> str:
  return f'<h2>Time</h2><div class="charts">{_throughput(records, summary)}{_histogram(records)}</div>'


def _throughput(records: list[dict[str, Any]], summary: dict[str, Any]) -> str:
  """Checkpoints finished over the run's time: a step line."""
  ends = sorted(r['finished_at'] - summary['started_at'] for r in records if r.get('finished_at'))
  if not ends:
    return ('<p>No throughput chart: these records carry no finish times (written by an '
            'older version, or no checkpoint finished).</p>')
  x_max = max(summary['seconds'], ends[-1], 1e-3)
  sx = lambda t: LEFT + max(t, 0) / x_max * (W - LEFT - RIGHT)
  sy = lambda n: H - BOTTOM - n / len(ends) * (H - BOTTOM - 10)
  done_by_pixel = {round(sx(t)): n for n, t in enumerate(ends, 1)}  # one step per pixel column
  points, before = [f'{sx(0):.1f},{sy(0):.1f}'], 0
  for x, n in done_by_pixel.items():
    points += [f'{x},{sy(before):.1f}', f'{x},{sy(n):.1f}']
    before = n
  rate = len(ends) / x_max * 60
  body = f'<polyline class="line" points="{" ".join(points)}"/>'
  return _chart(f'Checkpoints finished over the run: {len(ends)} in {_seconds(x_max)}, '
                f'{rate:.1f} per minute on average', 'seconds since the run started',
                'checkpoints finished', x_max, len(ends), body, 's')


def _histogram(records: list[dict[str, Any]], bins: int = 12) -> str:
  """How many checkpoints took how long: bars labelled with their counts."""
  seconds = [r['seconds'] for r in records]
  if not seconds:
    return '<p>No checkpoints.</p>'
  top = max(max(seconds), 1e-3)
  counts = [0] * bins
  for s in seconds:
    counts[min(int(s / top * bins), bins - 1)] += 1
  width = (W - LEFT - RIGHT) / bins
  bars = []
  for i, n in enumerate(counts):
    h = n / max(counts) * (H - BOTTOM - 24)
    x, y = LEFT + i * width, H - BOTTOM - h
    bars.append(f'<rect class="bar" x="{x + 1:.1f}" y="{y:.1f}" width="{width - 2:.1f}" height="{h:.1f}">'
                f'<title>{n} checkpoint(s) took {i * top / bins:.2f}–{(i + 1) * top / bins:.2f} s</title></rect>'
                + (f'<text x="{x + width / 2:.1f}" y="{y - 3:.1f}" text-anchor="middle">{n}</text>' if n else ''))
  return _chart(f'Seconds per checkpoint: median {sorted(seconds)[len(seconds) // 2]:.2f} s, '
                f'slowest {top:.2f} s', 'seconds per checkpoint', 'checkpoints', top,
                max(counts), ''.join(bars), 's')


def path_label(r: dict[str, Any]) -> str:
  """How an ok checkpoint was written, or the status of the others."""
  if r['status'] != 'ok':
    return r['status']
  return (r.get('write_path') or 'unknown').replace('_', '-')


PATH_LABELS = (*(p.replace('_', '-') for p in report.WRITE_PATHS), 'unknown', 'skipped', 'failed')
WRITE_PATH_BYTES = ('bytes_in', 'bytes_out', 'bytes_carried', 'bytes_copied_server_side',
                    'bytes_uploaded')


def _write_paths(records: list[dict[str, Any]]) -> str:
  """Per write path (and for skipped and failed): count, time, bytes moved."""
  by = {label: [] for label in PATH_LABELS}  # in this order
  for r in records:
    by[path_label(r)].append(r)
  head = ('write path', 'checkpoints', 'seconds (sum)', 'seconds (mean)', 'bytes read',
          'bytes written', 'carried over', 'copied server-side', 'uploaded')
  rows = []
  for label, rs in ((label, rs) for label, rs in by.items() if rs):
    total = sum(r['seconds'] for r in rs)
    cells = [f'<td>{len(rs)}</td><td>{_seconds(total)}</td><td>{_seconds(total / len(rs))}</td>']
    cells += [f'<td data-v="{sum(r.get(k, 0) for r in rs)}">{report.size(sum(r.get(k, 0) for r in rs))}</td>'
              for k in WRITE_PATH_BYTES]
    rows.append(f'<tr data-path="{_e(label)}"><th scope="row">{_e(label)}</th>{"".join(cells)}</tr>')
  return ('<h2>Write paths</h2><table class="paths"><thead><tr>'
          + ''.join(f'<th scope="col">{h}</th>' for h in head) + f'</tr></thead><tbody>{"".join(rows)}'
          '</tbody></table>')


SPEC_SHOWN = 20_000  # characters of the spec on the page: a page stays a page


def _spec_and_plans(records: list[dict[str, Any]], spec_text: str | None,
                    plans: dict[str, Any] | str) -> str:
  parts = ['<h2>The surgery</h2>']
  if spec_text is None:
    parts.append('<p>This run did not keep its spec.</p>')
  elif len(spec_text) > SPEC_SHOWN:
    parts.append(f'<pre class="spec">{_e(spec_text[:SPEC_SHOWN])}</pre><p>The spec is '
                 f'{report.size(len(spec_text.encode()))}: its first {SPEC_SHOWN:,} characters '
                 f'are shown; the whole of it is {report.SPEC_FILE} beside this page.</p>')
  else:
    parts.append(f'<pre class="spec">{_e(spec_text)}</pre>')
  if isinstance(plans, str):
    return ''.join(parts + [f'<p class="unavailable">The plan is unavailable: {_e(plans)}.</p>'])
  counts = collections.Counter(r['signature'] for r in records if r['signature'])
  if not plans:
    parts.append('<p>No plan: no checkpoint of this run was read far enough to know its signature.</p>')
  for sig, group in plans.items():
    parts.append(f'<section class="plan" data-signature="{_e(sig)}"><h3>Signature <code>{_e(sig)}'
                 f'</code>: {counts[sig]} checkpoint(s)</h3>')
    if group.get('error'):
      parts.append(f'<p>Not planned: <code>{_e(group["error"])}</code></p></section>')
      continue
    parts.append(f'<p>Planned from <code>{_e(group["checkpoints"][0])}</code>; written by '
                 f'{_e(group["write_path"].replace("_", "-"))}'
                 + (f' ({_e(group["why_not_patched"])})' if group['why_not_patched'] else '') + '.</p>')
    if group['changes']:
      parts.append('<table class="diff"><thead><tr><th scope="col">change</th><th scope="col">path'
                   '</th><th scope="col">detail</th></tr></thead><tbody>'
                   + ''.join(f'<tr><td>{_e(c["kind"])}</td><td><code>{_e(c["path"])}</code></td>'
                             f'<td><code>{_e(c["detail"])}</code></td></tr>' for c in group['changes'])
                   + '</tbody></table>')
    else:
      parts.append('<p>No param leaf renamed, added, dropped, reshaped or re-typed.</p>')
    parts.append('</section>')
  return ''.join(parts)


def table_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """The records the table shows: all of them, or past TABLE_ROWS every
  failure and then the slowest."""
  if len(records) <= TABLE_ROWS:
    return records
  ranked = sorted(records, key=lambda r: (r['status'] != 'failed', -r['seconds']))
  return sorted(ranked[:TABLE_ROWS], key=lambda r: r['src'])


def _checkpoint(r: dict[str, Any]) -> str:
  """A row's checkpoint; a merge's group, with its inputs' steps (their paths on hover)."""
  if not r.get('inputs'):
    return _e(r['src'])
  steps = ', '.join(map(str, r.get('steps') or []))
  return (f'{_e(r["src"])}<br><small title="{_e(chr(10).join(r["inputs"]))}">merge of '
          f'{len(r["inputs"])} checkpoint(s), steps {_e(steps)}</small>')


def _table(records: list[dict[str, Any]]) -> str:
  shown = table_rows(records)
  note = ('' if len(shown) == len(records) else
          f'<p class="note">Showing {len(shown)} of {len(records)} checkpoints: every failure, then '
          'the slowest. Every checkpoint is in <a href="report.jsonl">report.jsonl</a>.</p>')
  head = ''.join(f'<th scope="col" data-sort="{kind}">{name}</th>' for name, kind in (
      ('status', 'text'), ('seconds', 'number'), ('bytes read', 'number'),
      ('bytes written', 'number'), ('write path', 'text'), ('worker', 'text'),
      ('checkpoint', 'text'), ('error', 'text')))
  rows = ''.join(
      f'<tr class="{_e(r["status"])}"><td>{MARKS.get(r["status"], _e(r["status"]))}</td>'
      f'<td data-v="{r["seconds"]}">{r["seconds"]:.2f} s</td>'
      f'<td data-v="{r["bytes_in"]}">{report.size(r["bytes_in"])}</td>'
      f'<td data-v="{r["bytes_out"]}">{report.size(r["bytes_out"])}</td>'
      f'<td>{_e((r.get("write_path") or "").replace("_", "-"))}</td><td>{_e(r.get("worker") or "")}</td>'
      f'<td>{_checkpoint(r)}</td><td>{_e(r["error"] or "")}</td></tr>' for r in shown)
  return (f'<h2>Checkpoints</h2>{note}<p><label>Filter: <input id="filter" type="search" '
          'placeholder="status, path, error, worker…"></label> Click a column\'s heading to sort.</p>'
          f'<table id="checkpoints"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>')


CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#1d1d1f;padding:0 16px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ccc}
.totals{display:grid;grid-template-columns:repeat(auto-fill,minmax(190px,1fr));gap:8px}
.total{border:1px solid #ddd;border-radius:4px;padding:6px 10px}
dt{font-size:12px;color:#555}dd{margin:0;font-size:18px;font-variant-numeric:tabular-nums}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}
td,th{border-bottom:1px solid #e4e4e4;padding:3px 8px;text-align:left;vertical-align:top}
td[data-v]{text-align:right}thead th{background:#f3f3f3;position:sticky;top:0}
th[data-sort]{cursor:pointer}th[aria-sort=ascending]::after{content:" ▲"}
th[aria-sort=descending]::after{content:" ▼"}
tr.failed td:first-child{font-weight:bold;color:#a00}tr.skipped td:first-child{color:#666}
#checkpoints td:first-child{white-space:nowrap}#checkpoints td:nth-child(7),#checkpoints td:nth-child(8){word-break:break-all}
.charts{display:flex;flex-wrap:wrap;gap:16px}figure{margin:0}figcaption{font-size:12px;color:#444}
svg text{font-size:11px;fill:#333}.axis{stroke:#333}.grid{stroke:#e4e4e4}
.line{fill:none;stroke:#1f5fa8;stroke-width:2}.bar{fill:#1f5fa8}
pre.spec{background:#f6f6f6;padding:8px;overflow:auto}details{margin:4px 0}
.failure summary{cursor:pointer}code{font-size:12px}
"""

# Sorts by a clicked heading (numbers by their exact value) and filters rows
# by text. Without it the table is the same table, in checkpoint order.
SCRIPT = """
(function(){var t=document.getElementById('checkpoints');if(!t)return;var b=t.tBodies[0];
function v(r,i){var c=r.cells[i];return c.dataset.v!==undefined?parseFloat(c.dataset.v):c.textContent;}
Array.prototype.forEach.call(t.tHead.rows[0].cells,function(h,i){h.addEventListener('click',function(){
var up=h.getAttribute('aria-sort')!=='ascending';Array.prototype.forEach.call(t.tHead.rows[0].cells,
function(o){o.removeAttribute('aria-sort');});h.setAttribute('aria-sort',up?'ascending':'descending');
var rows=Array.prototype.slice.call(b.rows);rows.sort(function(x,y){var a=v(x,i),c=v(y,i);
return (a<c?-1:a>c?1:0)*(up?1:-1);});rows.forEach(function(r){b.appendChild(r);});});});
document.getElementById('filter').addEventListener('input',function(e){var q=e.target.value.toLowerCase();
Array.prototype.forEach.call(b.rows,function(r){r.hidden=q&&r.textContent.toLowerCase().indexOf(q)<0;});});
})();
"""
