"""The run's HTML report page: every figure and row against the run's own
summary.json and report.jsonl, nothing fetched, user strings escaped."""
from __future__ import annotations

import html.parser
import shutil
import subprocess
import time

import pytest
from etils import epath

from pipeline import plan, report
from pipeline.report import html_page
from transforms import load_spec
from pipeline.demo import SEED_SPEC
from tests.test_cli import cli

RENAME_SPEC = "ops: [{rename: {match: '^Dense_1/', to: 'Head/'}}]\n"


class Page(html.parser.HTMLParser):
  """What a test checks on the page: the totals, the checkpoint table's rows,
  the failure groups, the plan sections, every src and href, the scripts."""

  def __init__(self, text: str):
    super().__init__()
    self.totals, self.rows, self.failures, self.signatures, self.links = {}, [], [], [], []
    self.scripts, self.text = 0, []
    self._in, self._cell = [], None
    self.feed(text)

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    self.links += [attrs[k] for k in ('src', 'href') if k in attrs]
    self.scripts += tag == 'script'
    if tag == 'dd' and 'data-key' in attrs:
      self.totals[attrs['data-key']] = attrs['data-v']
    if tag == 'table' and attrs.get('id') == 'checkpoints':
      self._in.append('checkpoints')
    if tag == 'tr' and 'checkpoints' in self._in and self._cell is None and 'class' in attrs:
      self.rows.append([])
    if tag == 'td' and 'checkpoints' in self._in and self.rows:
      self._cell = {'text': '', 'v': attrs.get('data-v')}
    if tag == 'details':
      self.failures.append({'count': int(attrs['data-count']), 'error': '', 'checkpoints': []})
      self._in.append('details')
    if tag == 'li' and 'details' in self._in:
      self.failures[-1]['checkpoints'].append('')
      self._in.append('li')
    if tag == 'code' and 'details' in self._in and not self.failures[-1]['checkpoints']:
      self._in.append('error')
    if tag == 'section':
      self.signatures.append(attrs['data-signature'])

  def handle_endtag(self, tag):
    if tag == 'table' and self._in[-1:] == ['checkpoints']:
      self._in.pop()
    if tag == 'td' and self._cell is not None:
      self.rows[-1].append(self._cell)
      self._cell = None
    if tag in ('details', 'li') or tag == 'code' and self._in[-1:] == ['error']:
      self._in.pop()

  def handle_data(self, data):
    self.text.append(data)
    if self._cell is not None:
      self._cell['text'] += data
    elif self._in[-1:] == ['error']:
      self.failures[-1]['error'] += data
    elif self._in[-1:] == ['li']:
      self.failures[-1]['checkpoints'][-1] += data


def check_page(text: str, records: list[dict], summary: dict) -> Page:
  """Every figure against the summary, every row against the records."""
  page = Page(text)
  for key, _, _ in html_page.TOTALS:
    assert page.totals[key] == str(summary[key]), key
  assert len(page.rows) == len(records)
  shown = {row[6]['text']: row for row in page.rows}
  for r in records:
    row = shown[r['src']]
    assert r['status'] in row[0]['text']
    assert float(row[1]['v']) == r['seconds'] and row[1]['text'] == f"{r['seconds']:.2f} s"
    assert int(row[2]['v']) == r['bytes_in'] and int(row[3]['v']) == r['bytes_out']
    assert row[4]['text'] == (r['write_path'] or '').replace('_', '-')
    assert row[5]['text'] == r['worker'] and row[7]['text'] == (r['error'] or '')
  failed = [r for r in records if r['status'] == 'failed']
  assert sum(f['count'] for f in page.failures) == len(failed)
  assert sorted(s for f in page.failures for s in f['checkpoints']) == sorted(r['src'] for r in failed)
  for f in page.failures:  # each group's checkpoints share its error
    assert {next(r for r in failed if r['src'] == s)['error'].replace(s, '{checkpoint}')
            for s in f['checkpoints']} == {f['error']}
  assert page.scripts == 1  # ours, inline
  assert not [l for l in page.links if 'http' in l], page.links  # nothing fetched
  return page


def made_up_records(started_at: float) -> list[dict]:
  bad = '/in/<script>alert(1)</script>&co'
  return [
      report.record('/in/a', '/out/a', 'ok', bytes_in=2000, bytes_out=1900, bytes_carried=1500,
                    seconds=1.25, signature='s1', compiled=True, write_path='copy_and_patch',
                    finished_at=started_at + 2),
      report.record('/in/b', '/out/b', 'ok', bytes_in=3000, bytes_out=3000, seconds=0.5,
                    signature='s1', write_path='full', finished_at=started_at + 3),
      report.record('/in/c', '/out/c', 'skipped', finished_at=started_at + 1),
      report.record('/in/d', '/out/d', 'failed', error='CheckpointError: /in/d: no _METADATA'),
      report.record('/in/e', '/out/e', 'failed', error='CheckpointError: /in/e: no _METADATA'),
      report.record(bad, '/out/x', 'failed', error='ValueError: <b>bold</b> & "quoted"'),
  ]


def test_page_shows_every_figure_and_row_of_the_report(tmp_path):
  started_at = time.time() - 4
  prefix = str(tmp_path / 'out')
  summary = report.write_report(prefix, made_up_records(started_at), started_at, run='r1')
  report.save_spec(prefix, 'r1', SEED_SPEC)
  path = html_page.write(prefix, 'r1')
  assert path == report.run_dir(prefix, 'r1') / 'report.html'
  text = path.read_text()
  assert (report.report_dir(prefix) / 'report.html').read_text() == text  # the latest
  records, summary_back = report.read_report(prefix, 'r1')
  assert summary_back == summary
  page = check_page(text, records, summary)
  assert [f['count'] for f in page.failures] == [2, 1]
  assert page.failures[0]['error'] == 'CheckpointError: {checkpoint}: no _METADATA'
  assert '<script>alert' not in text and '&lt;script&gt;alert(1)&lt;/script&gt;&amp;co' in text
  assert '<b>bold' not in text
  assert "normalize: {match: '^Dense_1/kernel$'}" in ''.join(page.text)  # the spec
  assert 'not readable now' in text  # its inputs are made up: the plan says why it is missing
  assert len(text) < 100_000


def test_each_run_into_one_prefix_keeps_its_own_page(tmp_path):
  prefix = str(tmp_path / 'out')
  first, second = made_up_records(time.time())[:2], made_up_records(time.time())[2:]
  report.write_report(prefix, first, time.time(), run='r1')
  report.write_report(prefix, second, time.time(), run='r2')
  for run, records in (('r1', first), ('r2', second)):
    check_page(html_page.write(prefix, run).read_text(), *report.read_report(prefix, run))
  latest = (report.report_dir(prefix) / 'report.html').read_text()
  assert latest == (report.run_dir(prefix, 'r2') / 'report.html').read_text()
  assert 'this run did not keep its spec' in latest  # the plan is unavailable, and says why


def test_page_on_gcs(bucket):
  prefix = f'{bucket}/out'
  started_at = time.time()
  summary = report.write_report(prefix, made_up_records(started_at), started_at, run='r1')
  report.save_spec(prefix, 'r1', SEED_SPEC)
  path = html_page.write(prefix, 'r1')
  assert str(path) == f'{prefix}/_surgery/runs/r1/report.html'
  check_page(epath.Path(f'{prefix}/_surgery/report.html').read_text(),
             report.read_report(prefix, 'r1')[0], summary)


def test_ten_thousand_checkpoints_stay_well_under_a_megabyte():
  started_at = time.time()
  records = [report.record(f'gs://lab/sweeps/2026-11/run_{i:05d}/checkpoints/{1000 * i}',
                           f'gs://lab/v2/run_{i:05d}/checkpoints/{1000 * i}',
                           'failed' if i % 100 == 0 else 'ok', seconds=1 + i % 37 / 10,
                           error=f'ValueError: bad leaf {i % 3}' if i % 100 == 0 else None,
                           bytes_in=35_000_000, bytes_out=35_000_000, write_path='copy_and_patch',
                           signature=f's{i % 4}', finished_at=started_at + i / 10)
             for i in range(10_000)]
  summary = report.summarize(records, started_at)
  text = html_page.build(records, summary, SEED_SPEC, 'not planned in this test')
  print(f'page for 10,000 checkpoints: {len(text.encode()):,} bytes')
  assert len(text.encode()) < 600_000
  page = Page(text)
  assert len(page.rows) == html_page.TABLE_ROWS
  failed = {r['src'] for r in records if r['status'] == 'failed'}
  assert failed <= {row[6]['text'] for row in page.rows}  # every failure is in the table
  assert 'Showing 2000 of 10000 checkpoints' in text
  assert [f['count'] for f in page.failures] == [34, 33, 33]


def test_a_huge_spec_is_shown_in_part():
  started_at = time.time()
  records = made_up_records(started_at)
  spec = SEED_SPEC + '# ' + 'x' * 50_000_000 + '\n'  # 50 MB, most of it one comment
  text = html_page.build(records, report.summarize(records, started_at), spec, 'not planned')
  assert len(text) < 100_000 and 'The spec is 50.0 MB' in text


def test_plan_diff_per_signature(samples):
  src = str(samples / 'in' / 'run_b')
  spec_text = RENAME_SPEC
  (group,) = plan.plan_checkpoints([src], load_spec(spec_text))['groups']
  records = [report.record(src, '/out/b', 'ok', signature=group['signature'])]
  plans = html_page.plan_signatures(records, spec_text)
  text = html_page.build(records, report.summarize(records, time.time()), spec_text, plans)
  page = Page(text)
  assert page.signatures == [group['signature']]
  shown = ''.join(page.text)
  assert 'renamed' in shown and 'Dense_1/kernel' in shown and 'Head/kernel' in shown


def test_cli_run_writes_the_page_and_report_rebuilds_it(inputs, tmp_path):
  spec = tmp_path / 'spec.yaml'
  spec.write_text(RENAME_SPEC)
  out = tmp_path / 'out'
  first = cli('run', '--input', inputs / 'run_b', '--output', out, '--spec', spec)
  assert first.returncode == 0, first.stderr
  for f in (inputs / 'run_c').glob('ocdbt.process_*/d/*'):
    f.write_bytes(b'truncated')
  second = cli('run', '--input', inputs / '*', '--output', out, '--spec', spec)
  assert second.returncode == 1, second.stderr
  latest = report.latest_run(str(out))
  page_path = report.run_dir(str(out), latest) / 'report.html'
  assert second.stdout.splitlines()[-1] == f'report page: {page_path}'
  records, summary = report.read_report(str(out))
  assert {r['status'] for r in records} == {'ok', 'skipped', 'failed'}
  text = (out / '_surgery' / 'report.html').read_text()
  page = check_page(text, records, summary)
  assert 'Head/kernel' in ''.join(page.text) and len(page.signatures) == 1
  # Rebuilt for the first run, with its inputs gone: the page says the plan is unavailable.
  (first_run,) = [p.name for p in (out / '_surgery' / 'runs').iterdir() if p.name != latest]
  shutil.rmtree(inputs)
  again = cli('report', out, '--run', first_run)
  assert again.returncode == 0, again.stderr
  rebuilt = (out / '_surgery' / 'runs' / first_run / 'report.html').read_text()
  check_page(rebuilt, *report.read_report(str(out), first_run))
  assert 'not readable now' in rebuilt
  assert (out / '_surgery' / 'report.html').read_text() == text  # still the latest run's
  missing = cli('report', tmp_path / 'nowhere')
  assert missing.returncode == 2 and 'no report at' in missing.stderr


def test_chromium_renders_the_page(tmp_path):
  browser = shutil.which('chromium') or shutil.which('chromium-browser')
  if not browser:
    pytest.skip('Chromium is not installed (Debian: apt-get install chromium): '
                'the page was not rendered in a browser')
  started_at = time.time() - 4
  report.write_report(str(tmp_path), made_up_records(started_at), started_at, run='r1')
  page = html_page.write(str(tmp_path), 'r1')
  shot = tmp_path / 'page.png'
  result = subprocess.run(
      [browser, '--headless', '--no-sandbox', '--disable-gpu', '--enable-logging=stderr',
       '--window-size=1100,1600', f'--screenshot={shot}', f'file://{page}'],
      capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert shot.stat().st_size > 10_000
  assert 'Uncaught' not in result.stderr and 'CONSOLE' not in result.stderr, result.stderr
