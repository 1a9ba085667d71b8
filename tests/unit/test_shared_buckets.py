"""Shared-memory weight buckets (megarlhf.rollout.shared_buckets): what crosses to vLLM's
workers when they share the trainer's /dev/shm. The engine-level behaviour (probe, fallback
to bytes) is in test_rollout_vllm_adapter.py; the real vLLM loads through it in
test_rollout_vllm_real.py and the dist/ray/e2e tiers."""

import errno
import glob
import os

import pytest
import torch

from megarlhf.rollout import shared_buckets as sb

pytestmark = pytest.mark.unit

needs_shm = pytest.mark.skipif(sb.shm_directory() is None, reason="no writable /dev/shm")


def _mine(directory):
    return glob.glob(os.path.join(directory, f"{sb.SEGMENT_PREFIX}{os.getpid()}-*"))


def _stream():
    torch.manual_seed(0)
    return [
        ("odd.bool", torch.tensor([True, False, True])),  # 3 bytes: the next one is realigned
        ("w.fp32", torch.randn(5, 3)),
        ("w.bf16", torch.randn(7).bfloat16()),
        ("empty", torch.empty(0, 4)),
        ("big", torch.randn(64)),  # 256 bytes > the 100-byte bucket: a segment of its own
        ("ids", torch.arange(6, dtype=torch.int64).view(2, 3)),
        ("strided", torch.randn(4, 6).t()),  # non-contiguous input
        ("scalar", torch.tensor(2.5, dtype=torch.float64)),
    ]


@needs_shm
def test_round_trip_through_segments(tmp_path):
    """Broken: weights change on the way to vLLM's workers (dtype, shape, alignment, bf16,
    oversize tensors), or segments are left behind in /dev/shm."""
    directory = sb.shm_directory()
    source = _stream()
    got, payloads = [], []
    for bucket in sb.iter_shared_buckets(iter(source), 100, directory):
        payload = bucket.payload()
        assert os.path.exists(payload["shm"]) and "data" not in payload
        assert all(o % sb.ALIGN_BYTES == 0 for o in payload["offsets"])
        assert payload["size"] <= 100 or len(payload["names"]) == 1
        payloads.append(payload)
        got.extend((n, t.clone()) for n, t in sb.open_shared_bucket(payload))
    assert [n for n, _ in got] == [n for n, _ in source]
    for (_, g), (_, w) in zip(got, source, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape and torch.equal(g, w)
    assert any(p["names"] == ["big"] for p in payloads) and len(payloads) > 2
    assert not _mine(directory)


@needs_shm
def test_views_outlive_the_senders_unlink():
    """Broken: vLLM's layerwise reload keeps the tensors of a half-loaded layer past the RPC;
    if the sender's unlink invalidated them, the layer would load garbage."""
    directory = sb.shm_directory()
    kept = None
    for bucket in sb.iter_shared_buckets(iter([("a", torch.arange(8.0))]), 1 << 20, directory):
        kept = sb.open_shared_bucket(bucket.payload())
    assert not _mine(directory)  # unlinked by the sender
    assert torch.equal(kept[0][1], torch.arange(8.0))
    kept[0][1].add_(1)  # private copy-on-write pages: writable, the sender is unaffected
    assert torch.equal(kept[0][1], torch.arange(8.0) + 1)


@needs_shm
def test_stream_is_consumed_lazily():
    """Broken: the sender pulls (and holds) more than the bucket being filled plus one tensor."""
    pulled = []

    def stream():
        for i in range(10):
            pulled.append(i)
            yield f"w{i}", torch.ones(10)  # 40 bytes; 48 with alignment: 2 per 100-byte bucket

    sent = 0
    for bucket in sb.iter_shared_buckets(stream(), 100, sb.shm_directory()):
        sent += len(bucket)
        assert len(pulled) <= sent + 1
    assert sent == 10


@needs_shm
def test_no_space_is_an_error_before_any_write(monkeypatch):
    """Broken: a full /dev/shm (Docker's 64 MiB default) kills the trainer with SIGBUS on a
    write into an unbacked page, or leaves a half-written segment behind."""
    directory = sb.shm_directory()
    calls = []
    real = os.posix_fallocate

    def fallocate(fd, offset, length):
        calls.append(length)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    source = [(f"w{i}", torch.full((20,), float(i))) for i in range(4)]  # 80 bytes each
    sent = []
    with pytest.raises(sb.SharedMemoryFull, match=r"cannot reserve 100 bytes for 'w1'") as e:
        for bucket in sb.iter_shared_buckets(iter(source), 100, directory):
            sent.extend(bucket.names)
    assert e.value.errno == errno.ENOSPC
    assert sent == ["w0"]
    assert not _mine(directory)
    # other OS errors are not "no space": they propagate as they are
    monkeypatch.setattr(os, "posix_fallocate",
                        lambda *a: (_ for _ in ()).throw(OSError(errno.EACCES, "denied")))
    with pytest.raises(PermissionError):
        list(sb.iter_shared_buckets(iter(source), 100, directory))
    assert not _mine(directory)


@needs_shm
def test_a_failing_stream_leaves_nothing_behind():
    """Broken: a stream that fails mid-way (a resharder error) leaks a segment of host memory
    per failed sync."""
    directory = sb.shm_directory()

    def stream():
        yield "a", torch.ones(4)
        raise RuntimeError("resharder failed")

    with pytest.raises(RuntimeError, match="resharder failed"):
        list(sb.iter_shared_buckets(stream(), 100, directory))
    with pytest.raises(TypeError, match="'b' is a list"):
        list(sb.iter_shared_buckets(iter([("a", torch.ones(1)), ("b", [1.0])]), 100, directory))
    gen = sb.iter_shared_buckets(iter([("a", torch.ones(1)), ("b", torch.ones(1))]), 4, directory)
    next(gen)
    gen.close()  # the consumer stops (its RPC failed)
    assert not _mine(directory)


def test_segment_the_receiver_cannot_see(tmp_path):
    """Broken: a worker on another node (or IPC namespace) fails with a bare FileNotFoundError,
    or the probe says it can read what it cannot."""
    payload = dict(shm=str(tmp_path / "gone"), size=16, names=["a"], dtypes=["float32"],
                   shapes=[[4]], offsets=[0])
    with pytest.raises(RuntimeError, match="not visible in this process"):
        sb.open_shared_bucket(payload)
    assert sb.check_probe(payload, [0] * 16) is False
    assert sb.probe(None) is None
    assert sb.shm_directory(str(tmp_path / "missing")) is None


def test_views_refuse_a_layout_beyond_the_buffer():
    """Broken: a corrupt payload makes the worker read past the bucket."""
    flat = torch.zeros(16, dtype=torch.uint8)
    with pytest.raises(ValueError, match="lies beyond"):
        sb.tensor_views(flat, ["a"], ["float32"], [[8]], [0])


@needs_shm
def test_probe_round_trip():
    directory = sb.shm_directory()
    bucket, token = sb.probe(directory)
    try:
        assert sb.check_probe(bucket.payload(), token) is True
        assert sb.check_probe(bucket.payload(), [(x + 1) % 256 for x in token]) is False
    finally:
        bucket.close()
    assert not _mine(directory)
