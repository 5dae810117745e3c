"""Where a restored array lives: on one device, or spread over a worker's devices.

A worker with several local devices (a GPU host, a TPU VM) restores each large
leaf sharded over all of them, split along its largest axis that divides
evenly, so no one device holds the whole checkpoint and every device's link
carries a share of the bytes. Small leaves, and leaves no axis of which
divides, are replicated (a jitted function takes arrays on one set of devices). The choice depends only on shape, dtype
and devices, so every checkpoint of a signature is placed alike and one
compiled surgery serves them all.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import numpy as np

MIN_SHARDED_BYTES = 4 << 20  # below this, spreading costs more than it saves


@functools.lru_cache(maxsize=None)
def _mesh(devices: tuple[jax.Device, ...]) -> jax.sharding.Mesh:
  return jax.sharding.Mesh(np.array(devices), ('devices',))


def placement(shape: Sequence[int], dtype, devices: Sequence[jax.Device]) -> jax.sharding.Sharding:
  """The sharding of a restored array of this shape and dtype on `devices`."""
  n = len(devices)
  if n == 1:
    return jax.sharding.SingleDeviceSharding(devices[0])
  spec = [None] * len(shape)
  if math.prod(shape) * np.dtype(dtype).itemsize >= MIN_SHARDED_BYTES:
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
      if shape[axis] % n == 0:
        spec[axis] = 'devices'
        break
  # Otherwise replicated: one jitted surgery takes all leaves, so all live on the same devices.
  return jax.sharding.NamedSharding(_mesh(tuple(devices)), jax.sharding.PartitionSpec(*spec))
