"""megatron's real GPTModel on CPU/gloo through megarlhf: logits and a DDP step vs one process.

Tolerances: fp32 logits within 1e-5 (TP all-reduces and PP hand-offs only reorder fp32
additions; seen ~3e-7); SFT loss and grad norm of one DDP + optimizer step within 1e-5 relative.
"""

import pytest
import torch

from megarlhf.platform.launch import run_distributed

pytestmark = pytest.mark.dist


def _batch(vocab, n=4, seed=0):
    from megarlhf.engine.batch import TokenBatch

    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, vocab, (7 + 3 * i,), generator=g).tolist() for i in range(n)]
    return TokenBatch.from_sequences(seqs, fields={"loss_mask": [[1] * len(s) for s in seqs]})


def rank_logits(hf_dir, tp, pp):
    """Full-vocabulary logits of every micro-batch (micro-batch size 1 -> 4 micro-batches)."""
    from megarlhf.config.schema import ModelConfig
    from megarlhf.engine.engine import MegatronEngine
    from megarlhf.models.builder import build_model
    from megarlhf.parallel.layout import ParallelLayout, initialize_parallel
    from megarlhf.weights.loader import load_hf_dir

    ctx = initialize_parallel(ParallelLayout.for_world(torch.distributed.get_world_size(),
                                                       tp=tp, pp=pp))
    bundle = build_model(ModelConfig(hf_dir=hf_dir, dtype="fp32"), ctx, init_weights=False)
    load_hf_dir(bundle, hf_dir)
    eng = MegatronEngine(bundle, micro_batch_size=1)
    mbs = eng.micro_batches(_batch(bundle.spec.vocab_size))
    assert len(mbs) >= 2
    with torch.no_grad():
        stored = eng._run(mbs, True, lambda mb, out: (out.sum() * 0, torch.tensor(1),
                                                      {"logits": out.detach()}))
    if not ctx.is_last_stage:
        return None
    shards = [d["logits"] for d in stored]  # each (1, s, V/tp)
    full = []
    for s in shards:
        parts = [torch.empty_like(s) for _ in range(tp)]
        torch.distributed.all_gather(parts, s.contiguous(), group=ctx.tp_group)
        full.append(torch.cat(parts, dim=-1))
    return {"num_micro_batches": len(mbs), "logits": full}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from megarlhf.models.tiny import save_tiny_hf_model, tiny_arch

    d = str(tmp_path_factory.mktemp("gqa"))
    save_tiny_hf_model(d, tiny_arch("llama", num_layers=4, num_heads=4, num_kv_heads=2), seed=1)
    return d


def test_gpt_logits_tp2_pp2_match_tp1(hf_dir):
    """If this fails, megatron's TP/PP split of GPTModel (on CPU via megarlhf) changes logits."""
    ref = run_distributed(rank_logits, 1, hf_dir, 1, 1, timeout=120)[0]
    res = [r for r in run_distributed(rank_logits, 4, hf_dir, 2, 2, timeout=180) if r]
    assert ref["num_micro_batches"] == 4
    for r in res:  # both TP ranks of the last stage
        assert r["num_micro_batches"] == 4
        for a, b in zip(r["logits"], ref["logits"]):
            assert (a - b).abs().max().item() < 1e-5


def rank_sft_step(hf_dir, tp):
    from megarlhf.config.schema import ModelConfig, OptimizerConfig
    from megarlhf.engine.engine import MegatronEngine
    from megarlhf.engine.loss_fns import SFTLossSpec
    from megarlhf.models.builder import build_model
    from megarlhf.parallel.layout import ParallelLayout, initialize_parallel
    from megarlhf.weights.loader import load_hf_dir

    ctx = initialize_parallel(ParallelLayout.for_world(torch.distributed.get_world_size(),
                                                       tp=tp))
    bundle = build_model(ModelConfig(hf_dir=hf_dir, dtype="fp32"), ctx, for_training=True,
                         init_weights=False)
    load_hf_dir(bundle, hf_dir)
    eng = MegatronEngine(bundle, OptimizerConfig(lr=1e-3), micro_batch_size=1)
    batch = _batch(bundle.spec.vocab_size)
    n = float(batch.fields["loss_mask"].sum())
    shard = batch.shard(ctx.dp_rank, ctx.layout.dp)
    r = eng.train(shard, SFTLossSpec(normalizer=n, num_tokens=n))
    return r.metrics["loss"], r.grad_norm


def test_ddp_optimizer_step_tp2_dp2_matches_single_process(hf_dir):
    """If this fails, megatron DDP grad reduction or the DistributedOptimizer step is wrong."""
    ref_loss, ref_gn = run_distributed(rank_sft_step, 1, hf_dir, 1, timeout=120)[0]
    for loss, gn in run_distributed(rank_sft_step, 4, hf_dir, 2, timeout=180):
        assert abs(loss - ref_loss) / ref_loss < 1e-5
        assert abs(gn - ref_gn) / ref_gn < 1e-5


def rank_env(names):
    import os

    return {n: os.environ.get(n) for n in names}


def test_ranks_decide_the_callers_library_defaults_for_themselves(monkeypatch):
    """A default this process chose for a library (``platform.default_env``: vLLM's in-process
    engine core in the pytest process) must not reach ranks, which host engines of their own
    next to a process group; the user's own settings and ``env=`` do. Without this the
    dist-tier vLLM syncs failed whenever a unit test had built an in-process engine first."""
    import megarlhf.platform as plat

    monkeypatch.setattr(plat, "_DEFAULTED_ENV", {})
    for name in ("MEGARLHF_T_OURS", "MEGARLHF_T_USER", "MEGARLHF_T_PASSED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MEGARLHF_T_USER", "user")
    assert plat.default_env("MEGARLHF_T_USER", "ours") == "user"  # the user's wins
    assert plat.default_env("MEGARLHF_T_OURS", "0") == "0"
    assert plat.default_env("MEGARLHF_T_OURS", "1") == "1"  # our own earlier choice is redecided
    assert plat.default_env("MEGARLHF_T_PASSED", "0") == "0"
    assert sorted(plat.process_env_defaults()) == ["MEGARLHF_T_OURS", "MEGARLHF_T_PASSED"]
    # Rank processes fork from a fork server and get its environment: restart it now, so that
    # it holds the defaults above, as it does when a unit test's engine came before the tier.
    import multiprocessing.forkserver

    multiprocessing.forkserver._forkserver._stop()
    got = run_distributed(rank_env, 2, ["MEGARLHF_T_OURS", "MEGARLHF_T_USER", "MEGARLHF_T_PASSED"],
                          env={"MEGARLHF_T_PASSED": "passed"}, timeout=60)
    assert got == [{"MEGARLHF_T_OURS": None, "MEGARLHF_T_USER": "user",
                    "MEGARLHF_T_PASSED": "passed"}] * 2
