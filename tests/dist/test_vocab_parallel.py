"""Vocab-parallel log-prob/entropy on gloo ranks vs the unsharded log_softmax reference.

Every rank builds the same full logits from a seed, keeps its megatron-layout shard
(columns ``[r * V_p, (r + 1) * V_p)``), runs :func:`vocab_parallel_logprobs_entropy`, and
backpropagates ``sum(w1 * logp + w2 * H)``; the reference does the same on the full logits in
one process. Values and the gradient of the rank's shard are compared.

Tolerances (fp32): log-probs and entropies within 1e-6 absolute where |ref| <= 1 and 1e-6
relative above (|logp| reaches ~8 here, where one fp32 ulp is 4.8e-7 and the two computations
— different summation orders, exp of shifted logits vs log_softmax — differ by 1-2 ulps; seen:
<= 2.5e-7 relative). Gradients w.r.t. the logits within 1e-6 absolute (they are O(1):
probabilities times O(1) upstream gradients; seen: <= 2e-7). bf16 logits: values are still
fp32 math on the same inputs (same bound); gradients are rounded to bf16 by autograd on both
sides, so they agree to one bf16 ulp (rtol 1e-2; seen: bit-identical).
"""

import pytest
import torch
import torch.distributed as dist

from megarlhf.engine.vocab_parallel import (
    logprobs_entropy_reference,
    vocab_parallel_logprobs_entropy,
)
from megarlhf.platform.launch import run_distributed

# (name, tp, V_p per rank, vocab_size or None, temperature, dtype, compute_entropy, chunk_tokens)
CASES_TP2 = [
    ("fp32", 2, 24, None, 1.0, torch.float32, True, None),
    ("temp_padded", 2, 24, 43, 0.7, torch.float32, True, None),
    ("chunked", 2, 24, 45, 1.3, torch.float32, True, 3),
    ("no_entropy", 2, 24, 47, 0.9, torch.float32, False, None),
    ("bf16", 2, 24, 41, 0.8, torch.bfloat16, True, 4),
]
CASES_TP4 = [
    ("fp32", 4, 16, None, 1.0, torch.float32, True, None),
    ("temp_padded", 4, 16, 61, 0.6, torch.float32, True, 5),
    # the last rank holds only padding columns (megatron can pad a tiny vocabulary like this)
    ("last_rank_all_padding", 4, 16, 45, 1.5, torch.float32, True, None),
    ("no_entropy", 4, 16, 60, 1.0, torch.float32, False, 2),
    ("bf16", 4, 16, 58, 1.2, torch.bfloat16, True, None),
]


def _scaled_err(x, ref):
    """``max |x - ref| / max(1, |ref|)``: absolute below 1, relative above."""
    return ((x - ref).abs() / ref.abs().clamp(min=1.0)).max().item()


def _compare(tp_group, tp, tp_rank, name, vp, vocab_size, temperature, dtype, entropy, chunk,
             seed):
    g = torch.Generator().manual_seed(seed)
    shape = (3, 7)
    full = torch.randn(*shape, vp * tp, generator=g).to(dtype)
    v = vocab_size or vp * tp
    target = torch.randint(0, v, shape, generator=g)
    firsts = torch.arange(tp) * vp  # the first column of each rank's shard, where real
    firsts = firsts[firsts < v]
    target[0, :len(firsts)] = firsts
    w1 = torch.rand(shape, generator=g) * 2 - 1  # O(1) upstream gradients
    w2 = torch.rand(shape, generator=g) * 2 - 1

    ref_in = full.clone().requires_grad_()
    lp_ref, h_ref = logprobs_entropy_reference(ref_in, target, temperature, vocab_size)
    ((w1 * lp_ref + (w2 * h_ref if entropy else 0.0)).sum()).backward()

    shard = full[..., tp_rank * vp:(tp_rank + 1) * vp].clone().requires_grad_()
    lp, h = vocab_parallel_logprobs_entropy(shard, target, tp_group, temperature=temperature,
                                            vocab_size=vocab_size, compute_entropy=entropy,
                                            chunk_tokens=chunk)
    ((w1 * lp + (w2 * h if entropy else 0.0)).sum()).backward()
    grad_ref = ref_in.grad[..., tp_rank * vp:(tp_rank + 1) * vp]
    gd = (shard.grad.float() - grad_ref.float()).abs()
    rel = gd / grad_ref.float().abs().clamp(min=1e-3)
    return {
        "case": name,
        "dtype": str(dtype),
        "logp_err": _scaled_err(lp, lp_ref),
        "entropy_err": _scaled_err(h, h_ref) if entropy else 0.0,
        "entropy_is_none": h is None,
        "grad_err": gd.max().item(),
        "grad_rel_err": rel.max().item(),
        "grad_dtype_ok": shard.grad.dtype == dtype,
        "padding_grad_zero": bool((shard.grad[..., max(0, v - tp_rank * vp):] == 0).all()),
        "finite": bool(torch.isfinite(lp).all() and torch.isfinite(shard.grad.float()).all()),
    }


def _rank_fn(cases, sub_tp):
    """Runs every case on the world group, then on sub-groups of size ``sub_tp``."""
    world, rank = dist.get_world_size(), dist.get_rank()
    out = []
    world_group = dist.new_group(list(range(world)))
    for i, case in enumerate(cases):
        name, tp, vp, vocab, temp, dtype, ent, chunk = case
        assert tp == world
        out.append(_compare(world_group, tp, rank, name, vp, vocab, temp, dtype, ent, chunk,
                            seed=100 + i))
    # Sub-groups: consecutive ranks, as megatron builds TP groups. Each group sees other data.
    groups = [dist.new_group(list(range(s, s + sub_tp))) for s in range(0, world, sub_tp)]
    my = rank // sub_tp
    sub_rank = rank % sub_tp
    out.append(_compare(groups[my], sub_tp, sub_rank, f"subgroup_tp{sub_tp}", 12,
                        12 * sub_tp - 1, 0.8, torch.float32, True, None, seed=500 + my))
    return out


def _check(results, world):
    assert len(results) == world
    for rank, rank_results in enumerate(results):
        for r in rank_results:
            where = f"rank {rank} case {r['case']}"
            assert r["finite"], where
            assert r["logp_err"] <= 1e-6, (where, r)
            assert r["entropy_err"] <= 1e-6, (where, r)
            assert r["grad_dtype_ok"], where
            assert r["padding_grad_zero"], where
            if r["case"] == "no_entropy":
                assert r["entropy_is_none"], where
            if r["dtype"] == "torch.bfloat16":
                assert r["grad_rel_err"] <= 1e-2, (where, r)
            else:
                assert r["grad_err"] <= 1e-6, (where, r)


@pytest.mark.dist
def test_vocab_parallel_tp2_matches_reference():
    """If this fails, PPO/GRPO log-probs, entropies or their gradients are wrong at TP=2 (shard
    offsets, temperature, padded vocabulary, chunking, bf16 or a TP group of size 1)."""
    results = run_distributed(_rank_fn, 2, CASES_TP2, 1, timeout=60)
    _check(results, 2)


@pytest.mark.dist
def test_vocab_parallel_tp4_matches_reference():
    """If this fails, the cross-rank combination of max/sum statistics is wrong at TP=4 (or with
    a rank that holds only padding, or on TP sub-groups of a larger world)."""
    results = run_distributed(_rank_fn, 4, CASES_TP4, 2, timeout=60)
    _check(results, 4)
