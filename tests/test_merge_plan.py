"""Merges grouped and planned (`plan` with a spec's `merge:`)."""
from __future__ import annotations

import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from etils import epath

import transforms
from pipeline import plan
from pipeline.checkpoint import discovery, merge_groups
from tests.test_cli import cli


def _params(step, width=4):
  return {'Dense_0': {'kernel': np.full((width, 4), step, np.float32), 'bias': np.zeros(4, np.float32)}}


def _run(root, steps, width=4):
  """A CheckpointManager run, as the Orbax docs save one: params and Adam's state each step."""
  with ocp.CheckpointManager(epath.Path(root)) as manager:
    for step in steps:
      params = _params(step, width)
      manager.save(step, args=ocp.args.StandardSave({'params': params,
                                                     'opt_state': optax.adam(1e-3).init(params)}))
    manager.wait_until_finished()


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp('runs')
  _run(root / 'run_a', [100, 200, 300])
  _run(root / 'run_b', [100, 200, 300])
  _run(root / 'run_c', [100, 200])
  return root


def _sources(root):
  return [src for src, _ in discovery.discover(f'{root}/*')]


def _merge(text):
  return transforms.load_spec(text)


def test_groups_by_run_take_the_last_k_oldest_first_and_name_a_short_run(runs):
  spec = _merge('merge: {group: run, take: {last: 3}}')
  groups, unformed = merge_groups.merge_groups(_sources(runs), spec.merge)
  assert [(g.name.rsplit('/', 1)[-1], g.steps) for g in groups] == [('run_a', (100, 200, 300)),
                                                                     ('run_b', (100, 200, 300))]
  assert groups[0].weights == (1 / 3,) * 3 and groups[0].inputs[0].endswith('run_a/100')
  [short] = unformed
  assert short.error.endswith("run_c: 2 of the 3 checkpoint(s) the merge takes; steps there: [100, 200]")
  fewer = _merge('merge: {group: run, take: {last: 3}, allow_fewer: true}')
  assert len(merge_groups.merge_groups(_sources(runs), fewer.merge)[0]) == 3


def test_a_soup_is_each_step_across_runs_and_all_is_one_group(runs):
  soup = _merge('merge: {group: step, take: {steps: [200, 300, 400]}, method: ema, decay: 0.5}')
  groups, unformed = merge_groups.merge_groups(_sources(runs), soup.merge)
  assert [(g.name, len(g.inputs)) for g in groups] == [('step 200', 3), ('step 300', 2)]
  assert [u.error for u in unformed] == ['step 400: no checkpoint of this step']
  every = _merge('merge: {group: all, take: {every: 200}}')
  [group], _ = merge_groups.merge_groups(_sources(runs), every.merge)
  assert group.steps == (200, 200, 200) and len(group.inputs) == 3
  wrong = _merge('merge: {group: step, take: {last: 1}, method: weighted, weights: [1, 2, 3]}')
  _, [unformed] = merge_groups.merge_groups(_sources(runs), wrong.merge)
  assert unformed.error == 'step 300: weighted: 3 weight(s) for 2 input(s)'


def test_plan_lists_each_group_and_names_an_input_of_another_tree(runs, tmp_path):
  _run(tmp_path / 'wide', [100])
  _run(tmp_path / 'wide', [200], width=8)
  sources = _sources(runs) + _sources(tmp_path / 'wide')
  result = plan.plan_merges(sources, _merge('merge: {group: run, take: {last: 2}, opt_state: mean}'))
  by_name = {m['group'].rsplit('/', 1)[-1]: m for m in result['merges']}
  assert [i['step'] for i in by_name['run_a']['inputs']] == [200, 300]
  assert by_name['run_a']['error'] is None and by_name['run_a']['leaves'] == 7  # params, mu, nu, count
  assert by_name['run_a']['averaged'] == 6
  assert by_name['run_a']['inputs'][0]['bytes_read'] == 3 * (16 + 4) * 4 + 4  # params, mu, nu; count
  assert by_name['wide']['error'] == ('MergeError: ' + str(tmp_path / 'wide/100') +
                                      ': opt_state/0/mu/Dense_0/kernel has shape (4, 4), ' +
                                      str(tmp_path / 'wide/200') + ' (8, 4)')
  assert (result['would_merge'], result['would_fail']) == (3, 1)
  latest = plan.plan_merges(sources[:3], _merge('merge: {group: run, take: {last: 2}}'))
  assert latest['merges'][0]['leaves'] == 2  # the optimizer state is the newest's, not merged


def test_plan_prints_merges(runs, tmp_path):
  spec = tmp_path / 'merge.yaml'
  spec.write_text('merge: {group: run, take: {last: 2}, method: ema, decay: 0.9}\n')
  planned = cli('plan', '--input', f'{runs}/*', '--spec', spec)
  assert planned.returncode == 0, planned.stderr
  assert 'step      300  weight 0.1' in planned.stdout and '3 merge(s) would be written' in planned.stdout
  assert "writes merged_ema_last2_300 (beside the run's outputs)" in planned.stdout
  spec.write_text("merge: {group: run, take: {last: 2}}\nops: [{rename: {match: '^Dense_0/', to: 'Linear_0/'}}]\n")
  planned = cli('plan', '--input', f'{runs}/*', '--spec', spec)
  assert planned.returncode == 0, planned.stderr
  assert 'then the ops, on the merged state:' in planned.stdout
  assert 'renamed   Dense_0/kernel  -> Linear_0/kernel' in planned.stdout, planned.stdout
  spec.write_text("merge: {group: run, take: {last: 2}}\nops: [{rename: {match: '^Nothing/', to: 'X/'}}]\n")
  planned = cli('plan', '--input', f'{runs}/*', '--spec', spec)
  assert planned.returncode == 1 and "match '^Nothing/' matched no param path" in planned.stdout
