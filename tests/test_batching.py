"""byte_batches: every item once, in order, no batch over the limit but a lone large item."""
from __future__ import annotations

from hypothesis import given, strategies as st

from pipeline.compute.batching import byte_batches


@given(st.lists(st.integers(0, 100)), st.one_of(st.none(), st.integers(1, 150)))
def test_batches_keep_order_and_bound_each_batch(sizes, limit):
  items = list(enumerate(sizes))
  batches = byte_batches(items, lambda item: item[1], limit)
  assert [item for batch in batches for item in batch] == items
  assert all(batches)
  if limit is None:
    assert len(batches) == min(1, len(items))
  else:
    for batch in batches:
      assert len(batch) == 1 or sum(n for _, n in batch) <= limit
    for before, after in zip(batches, batches[1:]):  # a batch closes only when the next item would not fit
      assert sum(n for _, n in before) + after[0][1] > limit
