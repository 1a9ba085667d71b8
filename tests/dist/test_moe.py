"""Mixture-of-experts models on gloo ranks against single-process oracles from the same weights.

Models: tiny Qwen3-MoE and Mixtral (2 layers, 8 experts, top-2, head_dim 32), random weights
with a wide router init so top-k choices never hinge on rounding. Oracles and tolerances:

* transformers' forward of the same checkpoint: per-token log-probs within 1e-4 (the engine's
  HF-parity bound; fp32 agrees to ~1e-6, summation order), with its own routing and with
  routing forced to given experts (routing replay);
* the single-process megatron run (EP1, TP1, PP1, DP1) of the same batch with the same
  micro-batches (one sequence each, so every layout routes the same token sets): log-probs
  before and after one SGD step within 1e-5, loss and grad norm within 1e-5 relative, router
  metrics within 1e-6 (fp32; reduction trees over 2-4 ranks differ by a few ulps);
* the Switch-Transformer aux-loss formula, by hand: the last router's weight gradient from the
  aux loss equals coeff * d/dW of the token-weighted mean of the micro-batches' aux losses
  (1e-4 relative: a difference of two fp32 gradients of size ~1e-3);
* the HF safetensors: conversion HF -> megatron (EP2/PP2) -> HF and the resharder's stream are
  bit-exact (torch.equal), in transformers' order and within the bucket bound.
"""

import os

import pytest
import torch
from safetensors.torch import load_file

from megarlhf.platform.launch import run_distributed

pytestmark = pytest.mark.dist

LENGTHS = [6, 10, 16, 8, 14, 12, 12, 18]  # even: sequence parallelism pads nothing
B = len(LENGTHS)
LR = 0.05


def _batch(vocab=256, seed=0):
    from megarlhf.engine.batch import TokenBatch

    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in LENGTHS]
    resp = [[0.0] * 3 + [1.0] * (n - 3) for n in LENGTHS]
    batch = TokenBatch.from_sequences(seqs, fields={"response_mask": resp})
    S = batch.input_ids.shape[1]
    batch.fields["advantages"] = torch.randn(B, S, generator=g) * batch.attention_mask
    batch.fields["logp_old"] = -3.0 + 0.3 * torch.randn(B, S, generator=g)
    return batch


def _loss_fn(normalizer):
    from megarlhf.rl.losses import policy_loss

    def fn(out, mb):
        mask = mb.fields["response_mask"].bool()
        loss, _ = policy_loss(out["logp"], mb.fields["logp_old"], mb.fields["advantages"], mask,
                              eps_low=0.2, eps_high=0.28, normalizer=normalizer,
                              segment_ids=mb.segment_ids)
        return loss, {"loss": loss.detach()}

    return fn


def _engine(hf_dir, lay, *, train=True, replay=False, recompute="none", aux=None,
            micro_batch_size=1, adam_distributed=False):
    from megarlhf.config.schema import ModelConfig, OptimizerConfig
    from megarlhf.engine.engine import MegatronEngine
    from megarlhf.models.builder import build_model
    from megarlhf.parallel.layout import ParallelLayout, initialize_parallel
    from megarlhf.weights.loader import load_hf_dir

    world = torch.distributed.get_world_size()
    ctx = initialize_parallel(ParallelLayout.for_world(world, **lay))
    cfg = ModelConfig(hf_dir=hf_dir, dtype="fp32", moe_routing_replay=replay,
                      recompute=recompute, moe_aux_loss_coeff=aux)
    bundle = build_model(cfg, ctx, for_training=train, init_weights=False,
                         use_distributed_optimizer=adam_distributed)
    load_hf_dir(bundle, hf_dir)
    # SGD: its update is linear in the gradient, so post-step outputs compare at the
    # gradient's precision. (Adam with the distributed optimizer for the resume test.)
    if adam_distributed:
        opt = OptimizerConfig(name="adam", lr=1e-2, clip_grad=1.0, lr_warmup_steps=2,
                              use_distributed_optimizer=True)
    else:
        opt = OptimizerConfig(name="sgd", lr=LR, clip_grad=0.0, use_distributed_optimizer=False) \
            if train else None
    return ctx, MegatronEngine(bundle, opt, micro_batch_size=micro_batch_size)


def _dp_rows(results, key):
    """Per-token outputs of every DP shard back in global row order."""
    by_dp = {}
    for r in results:
        by_dp.setdefault(r["dp_rank"], r[key])
    parts = [by_dp[i] for i in sorted(by_dp)]
    S = max(p.shape[1] for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, S - p.shape[1])) for p in parts])


def _maxdiff(a, b):
    s = min(a.shape[1], b.shape[1])
    return (a[:, :s] - b[:, :s]).abs().max().item()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from megarlhf.models.tiny import save_tiny_hf_model, tiny_arch

    out = {}
    for family in ("qwen3_moe", "mixtral"):
        d = str(tmp_path_factory.mktemp(family))
        model = save_tiny_hf_model(d, tiny_arch(family, num_layers=2), seed=3)
        out[family] = (d, model)
    return out


# --------------------------------------------------------------------------- layouts


def rank_score_and_train(cases, packed_case=None):
    """For each (name, hf_dir, layout): log-probs, one SGD step (aux loss on), log-probs."""
    from megarlhf.parallel.layout import destroy_parallel

    batch = _batch()
    n_resp = int(batch.fields["response_mask"].sum())
    res = {}
    for name, hf_dir, lay in cases:
        ctx, eng = _engine(hf_dir, lay)
        shard = batch.shard(ctx.dp_rank, ctx.layout.dp)
        r = {"dp_rank": ctx.dp_rank, "before": eng.forward(shard)["logp"]}
        if name == packed_case:
            eng.max_tokens = 40  # the same engine, packed micro-batches
            r["packed"] = eng.forward(shard)["logp"]
            eng.max_tokens = None
        step = eng.train_step(shard, _loss_fn(n_resp))
        r.update(loss=step.metrics["loss"], grad_norm=step.grad_norm,
                 moe={k: v for k, v in step.metrics.items() if k.startswith("moe/")},
                 after=eng.forward(shard)["logp"])
        res[name] = r
        destroy_parallel()
    return res


def _hf_logprobs(model, batch, forced=None):
    """transformers' per-token log-probs; ``forced`` (B, S, L, k) replaces its routers' top-k
    (the combine weights stay its softmax over the given experts, renormalised)."""
    handles = []
    for li, layer in enumerate(model.model.layers):
        gate = layer.mlp.gate

        def fwd(hidden, _gate=gate, _li=li):
            hidden = hidden.reshape(-1, _gate.hidden_dim)
            logits = torch.nn.functional.linear(hidden, _gate.weight)
            probs = torch.softmax(logits.float(), dim=-1)
            if forced is None:
                val, idx = torch.topk(probs, _gate.top_k, dim=-1)
            else:
                idx = forced[:, :, _li, :].reshape(-1, forced.shape[-1])
                val = probs.gather(1, idx)
            val = val / val.sum(dim=-1, keepdim=True)
            return logits, val.to(logits.dtype), idx

        handles.append((gate, gate.forward))
        gate.forward = fwd
    try:
        with torch.no_grad():
            logits = model(batch.input_ids, attention_mask=batch.attention_mask.long()).logits
    finally:
        for gate, f in handles:
            gate.forward = f
    lp = torch.log_softmax(logits.float(), -1)[:, :-1].gather(
        -1, batch.input_ids[:, 1:, None])[..., 0]
    return torch.nn.functional.pad(lp, (1, 0)) * batch.attention_mask


def _hf_topk(model, batch):
    """transformers' own expert choices, (B, S, L, k)."""
    out = model(batch.input_ids, attention_mask=batch.attention_mask.long(),
                output_router_logits=True)
    B_, S = batch.input_ids.shape
    per = [torch.topk(torch.softmax(r.float(), -1), model.config.num_experts_per_tok,
                      dim=-1).indices.reshape(B_, S, -1) for r in out.router_logits]
    return torch.stack(per, dim=2)


@pytest.fixture(scope="module")
def oracle(sources):
    cases = [(f, d, dict()) for f, (d, _) in sources.items()]
    return run_distributed(rank_score_and_train, 1, cases, timeout=300)[0]


def test_single_process_matches_transformers_and_counts_router_load(sources, oracle):
    """If this fails, the MoE families do not compute what transformers computes (routing,
    expert weights, renormalised top-k), or the router metrics miscount expert loads."""
    batch = _batch()
    real = batch.attention_mask
    for family, (d, model) in sources.items():
        err = (oracle[family]["before"] - _hf_logprobs(model, batch)).abs().max().item()
        assert err < 1e-4, (family, err)
        # Expert loads of the step's forward (initial weights) from transformers' routing.
        with torch.no_grad():
            choice = _hf_topk(model, batch)  # (B, S, L, k)
        E = model.config.num_local_experts
        for layer in range(choice.shape[2]):
            counts = torch.bincount(choice[:, :, layer][real].flatten(), minlength=E).double()
            m = oracle[family]["moe"]
            assert m[f"moe/layer_{layer}/max_expert_load"] == \
                pytest.approx(float(counts.max() / counts.sum()), abs=1e-9)
            assert m[f"moe/layer_{layer}/load_imbalance"] == \
                pytest.approx(float(counts.max() / counts.mean()), abs=1e-9)
            assert m[f"moe/layer_{layer}/aux_loss"] > 0


LAYOUTS = [
    # name, family, layout (world of 4)
    ("EP2/PP2", "qwen3_moe", dict(tp=1, pp=2, ep=2, etp=1)),  # DP2; experts EP2, expert-DP 1
    ("DP2xEP2", "qwen3_moe", dict(tp=1, pp=1, ep=2, etp=1)),  # DP4; experts EP2, expert-DP 2
    ("TP2+SP/EP2", "mixtral", dict(tp=2, pp=1, ep=2, etp=1, sequence_parallel=True)),
    ("TP2+SP/EP2/ETP2", "qwen3_moe", dict(tp=2, pp=1, ep=2, etp=2, sequence_parallel=True)),
]


@pytest.mark.parametrize("name,fam,lay", LAYOUTS, ids=[c[0] for c in LAYOUTS])
def test_expert_parallel_layouts_match_single_process(sources, oracle, name, fam, lay):
    """If this fails, expert parallelism (token dispatch, expert ownership, expert-DP gradient
    reduction, expert-TP sharding, SP routing) changes the model's outputs, its gradients or the
    router metrics; or packing at EP2/PP2 changes the outputs."""
    res = run_distributed(rank_score_and_train, 4, [(name, sources[fam][0], lay)], "EP2/PP2",
                          timeout=550)
    ref = oracle[fam]
    per = [r[name] for r in res]
    for key in ("before", "after"):
        err = _maxdiff(_dp_rows(per, key), ref[key])
        assert err < 1e-5, (name, key, err)
    for r in per:
        assert abs(r["loss"] - ref["loss"]) <= 1e-5 * abs(ref["loss"]), (name, r["loss"])
        assert abs(r["grad_norm"] - ref["grad_norm"]) <= 1e-5 * ref["grad_norm"], \
            (name, r["grad_norm"], ref["grad_norm"])
        assert r["moe"].keys() == ref["moe"].keys()
        for k, v in ref["moe"].items():
            assert abs(r["moe"][k] - v) < 1e-6, (name, k, r["moe"][k], v)
    if name == "EP2/PP2":
        packed = _dp_rows([r[name] for r in res], "packed")
        assert _maxdiff(packed, ref["before"]) < 1e-5


# --------------------------------------------------------------------------- aux loss


def rank_aux_gradient(hf_dir, coeff):
    """Router-weight gradients of one step with and without the aux loss, and each router's
    inputs per micro-batch (to recompute the aux loss by hand)."""
    from megarlhf.parallel.layout import destroy_parallel

    batch = _batch()
    n_resp = int(batch.fields["response_mask"].sum())
    out = {}
    for c in (coeff, 0.0):
        # 3 sequences of unequal length per micro-batch: padded positions in every one
        ctx, eng = _engine(hf_dir, {}, aux=c, micro_batch_size=3)
        chunk = eng.bundle.unwrapped()[0]
        routers = {i: l.mlp.router for i, l in enumerate(chunk.decoder.layers)}
        before = {i: r.weight.detach().clone() for i, r in routers.items()}
        inputs = {i: [] for i in routers}
        ids = []  # each micro-batch's (b, s) input ids: pad id 0 marks padding
        hooks = [r.register_forward_pre_hook(
            lambda m, args, _i=i: inputs[_i].append(args[0].detach().clone()))
            for i, r in routers.items()]
        hooks.append(chunk.register_forward_pre_hook(
            lambda m, args: ids.append(args[0].detach().clone())))
        eng.train_step(batch, _loss_fn(n_resp))
        for h in hooks:
            h.remove()
        # megatron DDP's gradient buffer (fp32) still holds the step's gradient.
        out[c] = {"grad": {i: r.weight.main_grad.detach().clone() for i, r in routers.items()},
                  "inputs": inputs, "weights": before, "ids": ids}
        destroy_parallel()
    return out


def test_aux_loss_gradient_is_the_token_weighted_mean_over_micro_batches(sources):
    """If this fails, the load-balancing loss reaches the router with the wrong scale (e.g.
    megatron's per-token convention multiplying it by a token count nobody divides by), the
    wrong formula, or counts padding positions (micro-batches of 3 unequal sequences) as
    tokens."""
    d, model = sources["qwen3_moe"]
    coeff = 0.01
    r = run_distributed(rank_aux_gradient, 1, d, coeff, timeout=300)[0]
    E, k = model.config.num_experts, model.config.num_experts_per_tok
    # The last layer's router: its weights reach no other layer's aux loss (an earlier router
    # also moves later layers' inputs, hence their aux losses, through its combine weights).
    last = max(r[coeff]["inputs"])
    for layer in (last,):
        xs = r[coeff]["inputs"][layer]
        W = r[coeff]["weights"][layer].clone().requires_grad_(True)
        # real tokens in router order ((s, b) flattened), from the ids alone
        real = [(i != 0).t().reshape(-1) for i in r[coeff]["ids"]]
        assert len(real) == len(xs) == 3 and all(not m.all() for m in real)
        n = [int(m.sum()) for m in real]  # real tokens per micro-batch
        assert sum(n) == sum(LENGTHS)
        total = 0.0
        for x, m, t in zip(xs, real, n):
            logits = x.reshape(-1, x.shape[-1])[m].float() @ W.t()
            probs = torch.softmax(logits, dim=-1)
            counts = torch.zeros(E).scatter_add_(
                0, torch.topk(probs, k, dim=-1).indices.flatten(), torch.ones(t * k))
            # Switch loss: E * sum_e f_e * P_e, f_e = counts_e / (T k), P_e = mean prob.
            aux = E * (counts / (t * k) * probs.mean(dim=0)).sum()
            total = total + t * aux
        (total * coeff / sum(n)).backward()
        want = W.grad
        got = r[coeff]["grad"][layer] - r[0.0]["grad"][layer]
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-9), \
            (layer, (got - want).abs().max().item(), want.abs().max().item())
        assert want.abs().max() > 1e-6  # the aux loss did move the router


# --------------------------------------------------------------------------- resume


RESUME_LAYOUT = dict(tp=2, pp=2, ep=2, etp=1, sequence_parallel=True)


def rank_resume(hf_dir, step_dir):
    """Three Adam steps (distributed optimizer, aux loss on, padded micro-batches of 2) with a
    checkpoint after the second; then a fresh engine loads it and takes the third step."""
    from types import SimpleNamespace

    from megarlhf.checkpoint.role_state import load_role_state, save_role_state
    from megarlhf.parallel.layout import destroy_parallel

    batch = _batch()
    n_resp = int(batch.fields["response_mask"].sum())
    ctx, eng = _engine(hf_dir, RESUME_LAYOUT, aux=0.01, micro_batch_size=2,
                       adam_distributed=True)
    shard = batch.shard(ctx.dp_rank, ctx.layout.dp)
    cont = []
    for i in range(3):
        step = eng.train_step(shard, _loss_fn(n_resp))
        cont.append((step.metrics["loss"], step.grad_norm))
        if i == 1:
            save_role_state(SimpleNamespace(engine=eng), step_dir, "actor")
    cont_after = eng.forward(shard)["logp"]
    destroy_parallel()
    ctx, eng = _engine(hf_dir, RESUME_LAYOUT, aux=0.01, micro_batch_size=2,
                       adam_distributed=True)
    load_role_state(SimpleNamespace(engine=eng), step_dir, "actor")
    step = eng.train_step(shard, _loss_fn(n_resp))
    out = {"cont": cont, "resumed": (step.metrics["loss"], step.grad_norm),
           "cont_after": cont_after, "resumed_after": eng.forward(shard)["logp"],
           "moe": {k: v for k, v in step.metrics.items() if k.startswith("moe/")}}
    destroy_parallel()
    # The control: the same weights with a fresh optimizer (no moments, LR schedule at 0).
    ctx, eng = _engine(hf_dir, RESUME_LAYOUT, aux=0.01, micro_batch_size=2,
                       adam_distributed=True)
    load_role_state(SimpleNamespace(engine=eng), step_dir, "actor", weights_only=True)
    eng.train_step(shard, _loss_fn(n_resp))
    out["fresh_after"] = eng.forward(shard)["logp"]
    destroy_parallel()
    return out


def test_moe_with_the_distributed_optimizer_resumes_exactly(sources, tmp_path):
    """If this fails, an MoE run at TP2+SP/PP2/EP2 with megatron's distributed optimizer
    (separate dense and expert optimizer parts, sharded over their own data-parallel groups)
    does not resume where it stopped: expert weights, Adam moments or the LR schedule are lost
    or land on the wrong rank; or a later pipeline stage's padding mask under sequence
    parallelism has the wrong shape."""
    d, _ = sources["mixtral"]
    res = run_distributed(rank_resume, 4, d, str(tmp_path / "ckpt"), timeout=550)
    for r in res:
        (l1, g1), (l2, g2), (l3, g3) = r["cont"]
        assert l3 < l1  # Adam moved the policy
        loss, gnorm = r["resumed"]
        assert abs(loss - l3) <= 1e-6 * abs(l3) and abs(gnorm - g3) <= 1e-6 * g3, \
            (r["resumed"], r["cont"][2])
        assert r["moe"]["moe/layer_1/aux_loss"] > 0
    last = [r for r in res if r["cont_after"] is not None and r["cont_after"].numel()]
    assert last  # the last pipeline stage's ranks return log-probs
    for r in last:
        assert _maxdiff(r["resumed_after"], r["cont_after"]) < 1e-6
        # without the optimizer state the third step lands elsewhere: the check has teeth
        assert _maxdiff(r["fresh_after"], r["cont_after"]) > 1e-4


# --------------------------------------------------------------------------- routing replay


def rank_replay(hf_dir, routed, lay, recompute="none"):
    """Log-probs replaying ``routed`` (forward), then one SGD step with it and log-probs."""
    batch = _batch()
    batch.fields["routed_experts"] = routed
    n_resp = int(batch.fields["response_mask"].sum())
    ctx, eng = _engine(hf_dir, lay, replay=True, recompute=recompute)
    shard = batch.shard(ctx.dp_rank, ctx.layout.dp)
    before = eng.forward(shard)["logp"]
    step = eng.train_step(shard, _loss_fn(n_resp))
    return {"dp_rank": ctx.dp_rank, "before": before, "loss": step.metrics["loss"],
            "grad_norm": step.grad_norm, "after": eng.forward(shard)["logp"]}


def test_routing_replay_uses_the_given_experts(sources):
    """If this fails, the actor does not route tokens to the experts the rollout engine chose
    (given as routed_experts (B, S, L, k)): log-probs would differ from the engine's forward
    with those choices, across EP layouts, or under full recomputation (where each router runs
    twice per micro-batch)."""
    d, model = sources["qwen3_moe"]
    batch = _batch()
    with torch.no_grad():
        own = _hf_topk(model, batch)
    forced = (own + 3) % model.config.num_experts  # other experts, still k distinct per token
    forced[:, -1] = -1  # "unknown" (a final sampled token): routes itself
    hf_own = _hf_logprobs(model, batch, own)
    hf_forced = _hf_logprobs(model, batch, torch.where(forced >= 0, forced, own))
    assert (hf_forced - hf_own).abs().max() > 1e-2  # the forced experts matter

    single = run_distributed(rank_replay, 1, d, forced, {}, timeout=300)[0]
    assert (single["before"] - hf_forced).abs().max().item() < 1e-4
    ep2 = run_distributed(rank_replay, 2, d, forced, dict(ep=2, etp=1), timeout=300)
    assert _maxdiff(_dp_rows(ep2, "before"), single["before"]) < 1e-5
    assert _maxdiff(_dp_rows(ep2, "after"), single["after"]) < 1e-5
    for r in ep2:
        assert abs(r["loss"] - single["loss"]) <= 1e-5 * abs(single["loss"])
        assert abs(r["grad_norm"] - single["grad_norm"]) <= 1e-5 * single["grad_norm"]
    rec = run_distributed(rank_replay, 1, d, forced, {}, "full", timeout=300)[0]
    assert abs(rec["grad_norm"] - single["grad_norm"]) <= 1e-6 * single["grad_norm"]
    assert (rec["after"] - single["after"]).abs().max().item() < 1e-6


# --------------------------------------------------------------------------- weights

BUCKETS = [1, 60_000, 1 << 30]
STREAM_CASES = [  # (layout, dst_rank, dtype) in a world of 4
    (dict(tp=1, pp=2, ep=2, etp=1), 0, None),
    (dict(tp=1, pp=1, ep=2, etp=1), 3, torch.bfloat16),  # DP4 / expert-DP 2, dst in replica 3
    (dict(tp=2, pp=1, ep=2, etp=2), 1, None),  # expert-TP 2: expert shards on two ranks
]


def rank_stream_and_convert(sources, work):
    """Resharder streams at each case, and HF -> megatron (EP2/PP2) -> HF conversions."""
    from megarlhf.config.schema import ModelConfig
    from megarlhf.models.builder import build_model
    from megarlhf.parallel.layout import ParallelLayout, destroy_parallel, initialize_parallel
    from megarlhf.checkpoint import convert
    from megarlhf.weights.loader import load_hf_dir
    from megarlhf.weights.resharder import iter_hf_weights, plan_hf_weights

    world = torch.distributed.get_world_size()
    out = {"streams": {}, "exports": {}}
    for ci, (lay, dst, dtype) in enumerate(STREAM_CASES):
        ctx = initialize_parallel(ParallelLayout.for_world(world, **lay))
        for fam, d in sources.items():
            bundle = build_model(ModelConfig(hf_dir=d, dtype="fp32"), ctx, init_weights=False)
            load_hf_dir(bundle, d)
            plan = plan_hf_weights(bundle)
            for bb in BUCKETS:
                out["streams"][(ci, fam, bb)] = [
                    [(n, t.clone()) for n, t in bucket] for bucket in iter_hf_weights(
                        bundle, bucket_bytes=bb, dtype=dtype, plan=plan, dst_rank=dst,
                        device="cpu", reuse_buffer=True)]
        destroy_parallel()
    for fam, d in sources.items():
        ck = os.path.join(work, fam, "ckpt")
        job = convert.prepare_hf_to_megatron(d, ck, tp=1, pp=2, ep=2, etp=1, progress=False,
                                             tmp_dir=ck + ".tmp-test")
        assert convert.conversion_world(1, 2, 2, 1) == world
        convert.hf_to_megatron_rank(job)
        destroy_parallel()
        # Back at the saved layout, and at another one (EP4, no PP: experts re-sharded on load).
        for name, kw in (("same", {}), ("ep4", dict(tp=1, pp=1, vpp=1, ep=4))):
            hf = os.path.join(work, fam, "hf_" + name)
            job = convert.prepare_megatron_to_hf(ck, hf, progress=False, tmp_dir=hf + ".tmp",
                                                 shard_size="200KB", **kw)
            assert (job.ep, job.pp) == ((2, 2) if name == "same" else (4, 1))
            convert.megatron_to_hf_rank(job)
            destroy_parallel()
            out["exports"][(fam, name)] = hf
    return out


def _hf_state(d):
    got = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            got.update(load_file(os.path.join(d, f)))
    return got


def test_resharder_streams_and_conversion_are_bit_exact(sources, tmp_path):
    """If this fails, weight sync / HF export of an MoE model sends wrong, missing, reordered or
    oversized tensors (an expert from the wrong EP rank, expert-TP shards mis-joined, experts
    taken from two expert-DP replicas), or HF -> megatron (EP2/PP2) -> HF is not lossless."""
    from transformers import AutoModelForCausalLM

    from megarlhf.models.arch import hf_config_from_dict
    from megarlhf.models.families import arch_spec
    from megarlhf.models.tiny import tiny_arch
    from megarlhf.weights.mapping import hf_names_for

    dirs = {fam: d for fam, (d, _) in sources.items()}
    res = run_distributed(rank_stream_and_convert, 4, dirs, str(tmp_path), timeout=900)
    for fam, d in dirs.items():
        ref = load_file(os.path.join(d, "model.safetensors"))
        order = hf_names_for(arch_spec(hf_config_from_dict(tiny_arch(fam, num_layers=2))), "lm")
        assert sorted(order) == sorted(ref)
        for ci, (_, dst, dtype) in enumerate(STREAM_CASES):
            for bb in BUCKETS:
                per_rank = [r["streams"][(ci, fam, bb)] for r in res]
                assert len({len(s) for s in per_rank}) == 1
                for rank, s in enumerate(per_rank):
                    if rank != dst:
                        assert all(b == [] for b in s)
                flat = [(n, t) for b in per_rank[dst] for n, t in b]
                assert [n for n, _ in flat] == order, (fam, ci, bb)
                for n, t in flat:
                    want = ref[n] if dtype is None else ref[n].to(dtype)
                    assert t.dtype == want.dtype and torch.equal(t, want), (fam, ci, bb, n)
                for b in per_rank[dst]:
                    size = sum(t.numel() * t.element_size() for _, t in b)
                    assert size <= bb or len(b) == 1, (fam, ci, bb, size)
        for name in ("same", "ep4"):
            hf = res[0]["exports"][(fam, name)]
            got = _hf_state(hf)
            assert sorted(got) == sorted(ref), (fam, name)
            for n, t in ref.items():
                assert torch.equal(got[n], t), (fam, name, n)
            assert os.path.isfile(os.path.join(hf, "model.safetensors.index.json"))
        # transformers loads the export (per-expert names -> its fused experts).
        m = AutoModelForCausalLM.from_pretrained(res[0]["exports"][(fam, "same")],
                                                 dtype=torch.float32)
        src = sources[fam][1]
        for (n, p), (n2, q) in zip(m.named_parameters(), src.named_parameters()):
            assert n == n2 and torch.equal(p, q), (fam, n)
