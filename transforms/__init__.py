"""Pure JAX model surgery: specs, ops, mirrors and the compiled surgery.

Nothing in here imports Beam or touches files: `pipeline` does that.
"""
from transforms.mirrors import find_mirrors
from transforms.ops import OPS, Op, SurgeryError
from transforms.paths import flatten, unflatten
from transforms.spec import Spec, SpecError, load_spec, parse_spec
from transforms.plan import Change, Plan, plan
from transforms.surgery import Surgery, key_path, signature, signature_id, tree_bytes

__all__ = [
    'Change', 'OPS', 'Op', 'Plan', 'Spec', 'SpecError', 'Surgery', 'SurgeryError',
    'find_mirrors', 'flatten', 'key_path', 'load_spec', 'parse_spec', 'plan', 'signature',
    'signature_id', 'tree_bytes', 'unflatten',
]
