"""The resharder's stream on gloo ranks against the HF state dict it was loaded from.

Oracle: the source safetensors. The stream must equal them exactly (``torch.equal``; only
copies and casts happen), in transformers' order, with the same number of buckets on every
rank, tensors only on ``dst_rank``, and every bucket within ``bucket_bytes`` unless it holds a
single larger tensor. Bucket sizes: 1 byte (every tensor alone), one below the largest tensor,
a medium one and one holding the whole model.
"""

import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from megarlhf.platform.launch import run_distributed

pytestmark = pytest.mark.dist

FAMILIES = [
    ("llama_gqa4", dict(family="llama", num_heads=8, num_kv_heads=2), "lm"),
    ("qwen2_qkv_bias", dict(family="qwen2"), "lm"),
    ("qwen3_qk_norm", dict(family="qwen3"), "lm"),
    ("mistral_mha", dict(family="mistral", num_kv_heads=4), "lm"),
    ("llama_tied_odd_vocab", dict(family="llama", tied=True, vocab_size=251), "lm"),
    ("llama_scalar_head", dict(family="llama"), "scalar"),
]
LARGEST = 256 * 64 * 4  # the embedding (and LM head), fp32
BUCKETS = [1, LARGEST - 1000, 100_000, 1 << 30]

# (tp, pp, vpp, dst_rank, dtype, reuse_buffer, families) in a world of 4 ranks
CASES = [
    (2, 2, 1, 0, None, False, [f[0] for f in FAMILIES]),
    (2, 2, 1, 0, torch.bfloat16, True, ["llama_gqa4", "llama_tied_odd_vocab"]),
    (1, 2, 2, 3, None, True, ["llama_gqa4", "llama_tied_odd_vocab"]),  # VPP2, DP2, dst in replica 1
    (2, 1, 1, 1, None, False, ["qwen2_qkv_bias"]),  # TP2/DP2
    (1, 1, 1, 2, torch.bfloat16, False, ["llama_scalar_head"]),  # DP4
]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from megarlhf.models.tiny import save_tiny_hf_model, tiny_arch

    out = {}
    for name, kw, head in FAMILIES:
        kw = dict(kw)
        d = str(tmp_path_factory.mktemp(name))
        save_tiny_hf_model(d, tiny_arch(kw.pop("family"), **kw), seed=11, head=head)
        out[name] = (d, head)
    return out


def rank_stream(sources, cases, buckets):
    """Every case's stream for every bucket size: [(names, tensors)] per bucket on each rank."""
    from megarlhf.config.schema import ModelConfig
    from megarlhf.models.builder import build_model
    from megarlhf.parallel.layout import ParallelLayout, destroy_parallel, initialize_parallel
    from megarlhf.weights.loader import load_hf_dir
    from megarlhf.weights.resharder import iter_hf_weights, plan_hf_weights

    world = torch.distributed.get_world_size()
    out = {}
    for ci, (tp, pp, vpp, dst, dtype, reuse, names) in enumerate(cases):
        ctx = initialize_parallel(ParallelLayout.for_world(world, tp=tp, pp=pp, vpp=vpp))
        for name in names:
            hf_dir, head = sources[name]
            bundle = build_model(ModelConfig(hf_dir=hf_dir, dtype="fp32"), ctx, head=head,
                                 init_weights=False)
            load_hf_dir(bundle, hf_dir)
            plan = plan_hf_weights(bundle)
            for bb in buckets:
                stream = []
                for bucket in iter_hf_weights(bundle, bucket_bytes=bb, dtype=dtype, plan=plan,
                                              dst_rank=dst, device="cpu", reuse_buffer=reuse):
                    stream.append([(n, t.clone()) for n, t in bucket])  # reused buffer: copy
                out[(ci, name, bb)] = stream
        destroy_parallel()
    return out


@pytest.fixture(scope="module")
def streams(sources):
    return run_distributed(rank_stream, 4, sources, CASES, BUCKETS, timeout=400)


def test_single_rank_role(sources):
    """If this fails, a role of one rank (no communication at all) cannot sync or export."""
    single = [(1, 1, 1, 0, torch.bfloat16, True, ["qwen3_qk_norm", "llama_tied_odd_vocab"])]
    (got,) = run_distributed(rank_stream, 1, sources, single, [LARGEST - 1000, 1 << 30],
                             timeout=200)
    for name in single[0][-1]:
        ref = load_file(os.path.join(sources[name][0], "model.safetensors"))
        for bb in (LARGEST - 1000, 1 << 30):
            flat = dict(kv for b in got[(0, name, bb)] for kv in b)
            assert set(flat) == set(ref)  # a tied model stores no lm_head.weight
            for n, t in flat.items():
                assert torch.equal(t, ref[n].bfloat16()), (name, n)


@pytest.mark.parametrize("ci", range(len(CASES)),
                         ids=[f"TP{c[0]}PP{c[1]}VPP{c[2]}-dst{c[3]}-{c[4]}-reuse{c[5]}"
                              for c in CASES])
def test_stream_equals_hf_state_dict(sources, streams, ci):
    """If this fails, weight sync / HF export sends wrong, missing, reordered or oversized
    tensors for this layout (TP gather, PP/VPP layer ownership, tied embeddings, q/k/v or
    gate/up split, vocab padding, dtype cast, DP replicas, or the bucket bound)."""
    from megarlhf.models.arch import hf_config_from_dict
    from megarlhf.models.families import arch_spec
    from megarlhf.weights.mapping import hf_names_for

    tp, pp, vpp, dst, dtype, reuse, names = CASES[ci]
    for name in names:
        hf_dir, head = sources[name]
        ref = load_file(os.path.join(hf_dir, "model.safetensors"))
        with open(os.path.join(hf_dir, "config.json")) as f:
            spec = arch_spec(hf_config_from_dict(json.load(f)))
        if head == "scalar":
            spec = dataclasses.replace(spec, tie_word_embeddings=False)
        order = hf_names_for(spec, head)
        assert set(order) <= set(ref)
        for bb in BUCKETS:
            per_rank = [s[(ci, name, bb)] for s in streams]
            assert len({len(s) for s in per_rank}) == 1, "ranks saw different bucket counts"
            for r, s in enumerate(per_rank):
                if r != dst:
                    assert all(b == [] for b in s), f"rank {r} received tensors"
            got = per_rank[dst]
            flat = [(n, t) for b in got for n, t in b]
            assert [n for n, _ in flat] == order, (name, bb)
            for n, t in flat:
                want = ref[n] if dtype is None else ref[n].to(dtype)
                assert t.dtype == want.dtype and torch.equal(t, want), (name, bb, n)
            for b in got:
                size = sum(t.numel() * t.element_size() for _, t in b)
                assert size <= bb or len(b) == 1, (name, bb, [n for n, _ in b], size)
            if bb == 1:
                assert len(got) == len(order)
            if bb == 1 << 30:
                assert len(got) == 1


# Owner mode (weight sync): (tp, pp, ep, family) in a world of 4 ranks.
OWNED_CASES = [(2, 2, 1, "llama_gqa4"), (1, 2, 1, "llama_tied_odd_vocab"),
               (2, 1, 1, "qwen2_qkv_bias")]


def rank_owned(sources, cases, bucket_bytes):
    """Per case: what each rank yields from iter_owned_buckets (owned, and to_all), its plan's
    owner of every HF name, and the bucket list."""
    from megarlhf.config.schema import ModelConfig
    from megarlhf.models.builder import build_model
    from megarlhf.parallel.layout import ParallelLayout, destroy_parallel, initialize_parallel
    from megarlhf.weights.loader import load_hf_dir
    from megarlhf.weights.resharder import bucket_layout, iter_owned_buckets, plan_hf_weights

    world = torch.distributed.get_world_size()
    out = {}
    for ci, (tp, pp, ep, name) in enumerate(cases):
        ctx = initialize_parallel(ParallelLayout.for_world(world, tp=tp, pp=pp, ep=ep))
        hf_dir, head = sources[name]
        bundle = build_model(ModelConfig(hf_dir=hf_dir, dtype="fp32"), ctx, head=head,
                             init_weights=False)
        load_hf_dir(bundle, hf_dir)
        plan = plan_hf_weights(bundle)
        res = {"owner": {e.name: plan.owner(i) for i, e in enumerate(plan.entries)}}
        buckets = plan.owned_buckets(bucket_bytes)
        res["buckets"] = [(o, [plan.entries[i].name for i in b], bucket_layout(plan, b)[1])
                          for o, b in buckets]
        for mode in ("owned", "to_all"):
            got = []
            for b in iter_owned_buckets(bundle, bucket_bytes=bucket_bytes, plan=plan,
                                        to_all=mode == "to_all"):
                got.append((b.index, [(n, t.clone()) for n, t in zip(b.names, b.tensors)],
                            b.nbytes))
            res[mode] = got
        out[ci] = res
        destroy_parallel()
    return out


def test_owned_buckets_each_rank_assembles_its_own_share(sources):
    """If this fails, a weight-sync owner yields tensors it does not own (a rank receives
    another stage's weights), misses or corrupts some of its own (the TP gather inside a
    stage), a bucket exceeds its bound, or the colocated (to_all) stream differs between
    ranks."""
    bb = 100_000
    res = run_distributed(rank_owned, 4, sources, OWNED_CASES, bb, timeout=300)
    for ci, (tp, pp, ep, name) in enumerate(OWNED_CASES):
        ref = load_file(os.path.join(sources[name][0], "model.safetensors"))
        r0 = res[0][ci]
        owners = sorted(set(r0["owner"].values()))
        assert len(owners) == pp  # TP rank 0 of each stage (DP replica 0)
        assert all(r[ci]["owner"] == r0["owner"] for r in res)  # one plan on every rank
        seen = {}
        for rank, r in enumerate(res):
            mine = r[ci]["owned"]
            for index, pairs, nbytes in mine:
                owner, names, size = r0["buckets"][index]
                assert owner == rank and [n for n, _ in pairs] == names and nbytes == size
                assert size <= bb or len(names) == 1
                for n, t in pairs:
                    assert r0["owner"][n] == rank and torch.equal(t, ref[n]), (name, n)
                    seen[n] = rank
            if rank not in owners:
                assert mine == []
        assert set(seen) == set(r0["owner"])  # every tensor, exactly once
        for r in res:  # to_all: every rank sees every bucket, identical to the owner's
            got = r[ci]["to_all"]
            assert [i for i, _, _ in got] == list(range(len(r0["buckets"])))
            for _, pairs, _ in got:
                assert all(torch.equal(t, ref[n]) for n, t in pairs)
