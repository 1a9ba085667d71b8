"""DeepSeek-V3-style MoE families (glm4_moe, deepseek_v3) on gloo ranks against transformers and
a single-process megatron run from the same weights.

Models (:func:`megarlhf.models.tiny.tiny_arch`, 4 layers): a tiny GLM-4.5 (the first layer
dense, 8 routed experts in 2 groups - each token picks its best group, then its top-2 there -,
one shared expert, sigmoid scores + a random expert bias, routed scaling 2.5, qkv bias, RoPE on
half of each head) and a tiny DeepSeek-V3 (the same routing; multi-latent attention with a
query latent), each with one multi-token-prediction layer's tensors in the checkpoint (carried).
Oracles and tolerances:

* transformers' forward: per-token log-probs within 1e-4 (fp32 agrees to ~1e-6);
* the expert bias after one optimizer step, by hand from transformers' own routing of the
  step's real tokens: ``bias + rate * sign(mean load - load)`` per layer, exactly (1e-7);
* TP2 + SP / PP2 / EP2 (world 4) against the single-process run: log-probs before and after one
  SGD step within 1e-5, loss and grad norm within 1e-5 relative, router metrics within 1e-6,
  the updated expert bias exactly;
* HF -> megatron (TP2/PP2/EP2) -> HF, and back at EP1/TP1, TP2/EP2/ETP2 and PP2/VPP2/EP2 (the
  dense layer in the first virtual chunk): bit-exact (torch.equal), the expert
  bias stays fp32 in a bf16 stream, the MTP tensors come back unchanged and transformers loads
  the export.
"""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from megarlhf.platform.launch import run_distributed

pytestmark = pytest.mark.dist

RATE = 0.01  # expert-bias update rate of these tests (megatron's default is 1e-3)
LAYOUT = dict(tp=2, pp=2, ep=2, etp=1, sequence_parallel=True)


def _batch():
    import test_moe

    return test_moe._batch()


def _engine(hf_dir, lay):
    from megarlhf.config.schema import ModelConfig, OptimizerConfig
    from megarlhf.engine.engine import MegatronEngine
    from megarlhf.models.builder import build_model
    from megarlhf.parallel.layout import ParallelLayout, initialize_parallel
    from megarlhf.weights.loader import load_hf_dir

    world = torch.distributed.get_world_size()
    ctx = initialize_parallel(ParallelLayout.for_world(world, **lay))
    cfg = ModelConfig(hf_dir=hf_dir, dtype="fp32", moe_expert_bias_update_rate=RATE)
    bundle = build_model(cfg, ctx, for_training=True, init_weights=False,
                         use_distributed_optimizer=False)
    load_hf_dir(bundle, hf_dir)
    opt = OptimizerConfig(name="sgd", lr=0.05, clip_grad=0.0, use_distributed_optimizer=False)
    return ctx, MegatronEngine(bundle, opt, micro_batch_size=1)


def _biases(bundle):
    """{global layer: expert bias} of this rank's routers."""
    out = {}
    for chunk in bundle.unwrapped():
        for layer in chunk.decoder.layers:
            r = getattr(layer.mlp, "router", None)
            if r is not None:
                out[layer.layer_number - 1] = r.expert_bias.detach().clone()
    return out


def rank_train(hf_dir, lay, work=None):
    """Log-probs, one SGD step, log-probs and biases; with ``work``, conversions too."""
    import test_moe

    from megarlhf.parallel.layout import destroy_parallel

    batch = _batch()
    n_resp = int(batch.fields["response_mask"].sum())
    ctx, eng = _engine(hf_dir, lay)
    shard = batch.shard(ctx.dp_rank, ctx.layout.dp)
    r = {"dp_rank": ctx.dp_rank, "before": eng.forward(shard)["logp"],
         "bias_before": _biases(eng.bundle)}
    step = eng.train_step(shard, test_moe._loss_fn(n_resp))
    r.update(loss=step.metrics["loss"], grad_norm=step.grad_norm,
             moe={k: v for k, v in step.metrics.items() if k.startswith("moe/")},
             after=eng.forward(shard)["logp"], bias_after=_biases(eng.bundle))
    if work is not None:
        from megarlhf.weights.resharder import iter_hf_weights

        r["stream"] = [(n, t.clone()) for b in iter_hf_weights(
            eng.bundle, bucket_bytes=50_000, dtype=torch.bfloat16, dst_rank=0, device="cpu")
            for n, t in b]
    destroy_parallel()
    if work is not None:
        r["exports"] = _convert(hf_dir, work)
    return r


def _convert(hf_dir, work):
    from megarlhf.checkpoint import convert
    from megarlhf.parallel.layout import destroy_parallel

    ck = os.path.join(work, "ckpt")
    job = convert.prepare_hf_to_megatron(hf_dir, ck, tp=2, pp=2, ep=2, etp=1, progress=False,
                                         tmp_dir=ck + ".tmp-test")
    convert.hf_to_megatron_rank(job)
    destroy_parallel()
    out = {}
    for name, kw in (("same", {}), ("tp1", dict(tp=1, pp=1, vpp=1, ep=1)),
                     ("etp2", dict(tp=2, pp=1, vpp=1, ep=2, etp=2)),
                     ("vpp2", dict(tp=1, pp=2, vpp=2, ep=2, etp=1))):
        hf = os.path.join(work, "hf_" + name)
        job = convert.prepare_megatron_to_hf(ck, hf, progress=False, tmp_dir=hf + ".tmp",
                                             shard_size="300KB", **kw)
        convert.megatron_to_hf_rank(job)
        destroy_parallel()
        out[name] = hf
    return out


MTP = {  # one multi-token-prediction layer (model.layers.4.*) as GLM-4.5 stores it, abridged
    "model.layers.4.eh_proj.weight": (64, 128),
    "model.layers.4.enorm.weight": (64,),
    "model.layers.4.hnorm.weight": (64,),
    "model.layers.4.shared_head.norm.weight": (64,),
    "model.layers.4.self_attn.q_proj.weight": (128, 64),
}


@pytest.fixture(scope="module", params=["glm4_moe", "deepseek_v3"])
def glm(request, tmp_path_factory):
    """A tiny checkpoint of the family with one MTP layer's tensors added (as real ones carry)."""
    from megarlhf.models.tiny import save_tiny_hf_model, tiny_arch

    d = str(tmp_path_factory.mktemp(request.param))
    model = save_tiny_hf_model(d, tiny_arch(request.param, num_layers=4), seed=3)
    g = torch.Generator().manual_seed(7)
    mtp = {n: torch.randn(s, generator=g) for n, s in MTP.items()}
    save_file(mtp, os.path.join(d, "mtp-extra.safetensors"), metadata={"format": "pt"})
    weights = {n: "model.safetensors" for n in load_file(os.path.join(d, "model.safetensors"))}
    weights.update({n: "mtp-extra.safetensors" for n in mtp})
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weights}, f)
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["num_nextn_predict_layers"] = 1
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    return d, model, mtp


def _hf_routing(model, batch):
    """transformers' expert choices per MoE layer for the batch's real tokens: {layer: (n, k)}."""
    chosen, handles = {}, []
    for li, layer in enumerate(model.model.layers):
        gate = getattr(layer.mlp, "gate", None)
        if gate is None or not hasattr(gate, "e_score_correction_bias"):
            continue
        handles.append(gate.register_forward_hook(
            lambda m, i, out, _li=li: chosen.__setitem__(_li, out[2])))
    with torch.no_grad():
        model(batch.input_ids, attention_mask=batch.attention_mask.long())
    for h in handles:
        h.remove()
    real = batch.attention_mask.bool().reshape(-1)
    return {li: idx[real] for li, idx in chosen.items()}


@pytest.fixture(scope="module")
def single(glm):
    return run_distributed(rank_train, 1, glm[0], {}, timeout=300)[0]


def test_family_matches_transformers_and_trains_its_expert_bias(glm, single):
    """If this fails, the family computes something else than transformers (sigmoid routing, the
    expert bias, grouped top-k, routed scaling, the shared expert, the dense first layer, partial
    RoPE and qkv bias of glm4_moe, deepseek_v3's latent attention), or its expert bias is not updated from the step's expert loads the way
    DeepSeek-V3 does it (padding counted, wrong sign, wrong rate, updated twice)."""
    import test_engine

    d, model, _ = glm
    batch = _batch()
    err = (single["before"] - test_engine._hf_logprobs(model, batch)).abs().max().item()
    assert err < 1e-4, err
    assert sorted(single["bias_before"]) == [1, 2, 3]  # layer 0 is dense: no router
    E = model.config.n_routed_experts
    for li, idx in _hf_routing(model, batch).items():
        hf_bias = model.model.layers[li].mlp.gate.e_score_correction_bias
        assert torch.equal(single["bias_before"][li], hf_bias)
        load = torch.bincount(idx.flatten(), minlength=E).float()
        want = hf_bias + RATE * torch.sign(load.mean() - load)
        assert (single["bias_after"][li] - want).abs().max() < 1e-7, li
        assert single["moe"][f"moe/layer_{li}/load_imbalance"] == pytest.approx(
            float(load.max()) / float(load.double().mean()), abs=1e-9)
    assert "moe/layer_0/load_imbalance" not in single["moe"]


def test_family_tp2_pp2_ep2_matches_single_process_and_converts_bit_exact(glm, single,
                                                                           tmp_path):
    """If this fails, tensor / pipeline / expert parallelism changes what the family computes or
    how its expert bias trains (the load all-reduce, a stage's dense layer, shared experts under
    TP + SP, latent attention's TP-split down-projections and shared rope key gradient), or
    conversion at TP2/PP2/EP2 loses a tensor (the fp32 expert bias, the carried
    multi-token-prediction layer, shared experts, the dense layer)."""
    import test_moe
    from transformers import AutoModelForCausalLM

    from megarlhf.weights.hf_io import HFCheckpointReader

    d, model, mtp = glm
    res = run_distributed(rank_train, 4, d, LAYOUT, str(tmp_path), timeout=900)
    for key in ("before", "after"):
        err = test_moe._maxdiff(test_moe._dp_rows(res, key), single[key])
        assert err < 1e-5, (key, err)
    biases = {}
    for r in res:
        assert abs(r["loss"] - single["loss"]) <= 1e-5 * abs(single["loss"])
        assert abs(r["grad_norm"] - single["grad_norm"]) <= 1e-5 * single["grad_norm"]
        for k, v in single["moe"].items():
            assert abs(r["moe"][k] - v) < 1e-6, k
        biases.update(r["bias_after"])
    assert sorted(biases) == [1, 2, 3]
    for li, b in biases.items():
        assert torch.equal(b, single["bias_after"][li]), li

    ref = dict(HFCheckpointReader(d).items())
    # The bf16 stream (weight sync) of the trained model: every tensor once, the bias fp32.
    stream = dict(res[0]["stream"])
    assert sorted(stream) == sorted(n for n in ref if n not in mtp)
    for li, b in biases.items():
        t = stream[f"model.layers.{li}.mlp.gate.e_score_correction_bias"]
        assert t.dtype == torch.float32 and torch.equal(t, b)
    assert stream["model.layers.1.mlp.shared_experts.up_proj.weight"].dtype == torch.bfloat16
    for name, hf in res[0]["exports"].items():
        got = dict(HFCheckpointReader(hf).items())
        assert sorted(got) == sorted(ref), name
        for n, t in ref.items():
            assert torch.equal(got[n], t), (name, n)
    m = AutoModelForCausalLM.from_pretrained(res[0]["exports"]["same"], dtype=torch.float32)
    for (n, p), (n2, q) in zip(m.state_dict().items(), model.state_dict().items()):
        assert n == n2 and torch.equal(p, q), n
