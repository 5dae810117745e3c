"""`plan`: what run would do, from metadata alone, grouped by signature."""
from __future__ import annotations

import json

import optax
import orbax.checkpoint as ocp
from etils import epath

import transforms
from pipeline import checkpoint, migrate
from pipeline.compute import worker
from tests.conftest import mlp, trained
from tests.test_cli import cli

SPEC = """\
ops:
  - rename: {match: '^Dense_1/', to: 'Head/'}
  - cast: {match: '^Conv_0/', dtype: bfloat16}
  - pad: {match: '^Dense_0/bias$', axis: 0, to: 300, mirror_init: zeros}
  - drop: {match: '^Conv_1/bias$'}
  - add: {path: 'Extra/bias', shape: [10]}
"""
EXPECTED = [
    ('retyped', 'Conv_0/bias', 'float32 -> bfloat16'),
    ('retyped', 'Conv_0/kernel', 'float32 -> bfloat16'),
    ('dropped', 'Conv_1/bias', '(64,) float32'),
    ('reshaped', 'Dense_0/bias', '(256,) -> (300,)'),
    ('renamed', 'Dense_1/bias', 'Head/bias'),
    ('renamed', 'Dense_1/kernel', 'Head/kernel'),
    ('added', 'Extra/bias', '(10,) float32'),
]


def plan_json(tmp_path, pattern, spec_text=SPEC):
  spec = tmp_path / 'spec.yaml'
  spec.write_text(spec_text)
  result = cli('plan', '--input', pattern, '--spec', spec, '--json')
  return result, json.loads(result.stdout) if result.stdout.startswith('{') else None


def test_plan_reads_no_array_bytes_and_groups_by_signature(inputs, tmp_path):
  for data in inputs.glob('**/ocdbt.process_*/d/*'):
    data.unlink()  # the arrays are gone; the metadata is all plan needs
  result, plan = plan_json(tmp_path, inputs / '*')
  assert result.returncode == 0, result.stderr
  (group,) = plan['groups']
  assert len(group['checkpoints']) == 6 and group['error'] is None
  assert [(c['kind'], c['path'], c['detail']) for c in group['changes']] == EXPECTED
  assert [(o['op'], o['matched']) for o in group['ops']] == [
      ('ops[0] rename', 2), ('ops[1] cast', 2), ('ops[2] pad', 1), ('ops[3] drop', 1), ('ops[4] add', 1)]
  assert group['bytes_before']['params'] - group['bytes_after']['params'] == (
      2 * 288 + 2 * 32 + 4 * 64 - 4 * (300 - 256) - 4 * 10)  # Conv_0 halves, Conv_1/bias, pad, add
  text = cli('plan', '--input', inputs / '*', '--spec', tmp_path / 'spec.yaml').stdout
  assert 'renamed   Dense_1/kernel  -> Head/kernel' in text
  assert text.splitlines()[-1].startswith('6 would migrate, 0 would fail (1 signature(s)')


def test_plan_predicts_what_run_writes(inputs, tmp_path):
  src, dst = inputs / 'run_b', tmp_path / 'out'
  worker.WORKER.clear()
  rec = migrate.migrate_one(str(src), str(dst), worker.surgery_for(SPEC))
  assert rec['status'] == 'ok'
  predicted = transforms.plan(transforms.Surgery(transforms.load_spec(SPEC)),
                              checkpoint.read_metadata(epath.Path(src))[1])
  before = transforms.flatten(checkpoint.read_metadata(epath.Path(src))[1]['params'])
  after = transforms.flatten(checkpoint.read_metadata(epath.Path(dst))[1]['params'])
  for kind, path, detail in predicted.changes:
    if kind == 'renamed':
      assert detail in after and path not in after
    elif kind == 'dropped':
      assert path not in after
    elif kind == 'added':
      assert f'{tuple(after[path].shape)} {after[path].dtype}' == detail
    elif kind == 'reshaped':
      assert detail.endswith(str(tuple(after[path].shape)))
    else:
      assert detail.endswith(str(after[path].dtype))
  untouched = set(before) - {c.path for c in predicted.changes}
  assert all(before[p].shape == after[p].shape for p in untouched)
  assert predicted.bytes_after['total'] == transforms.tree_bytes(checkpoint.read_metadata(epath.Path(dst))[1])
  # What plan calls untouched is what run copied through (plan also counts the saved step number).
  assert predicted.bytes_untouched - rec['bytes_carried'] == 8 and rec['bytes_carried'] > 0


def test_plan_reports_failures_as_run_meets_them(inputs, tmp_path):
  params, opt_state = trained(optax.adam(1e-3), mlp())
  ocp.PyTreeCheckpointer().save(inputs / 'mlp', {'params': params, 'opt_state': opt_state})
  (inputs / 'run_d' / '_METADATA').unlink()  # still looks committed; cannot be read
  result, plan = plan_json(tmp_path, inputs / '*')
  assert result.returncode == 1, result.stderr
  failing = [g for g in plan['groups'] if g['error']]
  assert [g['checkpoints'] for g in failing] == [[str(inputs / 'mlp')]]
  worker.WORKER.clear()
  ran = migrate.migrate_one(str(inputs / 'mlp'), str(tmp_path / 'out' / 'mlp'), worker.surgery_for(SPEC))
  assert failing[0]['error'] == ran['error'] and "ops[1] (cast): match '^Conv_0/' matched no param path" in ran['error']
  assert [u['src'] for u in plan['unreadable']] == [str(inputs / 'run_d')]
  assert (plan['would_migrate'], plan['would_fail']) == (5, 2)  # 6 samples + mlp


def test_plan_bad_spec_exits_2(inputs, tmp_path):
  result, _ = plan_json(tmp_path, inputs / '*', "ops: [{pad: {match: a}}]")
  assert result.returncode == 2 and "ops[0] (pad): missing field 'axis'" in result.stderr


def test_plan_says_which_writer_run_takes(inputs, tmp_path):
  """A rename and a normalize keep every input byte: copy-and-patch. The
  plan's spec drops and narrows: copy-through, and why."""
  keeps = "ops: [{rename: {match: '^Dense_1/', to: 'Head/'}}, {normalize: {match: '^Dense_0/kernel$'}}]"
  for spec_text, path, why in [(keeps, 'copy_and_patch', None), (SPEC, 'copy_through', 'drops')]:
    result, plan = plan_json(tmp_path, inputs / 'run_b', spec_text)
    assert result.returncode == 0, result.stderr
    (group,) = plan['groups']
    assert group['write_path'] == path and (why is None) == (group['why_not_patched'] is None)
    assert why is None or why in group['why_not_patched']
    worker.WORKER.clear()
    rec = migrate.migrate_one(str(inputs / 'run_b'), str(tmp_path / path), worker.surgery_for(spec_text))
    assert (rec['status'], rec['write_path']) == ('ok', path), rec['error']
  assert 'written by copy-through (the surgery drops ' in cli(
      'plan', '--input', inputs / 'run_b', '--spec', tmp_path / 'spec.yaml').stdout


def test_plan_says_how_the_computed_leaves_split(inputs, tmp_path):
  """Per signature: how many groups the computed leaves make (each reading
  inputs no other reads) and the largest group's bytes, inputs and outputs."""
  spec_text = "ops: [{normalize: {match: '^Dense_0/kernel$'}}, {normalize: {match: '^Dense_1/kernel$'}}]"
  result, plan = plan_json(tmp_path, inputs / 'run_b', spec_text)
  assert result.returncode == 0, result.stderr
  (group,) = plan['groups']
  _, meta = checkpoint.read_metadata(inputs / 'run_b')
  kernels = [2 * transforms.tree_bytes(meta['params'][n]['kernel']) for n in ('Dense_0', 'Dense_1')]
  assert (group['dependency_groups'], group['largest_group_bytes']) == (2, max(kernels))
  assert '  computed: 2 dependency group(s), each reading inputs no other reads; the largest holds ' in cli(
      'plan', '--input', inputs / 'run_b', '--spec', tmp_path / 'spec.yaml').stdout
