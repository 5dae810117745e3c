"""Beam glue for ckpt-surgery: discovery, checkpoint I/O, the DoFn, the report.

What an op does lives in `transforms`; this package moves checkpoints.
"""
import os

# A worker restores whole checkpoints next to Orbax's host buffers: JAX must
# not take most of each GPU's memory up front (read when a backend starts).
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

from pipeline.discovery import DiscoveryError, discover
from pipeline.migrate import MigrateFn, migrate_one
from pipeline.run import MigrateCheckpoints, WriteReport, run_migration

__all__ = [
    'DiscoveryError', 'MigrateCheckpoints', 'MigrateFn', 'WriteReport', 'discover',
    'migrate_one', 'run_migration',
]
