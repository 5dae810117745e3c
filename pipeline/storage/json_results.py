"""TensorStore's JSON results, without the references its binding leaks.

TensorStore's Python binding (0.1.86 and before) builds every JSON object it
returns with `PyDict_SetItem(dict, key.release(), value.release())`; the
call does not steal references, so every key and value of every dict it
returns keeps one reference too many and is never freed. `ts.ocdbt.dump`
returns its index that way: 6 KB a read on a small tree, 100 KB a migrated
checkpoint, a worker's memory growing without bound over a night's run.

`released` gives those references back, after checking once (on a spec's
JSON, whose fresh value must be referenced by its dict alone) that this
TensorStore does hold them: a fixed TensorStore is left alone.
"""
from __future__ import annotations

import ctypes
import functools
import sys
from typing import Any


@functools.cache
def _leaks_references() -> bool:
  """Whether this TensorStore's JSON results hold a reference too many."""
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  spec = ts.KvStore.Spec({'driver': 'memory', 'path': 'probe/'}).to_json()
  # held by the dict and by getrefcount's argument; one more is the leak
  return sys.getrefcount(spec['path']) == 3


def released(result: Any) -> Any:
  """TensorStore's JSON `result`, each of its dicts' keys and values holding
  the references they should: what drops `result` frees it."""
  if _leaks_references():
    _give_back(result)
  return result


def _give_back(value: Any) -> None:
  if isinstance(value, dict):
    for key, item in value.items():
      _give_back(item)
      ctypes.pythonapi.Py_DecRef(ctypes.py_object(key))
      ctypes.pythonapi.Py_DecRef(ctypes.py_object(item))
  elif isinstance(value, list):
    for item in value:
      _give_back(item)
