"""Work in batches of bounded bytes, so that what is held at once stays bounded.

Encoding computed leaves, copying stored chunks in transactions, reading
back arrays to verify and checking recorded checksums each take their
items a batch at a time, in order.
"""
from __future__ import annotations

from typing import Callable, Iterable, TypeVar

T = TypeVar('T')


def byte_batches(items: Iterable[T], size: Callable[[T], int], limit: int | None) -> list[list[T]]:
  """`items` in order, in consecutive batches of at most `limit` bytes as
  `size` counts them (an item larger than that alone; one batch where
  `limit` is None); no empty batch."""
  out: list[list[T]] = [[]]
  total = 0
  for item in items:
    n = size(item)
    if limit is not None and out[-1] and total + n > limit:
      out.append([])
      total = 0
    out[-1].append(item)
    total += n
  return [batch for batch in out if batch]
