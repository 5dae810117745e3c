"""Pure JAX model surgery: specs, ops, mirrors and the compiled surgery.

Nothing in here imports Beam or touches files: `pipeline` does that.
"""
from transforms.fingerprint import Fingerprint, Fingerprinter, digest, fingerprint, fingerprints
from transforms.guard import is_collection
from transforms import merge  # many checkpoints into one: merge.Merge, merge.combine, ...
from transforms.mirrors import find_mirrors
from transforms.ops import OPS, Op, SurgeryError
from transforms.placement import placement
from transforms.spec import Spec, SpecError, load_spec, parse_spec
from transforms.plan import Change, Plan, plan
from transforms.paths import flatten, key_path, leaf_paths, unflatten
from transforms.groups import Computation, Group
from transforms.packs import Pack, pack
from transforms.surgery import Route, Surgery, may_remove, signature, signature_id, tree_bytes

__all__ = [
    'Change', 'Computation', 'Fingerprint', 'Fingerprinter', 'Group', 'OPS', 'Op', 'Pack', 'Plan', 'Route', 'Spec', 'SpecError', 'Surgery', 'SurgeryError',
    'digest', 'find_mirrors', 'fingerprint', 'fingerprints', 'flatten', 'is_collection', 'key_path', 'leaf_paths', 'load_spec', 'may_remove', 'merge', 'pack', 'parse_spec', 'placement', 'plan',
    'signature', 'signature_id', 'tree_bytes', 'unflatten',
]
