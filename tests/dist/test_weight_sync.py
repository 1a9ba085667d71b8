"""Weight sync from a Megatron actor at TP2/PP2 into the transformers rollout engine.

The actor's shards stream through the resharder (HF names, bounded buckets) into an engine on
rank 0; then:

* the engine's log-probs of its own samples equal the actor's scoring of them (fp32, 1e-4: the
  engine runs transformers' attention with a KV cache, the actor megatron's without; seen
  ~2e-6);
* greedy generation equals the argmax continuation of the actor's own full-vocabulary logits;
* after a training step a sync changes the engine's samples; a second sync with no training in
  between changes nothing (bit-identical samples and log-probs).
"""

import pytest
import torch

from megarlhf.platform.launch import run_distributed

pytestmark = pytest.mark.dist

PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16], [17, 18]]


def _sync(bundle, engine, bucket_bytes):
    from megarlhf.weights.resharder import iter_hf_weights

    n = 0
    for bucket in iter_hf_weights(bundle, bucket_bytes=bucket_bytes, dst_rank=0, device="cpu"):
        if engine is not None and bucket:
            engine.update_weights(bucket)
            n += len(bucket)
    return n


def _bcast(obj):
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _generate(engine, params):
    if engine is None:
        return None
    outs = engine.generate(PROMPTS, params)
    return [[(list(s.token_ids), list(s.logprobs) if s.logprobs is not None else None)
             for s in o.samples] for o in outs]


def _full_logits(eng, batch, ctx):
    """Full-vocabulary logits of every sequence from the last stage (TP shards gathered)."""
    mbs = eng.micro_batches(batch)
    with torch.no_grad():
        stored = eng._run(mbs, True, lambda mb, out: (out.sum() * 0, torch.tensor(1),
                                                      {"logits": out.detach()}))
    if not ctx.is_last_stage:
        return None
    rows = {}
    for mb, d in zip(mbs, stored):
        parts = [torch.empty_like(d["logits"]) for _ in range(ctx.layout.tp)]
        torch.distributed.all_gather(parts, d["logits"].contiguous(), group=ctx.tp_group)
        full = torch.cat(parts, dim=-1)
        for orig, row, start, n in mb.placement:
            rows[orig] = full[row, start:start + n]
    return rows


def rank_sync(hf_dir, bucket_bytes):
    from megarlhf.config.schema import ModelConfig, OptimizerConfig
    from megarlhf.engine.batch import TokenBatch
    from megarlhf.engine.engine import MegatronEngine
    from megarlhf.engine.loss_fns import PolicyLossSpec
    from megarlhf.models.builder import build_model
    from megarlhf.parallel.layout import ParallelLayout, initialize_parallel
    from megarlhf.rollout import SamplingParams, make_rollout_engine
    from megarlhf.weights.loader import load_hf_dir

    ctx = initialize_parallel(ParallelLayout.for_world(4, tp=2, pp=2))
    bundle = build_model(ModelConfig(hf_dir=hf_dir, dtype="fp32"), ctx, for_training=True,
                         init_weights=False, use_distributed_optimizer=False)
    load_hf_dir(bundle, hf_dir)
    eng = MegatronEngine(bundle, OptimizerConfig(name="sgd", lr=0.5,
                                                 use_distributed_optimizer=False),
                         micro_batch_size=4)
    # The engine starts from *different* (random) weights: everything it knows comes from sync.
    engine = None
    if ctx.rank == 0:
        from megarlhf.models.tiny import build_hf_model

        engine = make_rollout_engine("hf", model=build_hf_model(
            bundle.spec.hf_config.to_dict() | {"model_type": bundle.spec.model_type}, seed=99)
            .config.to_dict())
    out = {"synced": _sync(bundle, engine, bucket_bytes)}

    sample = SamplingParams(n=2, temperature=0.8, max_new_tokens=6, seed=7)
    gen = _bcast(_generate(engine, sample))
    seqs, resp, lps = [], [], []
    for p, samples in zip(PROMPTS, gen):
        for toks, lp in samples:
            seqs.append(p + toks)
            resp.append([0] * len(p) + [1] * len(toks))
            lps.append([0.0] * len(p) + lp)
    batch = TokenBatch.from_sequences(seqs, fields={"response_mask": resp, "lp": lps})
    logp = eng.forward(batch, temperature=0.8)["logp"]
    mask = batch.fields["response_mask"].bool()
    out["logp_err"] = (logp - batch.fields["lp"])[mask].abs().max().item()

    greedy = _bcast(_generate(engine, SamplingParams(n=1, temperature=0.0, max_new_tokens=6)))
    gseqs = [p + g[0][0] for p, g in zip(PROMPTS, greedy)]
    logits = _full_logits(eng, TokenBatch.from_sequences(gseqs), ctx)
    if logits is not None:
        argmax_ok = []
        for i, p in enumerate(PROMPTS):
            toks = greedy[i][0][0]
            pred = logits[i].argmax(-1)[len(p) - 1: len(p) - 1 + len(toks)].tolist()
            argmax_ok.append(pred == toks)
        out["greedy_is_argmax"] = all(argmax_ok)

    # Train, sync: the engine's samples change. Sync again: nothing changes.
    n = float(mask.sum())
    batch.fields["advantages"] = torch.where(mask, torch.randn(mask.shape), 0.0)
    batch.fields["logp_old"] = logp
    eng.train(batch, PolicyLossSpec(normalizer=n, num_tokens=n, temperature=0.8))
    _sync(bundle, engine, bucket_bytes)
    after_train = _generate(engine, sample)
    _sync(bundle, engine, bucket_bytes)
    after_resync = _generate(engine, sample)
    if ctx.rank == 0:
        out["changed_by_training"] = after_train != gen
        out["resync_idempotent"] = after_resync == after_train
    return out


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from megarlhf.models.tiny import save_tiny_hf_model, tiny_arch

    d = str(tmp_path_factory.mktemp("actor"))
    save_tiny_hf_model(d, tiny_arch("qwen2", num_layers=4, vocab_size=200), seed=4)
    return d


@pytest.mark.parametrize("bucket_bytes", [4096, 64 << 20])  # below / above the largest tensor
def test_sync_tp2_pp2_into_transformers_engine(hf_dir, bucket_bytes):
    """If this fails, weight sync corrupts or drops tensors, or the engine and the actor compute
    different log-probs / greedy tokens after a sync."""
    res = run_distributed(rank_sync, 4, hf_dir, bucket_bytes, timeout=300)
    r0 = res[0]
    assert r0["synced"] > 0
    assert all(r["logp_err"] < 1e-4 for r in res), [r["logp_err"] for r in res]
    last_stage = [r for r in res if "greedy_is_argmax" in r]
    assert last_stage and all(r["greedy_is_argmax"] for r in last_stage)
    assert r0["changed_by_training"] and r0["resync_idempotent"]
