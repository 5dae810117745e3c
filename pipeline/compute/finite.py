"""No NaN or inf is written unless the run allows it (`--allow_nonfinite`).

Every writer checks what the surgery computed, by its fingerprints (which
say whether each array is finite), before a byte of it is stored: the whole
state at once, or a pack at a time as it streams. One message either way.
"""
from __future__ import annotations

import transforms


def refuse_nonfinite(prints: dict[str, transforms.Fingerprint], allowed: bool) -> None:
  """SurgeryError naming the leaves (by path) whose values are not all
  finite, unless `allowed`."""
  bad = sorted(p for p, f in prints.items() if not f.finite)
  if bad and not allowed:
    raise transforms.SurgeryError(
        f'the output would hold non-finite values (NaN or inf) in {len(bad)} leaf(s): '
        f'{", ".join(bad[:5])}{" ..." if len(bad) > 5 else ""}; '
        'pass --allow_nonfinite to write them anyway')
