"""`ckpt-surgery plan`: what `run` would do, from each checkpoint's metadata.

No array bytes are read: Orbax's metadata gives every leaf's shape and dtype,
and `transforms.plan` runs the surgery on those. (A legacy Flax msgpack file
has no metadata: it is read whole for its shapes.) Checkpoints of one signature
are planned once and grouped. The result is plain data (`--json` prints it);
`format_plan` makes the text.
"""
from __future__ import annotations

from typing import Any

from etils import epath

import transforms
from pipeline import checkpoint_io, copy_patch, report


def plan_checkpoints(sources: list[str], spec: transforms.Spec) -> dict[str, Any]:
  """{'groups': [...], 'unreadable': [...], 'would_migrate': n, 'would_fail': n}."""
  surgery = transforms.Surgery(spec)
  groups: dict[str, dict[str, Any]] = {}
  unreadable = []
  for src in sources:
    try:
      layout, meta = checkpoint_io.read_metadata(epath.Path(src))
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
    groups[sig]['checkpoints'].append(src)
  planned = list(groups.values())
  would_fail = sum(len(g['checkpoints']) for g in planned if g['error']) + len(unreadable)
  return {'spec_hash': spec.hash, 'groups': planned, 'unreadable': unreadable,
          'would_migrate': len(sources) - would_fail, 'would_fail': would_fail}


def _plan_one(surgery: transforms.Surgery, meta: Any) -> dict[str, Any]:
  try:
    result = transforms.plan(surgery, meta)
  except transforms.SurgeryError as e:
    return {'error': f'SurgeryError: {e}'}
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
  }


def _writer(src: epath.Path, layout: checkpoint_io.Layout, tree: Any,
            surgery: transforms.Surgery, untouched: int) -> dict[str, Any]:
  """How `run` will write outputs of this signature (unless --full_decode),
  and why not by copy-and-patch."""
  if not untouched and not layout.msgpack:
    return {'write_path': 'full', 'why_not_patched': copy_patch.NOTHING_CARRIED}
  try:
    removes = None if layout.msgpack else surgery.removes(tree)
    copy_patch.check_input(src, layout, removes)
    return {'write_path': 'copy_and_patch', 'why_not_patched': None}
  except copy_patch.NotPatchable as e:
    carried = untouched and not layout.msgpack
    return {'write_path': 'copy_through' if carried else 'full', 'why_not_patched': str(e)}


def format_plan(result: dict[str, Any]) -> str:
  lines = []
  for group in result['groups']:
    count = len(group['checkpoints'])
    verdict = f"would FAIL: {group['error']}" if group['error'] else 'would migrate'
    lines.append(f"signature {group['signature']}: {count} checkpoint(s) {verdict}")
    lines += [f'  {src}' for src in group['checkpoints']]
    if group['error']:
      continue
    op_width = max(len(op['op']) for op in group['ops'])
    for op in group['ops']:
      matched = '' if op['matched'] is None else f"matched {op['matched']}"
      lines.append(f"  {op['op']:<{op_width}}  {matched}".rstrip())
    lines += [f'  {where}: {role}' for where, role in group['roles'].items()]
    width = max((len(c['path']) for c in group['changes']), default=0)
    lines += [f"  {c['kind']:<9} {c['path']:<{width}}  {'-> ' if c['kind'] == 'renamed' else ''}"
              f"{c['detail']}" for c in group['changes']]
    if not group['changes']:
      lines.append('  no param leaf renamed, added, dropped, reshaped or re-typed')
    before, after = group['bytes_before'], group['bytes_after']
    lines.append('  bytes: ' + ', '.join(
        f'{k} {report.size(before[k])} -> {report.size(after[k])}' for k in before))
    lines.append(f"  untouched: {report.size(group['bytes_untouched'])} of {report.size(after['total'])}, "
                 'carried over as stored bytes (unless --full_decode, or read from a Flax msgpack file)')
    if group['dependency_groups']:
      lines.append(f"  computed: {group['dependency_groups']} dependency group(s), each reading "
                   f"inputs no other reads; the largest holds {report.size(group['largest_group_bytes'])} "
                   '(inputs and outputs)')
    why = f" ({group['why_not_patched']})" if group['why_not_patched'] else ''
    lines.append(f"  written by {group['write_path'].replace('_', '-')}{why}")
  if result['unreadable']:
    lines.append(f"unreadable: {len(result['unreadable'])} checkpoint(s) would FAIL")
    lines += [f"  {u['src']}: {u['error']}" for u in result['unreadable']]
  lines.append(f"{result['would_migrate']} would migrate, {result['would_fail']} would fail "
               f"({len(result['groups'])} signature(s), spec {result['spec_hash']})")
  return '\n'.join(lines)
