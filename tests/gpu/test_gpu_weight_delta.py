"""Delta weight sync's receive path on CUDA (the NCCL wire's side: header and payload arrive
in device buffers, the patched tensors go to the device for vLLM's load). Skipped without CUDA
(tests/conftest.py). NOT YET RUN: no accelerator was lent to the session that wrote it.

The wire is a loopback stand-in (the owner's broadcasts replayed into the receiver's buffers):
the GPU tier has no vLLM, whose ``PyNcclCommunicator`` the real NCCL wire is.
"""

import pytest
import torch

pytestmark = pytest.mark.gpu


class _Loopback:
    """What the owner broadcast, replayed into the receiver's buffers (any device)."""

    def __init__(self, kind):
        self.kind, self.sent = kind, []

    def broadcast(self, t):
        src = self.sent.pop(0)
        t.copy_(src.to(t.device))


def test_delta_bucket_received_into_cuda_buffers():
    """If this fails, a delta sync over NCCL hands vLLM tensors on the wrong device, or the
    header/payload read from device buffers differ from what the owner encoded."""
    from megarlhf.weights import delta as D
    from megarlhf.weights.transfer import (
        ReceiveStats,
        TransferSpec,
        _BufferPool,
        _receive_delta_bucket,
        pack_bucket,
    )

    dev = torch.device("cuda")
    before = [("a", torch.randn(4096).bfloat16()), ("b", torch.randn(64, 64).bfloat16())]
    spec, _ = pack_bucket(before)
    after = [(n, t.clone()) for n, t in before]
    after[1][1].view(-1)[[0, 77, 4000]] += 1

    tspec = TransferSpec(owners=(0,), buckets=(spec,))
    mirror = D.DeltaMirror()
    for prev, now in ((None, before), ([t for _, t in before], after)):
        enc = D.encode([t for _, t in now], prev)
        wire = _Loopback("nccl")
        wire.sent = [enc.header.to(dev), enc.payload.to(dev)]
        pairs = _receive_delta_bucket(wire, spec, 0, 0, tspec, _BufferPool(dev), mirror, dev,
                                      ReceiveStats())
        assert all(t.device.type == "cuda" for _, t in pairs)
        for (n, got), (m, want) in zip(pairs, now, strict=True):
            assert n == m and torch.equal(got.cpu(), want)
    assert int(enc.header[1, 0]) == 3  # the second went as a patch
    assert D.checksum(after[1][1].to(dev)) == D.checksum(after[1][1])  # same on the device
