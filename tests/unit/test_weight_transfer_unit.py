"""The weight transfer's pieces that need no second process: the transfer spec (what both
sides lay out) and the receive-buffer pool (reuse only what the engine no longer holds)."""

import pytest
import torch

from megarlhf.weights.transfer import (
    BucketSpec,
    TransferSpec,
    _BufferPool,
    pack_bucket,
    per_owner_bucket_bytes,
)

pytestmark = pytest.mark.unit


def test_pack_bucket_round_trips_through_the_spec():
    """Broken: a receiver would view other bytes than the owner packed (alignment, dtype,
    shape, a non-contiguous source)."""
    pairs = [("odd", torch.tensor([True, False, True])), ("w", torch.randn(5, 3)),
             ("b", torch.randn(7).bfloat16()), ("t", torch.randn(4, 6).t()),
             ("empty", torch.empty(0, 4))]
    spec, flat = pack_bucket(pairs, owner=1)
    assert all(o % 64 == 0 for o in spec.offsets) and spec.nbytes == flat.numel()
    for (n, got), (want_n, want) in zip(spec.views(flat), pairs, strict=True):
        assert n == want_n and got.dtype == want.dtype and torch.equal(got, want)
    d = TransferSpec(owners=(0, 3), buckets=(spec,)).to_dict()
    assert TransferSpec.from_dict(d).buckets[0] == spec
    with pytest.raises(ValueError, match="not one of the 2 owners"):
        TransferSpec.from_dict({**d, "buckets": [{**d["buckets"][0], "owner": 5}]})


def test_per_owner_bucket_bound():
    """Broken: a receiver would hold more than the configured bucket in flight (one bucket per
    owner), or a bound of 0 would cut nothing."""
    assert per_owner_bucket_bytes(512 << 20, 128) == 4 << 20
    assert per_owner_bucket_bytes(10, 100) == 1


def test_buffer_pool_reuses_only_what_the_engine_released():
    """Broken: a buffer whose tensors vLLM still holds (a layer waiting for its other weights;
    or a view vLLM derived from one, as its MoE loaders do) would be overwritten by the next
    bucket: silently wrong weights (seen: 0.02 nats after a MoE sync)."""
    pool = _BufferPool(torch.device("cpu"))
    spec = BucketSpec(0, ("a",), ("float32",), ((4,),), (0,), 16)
    first = pool.take(16)
    derived = spec.views(first)[0][1][1:]  # the engine keeps a view it derived
    pool.handed_out(first)
    del first
    second = pool.take(16)
    assert second.data_ptr() != derived.data_ptr() - 4  # still held: a new buffer
    pool.handed_out(second)
    ptr = second.data_ptr()
    del second
    third = pool.take(8)  # nothing holds the second any more: its buffer comes back
    assert third.data_ptr() == ptr
    pool.handed_out(third)
    del third, derived
    assert len(pool.buffers) == 2 and pool.take(16).data_ptr() in {b.data_ptr()
                                                                  for b in pool.buffers}


def test_torch_compat_storage_users():
    """Broken: torch no longer counts a storage's users the way the buffer pool relies on."""
    from megarlhf.compat.torch import storage_users

    t = torch.empty(8)
    assert storage_users(t) == 1
    v = t[2:].view(2, 3)
    assert storage_users(t) == 2
    del v
    assert storage_users(t) == 1


def test_receive_budget_holds_all_owners_together():
    """Broken: with several owners a receiver would hold one bucket (or one large tensor) of
    each at once, beyond the configured bucket plus the largest tensor."""
    import threading

    from megarlhf.weights.transfer import _Budget

    b = _Budget(100)
    assert b.reserve(60, timeout=0) and not b.reserve(60, timeout=0.01)  # 120 > 100: waits
    got = []
    t = threading.Thread(target=lambda: got.append(b.reserve(60, timeout=5)))
    t.start()
    b.release(60)  # the loader took the first bucket
    t.join()
    assert got == [True]
    b.release(60)
    assert b.reserve(500, timeout=0)  # alone, a bucket larger than the budget passes
    assert not b.reserve(1, timeout=0.01)
    assert _Budget(None).reserve(10**12, timeout=0)
