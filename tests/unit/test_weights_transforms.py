"""HF <-> megatron tensor layouts, shard pieces and resharder bucketing, single-process.

The shard-piece description (which HF rows/columns each TP shard holds) drives both the lazy
loader and the resharder; here it is checked exactly (integer-valued tensors, torch.equal)
against the whole-tensor reference transforms for every kind, several TP sizes and GQA ratios
(MHA, GQA 2:1 and 4:1, MQA), with and without vocabulary padding.
"""

import pytest
import torch

from megarlhf.models.arch import hf_config_from_dict
from megarlhf.models.families import arch_spec
from megarlhf.models.tiny import tiny_arch
from megarlhf.weights.hf_io import parse_size, shard_file_name
from megarlhf.weights.transforms import (
    hf_shapes,
    hf_to_megatron_full,
    megatron_full_shape,
    megatron_full_to_hf,
    shard,
    shard_pieces,
    unshard,
)


def _spec(heads, groups, vocab=61, hidden=32):
    return arch_spec(hf_config_from_dict(tiny_arch("llama", vocab_size=vocab, hidden_size=hidden,
                                                   num_heads=heads, num_kv_heads=groups,
                                                   ffn=48)))


def _hf_tensors(kind, spec, g):
    h, hd = spec.hidden_size, spec.head_dim
    def r(*shape):
        return torch.randint(-1000, 1000, shape, generator=g).float()
    if kind == "qkv":
        return [r(spec.num_attention_heads * hd, h), r(spec.num_query_groups * hd, h),
                r(spec.num_query_groups * hd, h)]
    if kind == "qkv_bias":
        return [r(spec.num_attention_heads * hd), r(spec.num_query_groups * hd),
                r(spec.num_query_groups * hd)]
    if kind == "gate_up":
        return [r(spec.ffn_hidden_size, h), r(spec.ffn_hidden_size, h)]
    if kind == "row":
        return [r(h, spec.ffn_hidden_size)]
    if kind == "vocab":
        return [r(spec.vocab_size, h)]
    return [r(h)]  # replicated


CASES = [(heads, groups, tp) for heads, groups in ((4, 4), (4, 2), (8, 2), (4, 1))
         for tp in (1, 2, 4) if groups % tp == 0]


@pytest.mark.parametrize("heads,groups,tp", CASES)
@pytest.mark.parametrize("kind", ["qkv", "qkv_bias", "gate_up", "row", "vocab", "replicated"])
def test_shard_pieces_match_reference_transforms(kind, heads, groups, tp):
    """If this fails, the resharder or the lazy loader puts rows/columns of some TP shard in the
    wrong place (q/k/v split for this GQA ratio, gate/up split, or vocabulary padding)."""
    spec = _spec(heads, groups)
    g = torch.Generator().manual_seed(heads * 10 + groups + tp)
    hf = _hf_tensors(kind, spec, g)
    k = "qkv" if kind == "qkv_bias" else kind
    padded = spec.padded_vocab_size(tp, 8)
    full = hf_to_megatron_full(k, hf, spec, padded)
    shards = [shard(k, full, tp, r) for r in range(tp)]
    # Reference round trip through whole tensors.
    back = megatron_full_to_hf(k, unshard(k, shards), spec)
    assert all(torch.equal(a, b) for a, b in zip(back, hf))
    assert megatron_full_shape(k, shards[0].shape, tp) == tuple(full.shape)
    assert hf_shapes(k, full.shape, spec) == [tuple(t.shape) for t in hf]

    # Export direction: every HF element is written exactly once from the shards' pieces.
    out = [torch.full_like(t, float("nan")) for t in hf]
    hits = [torch.zeros_like(t) for t in hf]
    for r in range(tp):
        for p in shard_pieces(k, shards[r], spec, tp, r):
            region = p.region_of(out[p.hf_index])
            region.copy_(p.view.reshape(p.region_shape(hf[p.hf_index].shape)))
            p.region_of(hits[p.hf_index]).add_(1)
            if kind == "replicated":
                break  # identical on every rank; one copy is enough
        if kind == "replicated":
            break
    assert all(torch.equal(a, b) for a, b in zip(out, hf)), kind
    assert all(bool((h == 1).all()) for h in hits)

    # Import direction: a zeroed shard filled from its pieces equals the reference shard.
    for r in range(tp):
        mine = torch.zeros_like(shards[r])
        for p in shard_pieces(k, mine, spec, tp, r):
            p.view.copy_(p.region_of(hf[p.hf_index]).reshape(p.view.shape))
        assert torch.equal(mine, shards[r]), (kind, r)

    # Geometry from a meta tensor equals the real one.
    meta = shard_pieces(k, torch.empty(shards[0].shape, device="meta"), spec, tp, 0)
    real = shard_pieces(k, shards[0], spec, tp, 0)
    assert [(p.hf_index, p.rows, p.cols, tuple(p.view.shape)) for p in meta] == \
        [(p.hf_index, p.rows, p.cols, tuple(p.view.shape)) for p in real]


def test_vocab_shard_of_padding_only_has_no_pieces():
    """If this fails, padding rows (which HF does not have) would be sent or read."""
    spec = _spec(4, 2, vocab=10)
    pieces = shard_pieces("vocab", torch.zeros(8, 32), spec, 2, 1)  # rows 8..15, vocab 10
    assert [(p.rows, p.view.shape[0]) for p in pieces] == [((8, 10), 2)]
    assert shard_pieces("vocab", torch.zeros(8, 32), spec, 4, 2) == []  # rows 16..23


def test_buckets_respect_the_bound():
    """If this fails, weight-sync buckets exceed the memory bound or lose tensors."""
    from megarlhf.weights.resharder import HFEntry, ReshardPlan, WeightUnit

    spec = _spec(4, 2)
    sizes = [5, 100, 3, 3, 40, 41, 7, 200, 1]  # fp32 elements
    units = tuple(WeightUnit((f"t{i}",), ((n,),), "replicated", (n,), torch.float32, (0,), 0,
                             f"p{i}") for i, n in enumerate(sizes))
    entries = tuple(HFEntry(f"t{i}", (n,), i, 0) for i, n in enumerate(sizes))
    plan = ReshardPlan(spec=spec, units=units, entries=entries, world_size=1)
    for bound in (1, 4, 50, 160, 400, 10_000):
        for dtype in (None, torch.bfloat16):
            item = 4 if dtype is None else 2
            buckets = plan.buckets(bound, dtype)
            assert [i for b in buckets for i in b] == list(range(len(sizes)))
            for b in buckets:
                nbytes = sum(sizes[i] * item for i in b)
                assert nbytes <= bound or len(b) == 1, (bound, b)
            # greedy: a bucket is closed only when the next tensor would not fit
            for b, nxt in zip(buckets, buckets[1:]):
                assert sum(sizes[i] * item for i in b) + sizes[nxt[0]] * item > bound
    with pytest.raises(ValueError):
        plan.buckets(0)


def test_sizes_and_shard_names_follow_transformers():
    """If this fails, exported checkpoints are named or split differently from transformers'."""
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size(1234) == 1234
    for bad in ("", "five", "-1GB", "0"):
        with pytest.raises(ValueError):
            parse_size(bad)
    assert shard_file_name(0, 1) == "model.safetensors"
    assert shard_file_name(1, 3) == "model-00002-of-00003.safetensors"
