"""Beam glue for ckpt-surgery: discovery, checkpoint I/O, the DoFn, the report.

What an op does lives in `transforms`; this package moves checkpoints.
"""
import os

# A worker restores whole checkpoints next to Orbax's host buffers: JAX must
# not take most of each GPU's memory up front (read when a backend starts).
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

import importlib

# Imported when first named (PEP 562): `ckpt-surgery plan` and `inspect` never
# import Beam, and a worker imports only the modules its DoFn needs.
_EXPORTS = {
    'DiscoveryError': 'pipeline.discovery', 'discover': 'pipeline.discovery',
    'MigrateFn': 'pipeline.migrate', 'migrate_one': 'pipeline.migrate',
    'MigrateCheckpoints': 'pipeline.run', 'WriteReport': 'pipeline.run',
    'run_migration': 'pipeline.run',
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
