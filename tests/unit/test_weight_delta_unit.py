"""Delta weight sync's encoding (megarlhf.weights.delta): patches of the changed elements, their
checksums, and the receiver's copy they apply to. Oracle: the tensors themselves, bit for bit."""

import pytest
import torch

from megarlhf.weights import delta as D

pytestmark = pytest.mark.unit


def _roundtrip(tensors, previous, mirror=None):
    names = [f"t{k}" for k in range(len(tensors))]
    enc = D.encode(tensors, previous)
    mirror = mirror or D.DeltaMirror()
    targets = mirror.targets(names, [str(t.dtype).removeprefix("torch.") for t in tensors],
                             [tuple(t.shape) for t in tensors], enc.header)
    out = D.apply(enc.header, enc.payload, targets, names)
    return enc, out, mirror


def test_bf16_patches_round_trip_exactly():
    """Broken: a receiver would hold other bits than the owner sent (a value rounded on its
    way, an index off by one, a -0.0 / NaN payload lost), or a change would go unsent."""
    g = torch.Generator().manual_seed(0)
    before = [torch.randn(64, 33, generator=g).bfloat16(), torch.randn(17, generator=g).float(),
              torch.tensor([True, False, True])]
    _, _, mirror = _roundtrip(before, None)
    after = [t.clone() for t in before]
    flat = after[0].view(-1)
    flat[[0, 5, 2111]] = torch.tensor([float("nan"), -0.0, 1e-40], dtype=torch.bfloat16)
    enc, out, _ = _roundtrip(after, before, mirror)
    assert enc.header[:, 0].tolist() == [3, 0, 0]  # a patch of 3; two empty patches
    assert enc.changed == 3 and enc.nbytes < enc.dense_bytes
    for got, want in zip(out, after, strict=True):
        assert torch.equal(D.as_bits(got), D.as_bits(want))  # bit for bit (NaN, -0.0)
    assert out[0] is mirror.tensors["t0"]  # applied in place to the receiver's copy


def test_all_changed_goes_dense_and_none_changed_sends_nothing():
    """Broken: a tensor whose patch is not smaller than the tensor would be sent as a larger
    patch, or an unchanged tensor would cost more than its header."""
    before = [torch.randn(300).bfloat16(), torch.randn(300).bfloat16()]
    _, _, mirror = _roundtrip(before, None)
    after = [before[0] + 1, before[1].clone()]
    enc, out, _ = _roundtrip(after, before, mirror)
    assert enc.header[:, 0].tolist() == [D.DENSE, 0]
    assert enc.payload.numel() == 640  # 600 bytes dense, 64-aligned; nothing for the other
    assert all(torch.equal(a, b) for a, b in zip(out, after))


def test_patch_not_smaller_than_dense_goes_dense():
    """Broken: the owner would send (index, value) pairs beyond the break-even (bf16 with int32
    indices: 6 bytes per changed element against 2 per element dense, a third)."""
    n = 30000  # 60000 bytes dense; a patch of c elements: 6 c bytes (+ alignment)
    assert D.patch_is_smaller(9968, n, 2) and not D.patch_is_smaller(10000, n, 2)
    assert not D.patch_is_smaller(33, 100, 2)  # alignment counts: 192 + 128 > 256 bytes
    before = [torch.zeros(n, dtype=torch.bfloat16)]
    for changed, mode in ((3000, 3000), (12000, D.DENSE)):
        after = [before[0].clone()]
        after[0][:changed] = 1
        enc = D.encode(after, before)
        assert int(enc.header[0, 0]) == mode
        assert enc.nbytes <= 8 * 2 + D.piece_nbytes(D.DENSE, n, 2)


def test_checksum_catches_a_changed_element_and_a_swap():
    """Broken: a receiver whose copy drifted (one element, or two elements in each other's
    place) would pass the check."""
    t = torch.randn(1000).bfloat16()
    c = D.checksum(t)
    u = t.clone()
    u.view(torch.int16)[999] += 1  # the next bf16 value: one bit
    assert D.checksum(u) != c
    s = t.clone()
    s[[3, 4]] = t[[4, 3]]
    assert t[3] != t[4] and D.checksum(s) != c
    assert D.checksum(t.clone()) == c and D.checksum(t.view(10, 100).t().contiguous().t()) == c


def test_mismatch_on_a_drifted_copy_and_a_patch_without_a_copy():
    """Broken: a receiver whose copy is not what the owner diffed against would load wrong
    weights silently, or a patch would be applied to nothing."""
    before = [torch.randn(5000).bfloat16()]
    _, _, mirror = _roundtrip(before, None)
    mirror.tensors["t0"][7] += 1  # the receiver's copy drifted
    after = [before[0].clone()]
    after[0][1] += 1
    with pytest.raises(D.ChecksumMismatch, match="t0: checksum .* patch of 1 elements"):
        _roundtrip(after, before, mirror)
    with pytest.raises(ValueError, match="no received copy"):
        _roundtrip(after, before, D.DeltaMirror())


def test_owner_base_moves_only_on_commit():
    """Broken: after a failed sync an owner would diff against what the receivers may not
    hold (the next sync must be full)."""
    base = D.DeltaBase()
    base.record(0, [torch.zeros(2)])
    assert base.get(0) is None and base.version is None
    base.commit(1)
    assert base.version == 1 and base.get(0) is not None and base.nbytes == 8
    base.record(0, [torch.ones(2)])
    base.drop()
    assert base.get(0) is None and base.version is None


def test_config_refuses_a_non_boolean():
    """Broken: weight_sync_delta: "no" (a string) would turn delta sync on."""
    from megarlhf.config.base import ConfigError
    from megarlhf.config.schema import RolloutConfig

    assert RolloutConfig(weight_sync_delta=True).weight_sync_delta
    with pytest.raises(ConfigError, match="weight_sync_delta must be true or false"):
        RolloutConfig(weight_sync_delta="no")


def test_ipc_wire_refuses_delta():
    """Broken: a colocated GPU run with weight_sync_delta would silently sync dense."""
    from megarlhf.weights.transfer import OwnersTrainerEngine, TrainerInitInfo

    info = TrainerInitInfo(rank=0, host="127.0.0.1", num_receivers=1, workers_per_replica=1,
                           bucket_bytes=1 << 20, wire="ipc", delta=True)
    with pytest.raises(ValueError, match="CUDA IPC wire .* no bytes over a link"):
        OwnersTrainerEngine.trainer_init(info, None, client=object())


def test_a_delta_copy_the_host_cannot_hold_is_refused_before_the_first_sync():
    """If this fails, delta sync on a model whose copy does not fit the host (a 200B-class model
    keeps ~470 GB per rollout worker) runs until the host runs out of memory mid-sync instead of
    refusing at the start with the option to change."""
    from megarlhf.weights.delta import HostMemoryError, check_host_room, host_available_bytes

    check_host_room(10 << 30, "a copy", "here", available=100 << 30)  # fits
    with pytest.raises(HostMemoryError, match="rollout.weight_sync_delta: false"):
        check_host_room(470 << 30, "a copy of the whole model", "vLLM worker",
                        available=2 << 40 >> 3)
    assert host_available_bytes() is None or host_available_bytes() > 0
