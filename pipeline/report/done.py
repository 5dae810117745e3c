"""Which outputs are done, known before any worker starts: `_surgery/done.json`.

A nightly rerun finds most of its checkpoints migrated already. A worker
proves each such skip with tens of storage requests (the input listed, the
output's metadata read, its attempt mark and lease looked for, its record
uploaded), after worker processes have started to do it. So the launcher
keeps, beside the report, what each output of this prefix was when a run
last found it verified: the source, spec hash and input identity it is the
migration of, and the output's own identity (`checkpoint.identity`: its
files' names, sizes and checksums or times, as committed).

A run reads that file once, lists its inputs once and its outputs once (one
paged listing each, on gs://, whatever the number of checkpoints), and
skips every pair whose input and output are exactly as recorded, with no
attempt, new twin or lease beside the output: all a worker would find.
Those are `skipped` in the report without reaching a worker; where all are,
no job starts. Every other pair goes to the workers, which prove or redo it
as before. So the file only ever saves work: an entry gone stale (an output
touched since), or lost to another run's rewrite of the file, costs a
worker's check, never a wrong skip. Each run rewrites it whole from its own
records when it reports.
"""
from __future__ import annotations

import json
from typing import Any, Iterable

from etils import epath

from pipeline.checkpoint import identity
from pipeline.report.records import record, report_dir, write_whole
from pipeline.storage import files

DONE_FILE = 'done.json'
_FORMAT = 1
# Beside an output, what an attempt under way (or a dead one) leaves: see
# `write.outputs` and `write.lease` (not imported: the launcher needs no JAX).
_BESIDE = ('.ckpt-surgery-attempt', '.ckpt-surgery-new', '.ckpt-surgery-lease')


def _path(prefix: str) -> epath.Path:
  return report_dir(prefix) / DONE_FILE


def read(prefix: str) -> dict[str, dict[str, Any]]:
  """{output: what it was when last found done}; {} where there is no such
  file, or one this version cannot read (it only saves work)."""
  try:
    found = json.loads(_path(prefix).read_text())
  except (FileNotFoundError, ValueError):
    return {}
  return found.get('outputs', {}) if found.get('format') == _FORMAT else {}


def known(pairs: list[tuple[str, str]], prefix: str, spec_hash: str) -> list[dict[str, Any]]:
  """The `skipped` records of the pairs whose outputs are done and untouched
  since, decided from `prefix`'s done file and one listing each of the
  inputs and of the outputs (see the module's docstring)."""
  entries = read(prefix)
  candidates = [(src, dst) for src, dst in pairs
                if (e := entries.get(dst)) and (e.get('src'), e.get('spec_hash')) == (src, spec_hash)]
  if not candidates:
    return []
  inputs = identity.identities([src for src, _ in candidates])
  outputs = identity.identities([dst + s for _, dst in candidates for s in ('', *_BESIDE)])
  return [record(src, dst, 'skipped', input_identity=inputs[src], output_identity=outputs[dst],
                 skipped_by='launcher')
          for src, dst in candidates
          if (inputs[src], outputs[dst]) == (entries[dst]['input_identity'],
                                              entries[dst]['output_identity'])
          and all(outputs[dst + s] == identity.NOTHING for s in _BESIDE)]


def update(prefix: str, records: Iterable[dict[str, Any]], spec_hash: str) -> None:
  """Rewrite `prefix`'s done file with what a run's `records` found: each
  output ok or skipped with its identities recorded is done; a failed one
  is not (what is there is unknown). Entries of outputs the run did not
  touch stay."""
  entries = read(prefix)
  for r in records:
    if r['status'] in ('ok', 'skipped') and r.get('input_identity') and r.get('output_identity'):
      entries[r['dst']] = {'src': r['src'], 'spec_hash': spec_hash,
                           'input_identity': r['input_identity'],
                           'output_identity': r['output_identity']}
    else:
      entries.pop(r['dst'], None)
  path = _path(prefix)
  if not files.is_gcs(path):
    path.parent.mkdir(parents=True, exist_ok=True)
  write_whole(path, json.dumps({'format': _FORMAT, 'outputs': entries}, sort_keys=True))
