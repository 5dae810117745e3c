"""`ckpt-surgery plan`: what `run` would do, from each checkpoint's metadata.

No array bytes are read: Orbax's metadata gives every leaf's shape and dtype,
and `transforms.plan` runs the surgery on those. (A legacy Flax msgpack file
has no metadata: it is read whole for its shapes.) Checkpoints of one signature
are planned once and grouped. The result is plain data (`--json` prints it);
`format_plan` makes the text.
"""
from __future__ import annotations

import sys
from typing import Any

import jax
from etils import epath

import transforms
from pipeline import checkpoint, merge as merging, report
from pipeline.checkpoint import discovery, merge_groups
from pipeline.compute import stream
from pipeline.write import writers


def plan_checkpoints(sources: list[str], spec: transforms.Spec, budget: int = 0,
                     in_flight: int = 2) -> dict[str, Any]:
  """{'groups': [...], 'unreadable': [...], 'would_migrate': n, 'would_fail': n},
  under a memory budget of `budget` bytes per checkpoint (0: the default,
  for `in_flight` checkpoints per worker, as `run` takes it here)."""
  budget = budget or stream.default_budget(in_flight)
  surgery = transforms.Surgery(spec)
  groups: dict[str, dict[str, Any]] = {}
  unreadable = []
  for src in sources:
    if why := discovery.gcs_unsafe(src, 'input'):
      unreadable.append({'src': src, 'error': f'CheckpointError: {why}'})
      continue
    try:
      layout, meta = checkpoint.read_metadata(epath.Path(src))
      tree, _ = surgery.split(meta)
      sig = transforms.signature_id(transforms.signature(tree))
    except Exception as e:  # this checkpoint cannot be planned; the others can
      unreadable.append({'src': src, 'error': f'{type(e).__name__}: {e}'})
      continue
    if sig not in groups:
      groups[sig] = {'signature': sig, 'checkpoints': [], **_plan_one(surgery, meta)}
      if not groups[sig]['error']:
        groups[sig].update(_writer(epath.Path(src), layout, tree, surgery,
                                   groups[sig]['bytes_untouched']))
        groups[sig].update(_memory(surgery, tree, groups[sig]['write_path'],
                                   sys.maxsize if layout.msgpack else budget, in_flight))
    groups[sig]['checkpoints'].append(src)
  planned = list(groups.values())
  would_fail = sum(len(g['checkpoints']) for g in planned if g['error']) + len(unreadable)
  return {'spec_hash': spec.hash, 'groups': planned, 'unreadable': unreadable,
          'would_migrate': len(sources) - would_fail, 'would_fail': would_fail}


def plan_merges(sources: list[str], spec: transforms.Spec, budget: int = 0,
                in_flight: int = 2) -> dict[str, Any]:
  """{'merges': [...], 'unformed': [...], 'would_merge': n, 'would_fail': n}
  for the groups `spec.merge` makes of `sources`: each group's inputs, steps
  and coefficients, the bytes read of each (what is merged; all of the
  newest), whether their trees agree, where it writes and what a worker
  holds at once under the memory budget (as `plan_checkpoints` takes it).
  Reads metadata only."""
  budget = budget or stream.default_budget(in_flight)
  groups, unformed = merge_groups.merge_groups(sources, spec.merge)
  surgery = transforms.Surgery(spec)
  merges = [_plan_merge(group, surgery, spec.merge, budget) for group in groups]
  failed = [{'group': u.name, 'error': u.error} for u in unformed]
  would_fail = sum(1 for m in merges if m['error']) + len(failed)
  return {'spec_hash': spec.hash, 'merge': spec.merge.canonical, 'merges': merges,
          'unformed': failed, 'would_merge': len(merges) + len(failed) - would_fail,
          'would_fail': would_fail, 'memory_budget': budget}


def _plan_merge(group: merge_groups.MergeGroup, surgery: transforms.Surgery,
                merge: transforms.merge.Merge, budget: int) -> dict[str, Any]:
  planned = {'group': group.name, 'output': merge_groups.merged_name(group, merge), 'inputs': [
      {'src': src, 'step': step, 'weight': weight}
      for src, step, weight in zip(group.inputs, group.steps, group.weights)], 'error': None}
  trees = []
  for item in planned['inputs']:
    try:
      layout, meta = checkpoint.read_metadata(epath.Path(item['src']))
      if layout.msgpack:
        raise transforms.merge.MergeError(merging.MSGPACK)
      arrays = merging.merged_leaves(surgery, merge, meta)
    except Exception as e:  # pylint: disable=broad-except  # this group fails; the others go on
      planned['error'] = f"{item['src']}: {type(e).__name__}: {e}"
      return planned
    trees.append((item['src'], {p: transforms.merge.Leaf(tuple(x.shape), x.dtype)
                                for p, x in arrays.items()}))
    item['bytes_read'] = transforms.tree_bytes(list(arrays.values()))
  try:
    transforms.merge.check_same_tree(trees)
  except transforms.merge.MergeError as e:
    planned['error'] = f'MergeError: {e}'
  newest = trees[-1][1]
  averaged = [l for l in newest.values() if transforms.merge.is_averaged(l.dtype)]
  held = sum(merging.held_bytes(l.shape, l.dtype) for l in averaged)
  planned.update(leaves=len(newest), averaged=len(averaged),
                 bytes_merged=planned['inputs'][-1]['bytes_read'],
                 bytes_held=min(held, stream.pack_limit(budget)),
                 streamed=held > stream.pack_limit(budget))
  if surgery.spec.ops:  # run on the merged state, which has the newest's shapes
    planned['ops'] = _plan_one(surgery, meta)
    planned['error'] = planned['error'] or planned['ops']['error']
  return planned


def format_merges(result: dict[str, Any]) -> str:
  merge = result['merge']
  lines = [f"merge: group {merge['group']}, take {merge['take']}, method {merge['method']}, "
           f"optimizer state {merge['opt_state']}"]
  for planned in result['merges']:
    verdict = f"would FAIL: {planned['error']}" if planned['error'] else 'would merge'
    lines.append(f"{planned['group']}: {len(planned['inputs'])} checkpoint(s) {verdict}")
    lines += [f"  step {i['step']:>8}  weight {i['weight']:.6g}  {i['src']}"
              + (f"  (reads {report.size(i['bytes_read'])})" if 'bytes_read' in i else '')
              for i in planned['inputs']]
    if 'leaves' in planned and not planned['error']:
      lines.append(f"  {planned['averaged']} of {planned['leaves']} leaves averaged (the others, "
                   f"integers, from the newest); {report.size(planned['bytes_merged'])} merged")
      where = "beside the run's outputs" if merge['group'] == 'run' else 'at the top of OUTPUT'
      lines.append(f"  writes {planned['output']} ({where}); holds "
                   f"{report.size(planned['bytes_held'])} of arrays at once, "
                   f"{'in packs under' if planned['streamed'] else 'whole within'}"
                   f" the memory budget of {report.size(result['memory_budget'])}")
    if planned.get('ops') and not planned['ops']['error']:
      lines.append('  then the ops, on the merged state:')
      lines += ['  ' + line for line in _format_ops(planned['ops'])]
  lines += [f"would FAIL: {u['error']}" for u in result['unformed']]
  lines.append(f"{result['would_merge']} merge(s) would be written, {result['would_fail']} would "
               f"fail (spec {result['spec_hash']})")
  return '\n'.join(lines)


def _plan_one(surgery: transforms.Surgery, meta: Any) -> dict[str, Any]:
  try:
    result = transforms.plan(surgery, meta)
  except Exception as e:  # pylint: disable=broad-except  # a python: op's own error too, as run's
    return {'error': f'{type(e).__name__}: {e}'}
  return {
      'error': None,
      'ops': [{'op': f'ops[{t.index}] {t.name}', 'matched': t.matched} for t in result.ops],
      'changes': [c._asdict() for c in result.changes],
      'bytes_before': result.bytes_before,
      'bytes_after': result.bytes_after,
      'bytes_untouched': result.bytes_untouched,
      'roles': result.roles,
      'dependency_groups': len(result.groups),
      'largest_group_bytes': max((g.nbytes for g in result.groups), default=0),
      'zero_fills': result.zero_fills,
  }


def _writer(src: epath.Path, layout: checkpoint.Layout, tree: Any,
            surgery: transforms.Surgery, untouched: int) -> dict[str, Any]:
  """How `run` will write outputs of this signature (unless --full_decode),
  and why not by copy-and-patch."""
  choice = writers.choose(src, layout, None if layout.msgpack else surgery.removes(tree),
                          carried=bool(untouched), zero_fills=bool(surgery.zero_fills(tree)))
  return {'write_path': choice.write_path, 'why_not_patched': choice.why_not_patched}


def _memory(surgery: transforms.Surgery, tree: Any, write_path: str, budget: int,
            in_flight: int) -> dict[str, Any]:
  """How `run` holds this signature's checkpoints in memory under `budget`
  (unless --full_decode): whole where what it computes and reads fits, else
  a pack of dependency groups at a time (`stream`), as a fresh tree where
  copy-and-patch does not apply; a group over the budget streams in slabs,
  or fails its checkpoint (this signature's `error`)."""
  computed, limit = sum(g.nbytes for g in surgery.groups(tree)), stream.pack_limit(budget)
  out = {'memory_budget': budget, 'packs': 0, 'largest_pack_bytes': computed, 'over_budget': []}
  if computed > limit:
    whole = write_path != 'copy_and_patch'
    computation = surgery.computation(tree, whole)
    packs = transforms.pack(computation.groups, limit)
    names = [transforms.key_path(k) for k, _ in
             jax.tree_util.tree_flatten_with_path(surgery.trace(tree)[1])[0]]
    for p in (p for p in packs if p.over):
      group = p.groups[0]
      why, path = computation.why_not_slabs(group), names[group.outputs[0]]
      out['over_budget'].append({'path': path, 'bytes': p.nbytes, 'slabs': why is None, 'why': why})
      if why and not out.get('error'):
        out['error'] = f'SurgeryError: {stream.too_large(path, group, budget, why)}'
    out.update(packs=len(packs), largest_pack_bytes=transforms.packs.largest(packs),
               write_path='full' if whole else write_path)
  out['worker_memory'] = in_flight * min(2 * computed, budget) + stream.FOOTPRINT
  return out


def _format_ops(planned: dict[str, Any]) -> list[str]:
  """The lines of what a spec's ops do (`_plan_one`): each op's matches,
  the roles, each leaf's change, the bytes."""
  lines = []
  op_width = max(len(op['op']) for op in planned['ops'])
  for op in planned['ops']:
    matched = '' if op['matched'] is None else f"matched {op['matched']}"
    lines.append(f"  {op['op']:<{op_width}}  {matched}".rstrip())
  lines += [f'  {where}: {role}' for where, role in planned['roles'].items()]
  width = max((len(c['path']) for c in planned['changes']), default=0)
  lines += [f"  {c['kind']:<9} {c['path']:<{width}}  {'-> ' if c['kind'] == 'renamed' else ''}"
            f"{c['detail']}" for c in planned['changes']]
  if not planned['changes']:
    lines.append('  no param leaf renamed, added, dropped, reshaped or re-typed')
  before, after = planned['bytes_before'], planned['bytes_after']
  lines.append('  bytes: ' + ', '.join(
      f'{k} {report.size(before[k])} -> {report.size(after[k])}' for k in before))
  return lines


def format_plan(result: dict[str, Any]) -> str:
  lines = []
  for group in result['groups']:
    count = len(group['checkpoints'])
    verdict = f"would FAIL: {group['error']}" if group['error'] else 'would migrate'
    lines.append(f"signature {group['signature']}: {count} checkpoint(s) {verdict}")
    lines += [f'  {src}' for src in group['checkpoints']]
    if group['error']:
      continue
    lines += _format_ops(group)
    lines.append(f"  untouched: {report.size(group['bytes_untouched'])} of "
                 f"{report.size(group['bytes_after']['total'])}, "
                 'carried over as stored bytes (unless --full_decode, or read from a Flax msgpack file)')
    if group['dependency_groups']:
      lines.append(f"  computed: {group['dependency_groups']} dependency group(s), each reading "
                   f"inputs no other reads; the largest holds {report.size(group['largest_group_bytes'])} "
                   '(inputs and outputs)')
    if group['zero_fills']:
      fills = group['zero_fills']
      lines.append(f"  zero-filled without optimizer: {', '.join(fills[:3])}"
                   f"{' ...' if len(fills) > 3 else ''}: run fails each checkpoint where such an "
                   "entry's stored values hold no zero (a state that does not start at zero, "
                   "as COCOB's; a trained moment too); give the spec an 'optimizer:' section "
                   "so that its init fills them, or 'mirror_init: zeros' on the pad where "
                   "zeros are its init")
    why = f" ({group['why_not_patched']})" if group['why_not_patched'] else ''
    lines.append(f"  written by {group['write_path'].replace('_', '-')}{why}")
    lines += _format_memory(group)
  if result['unreadable']:
    lines.append(f"unreadable: {len(result['unreadable'])} checkpoint(s) would FAIL")
    lines += [f"  {u['src']}: {u['error']}" for u in result['unreadable']]
  lines.append(f"{result['would_migrate']} would migrate, {result['would_fail']} would fail "
               f"({len(result['groups'])} signature(s), spec {result['spec_hash']})")
  return '\n'.join(lines)


def _format_memory(group: dict[str, Any]) -> list[str]:
  budget = report.size(group['memory_budget'])
  if not group['packs']:
    lines = [f"  memory: held whole ({report.size(group['largest_pack_bytes'])} computed, within "
             f"the budget of {budget})"]
  else:
    lines = [f"  memory: streamed under the budget of {budget}: {group['packs']} pack(s), the "
             f"largest holding {report.size(group['largest_pack_bytes'])}"]
  lines += [f"    over the budget: {o['path']} ({report.size(o['bytes'])}): " +
            ('streams a slab of rows at a time' if o['slabs'] else f"would FAIL ({o['why']})")
            for o in group['over_budget']]
  lines.append(f"  a worker needs about {report.size(group['worker_memory'])} (checkpoints in "
               'flight times what each holds, plus its own footprint)')
  return lines
