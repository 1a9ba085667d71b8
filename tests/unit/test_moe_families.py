"""Mixture-of-experts families, weight names, config rules and plan memory (single process).

Oracles: transformers itself (its configs, and the names and layout ``save_pretrained`` writes
for MoE checkpoints), megatron's parameter names (TE grouped experts are checked by name only:
Transformer Engine does not run here), and hand calculations of the memory `megarlhf plan` gives
Qwen3-30B-A3B, DeepSeek-V3 and GLM-4.5 (docs/benchmarks.md, "Plan memory: DeepSeek-V3 and
GLM-4.5").
"""

import copy
import os
import re

import pytest
import torch

from megarlhf.config import ConfigError, JobConfig, from_dict
from megarlhf.planning import validate
from megarlhf.models.arch import hf_config_from_dict
from megarlhf.models.families import (
    UnsupportedArchitecture,
    arch_spec,
    expert_param_maps,
    hf_experts_disk_to_fused,
    hf_experts_fused_to_disk,
)
from megarlhf.models.tiny import tiny_arch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

QWEN3_30B_A3B = {
    "model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": 2048,
    "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128,
    "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1,
    "mlp_only_layers": [], "num_hidden_layers": 48, "num_attention_heads": 32,
    "num_key_value_heads": 4, "head_dim": 128, "max_position_embeddings": 40960,
    "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "hidden_act": "silu", "router_aux_loss_coef": 0.001,
}


def _spec(family, **kw):
    return arch_spec(hf_config_from_dict(tiny_arch(family, **kw)))


def test_families_read_routing_from_the_hf_config():
    """If this fails, megatron routes differently from transformers (top-k, renormalisation,
    expert width) or reads a Mixtral/Qwen3-MoE config field wrongly."""
    from megarlhf.config.schema import ModelConfig
    from megarlhf.models.builder import moe_kwargs
    from megarlhf.parallel.layout import ParallelLayout

    q = _spec("qwen3_moe")
    assert (q.moe.num_experts, q.moe.topk, q.moe.ffn_hidden_size) == (8, 2, 32)
    assert q.moe.norm_topk_prob and q.qk_norm and q.ffn_hidden_size == 32
    assert q.moe.hf_block == "mlp" and q.moe.hf_gate_up_down == ("gate_proj", "up_proj",
                                                                 "down_proj")
    m = _spec("mixtral")
    assert m.moe.norm_topk_prob and not m.qk_norm  # Mixtral always renormalises its top-2
    assert m.moe.hf_block == "block_sparse_moe" and m.moe.hf_gate_up_down == ("w1", "w3", "w2")
    real = arch_spec(hf_config_from_dict(QWEN3_30B_A3B))
    assert (real.moe.num_experts, real.moe.topk, real.ffn_hidden_size) == (128, 8, 768)

    lay = ParallelLayout(tp=2, dp=2, ep=4, etp=1, sequence_parallel=True)
    kw = moe_kwargs(q, ModelConfig(arch=tiny_arch("qwen3_moe")), lay, te=False)
    # Renormalised top-k = megatron's default order (top-k logits, softmax over the k).
    assert kw["moe_router_pre_softmax"] is False and kw["moe_router_dtype"] == "fp32"
    assert kw["moe_router_topk"] == 2 and kw["num_moe_experts"] == 8
    assert kw["moe_aux_loss_coeff"] == 0.01 and kw["moe_router_load_balancing_type"] == "aux_loss"
    assert kw["expert_model_parallel_size"] == 4 and kw["expert_tensor_parallel_size"] == 1
    off = moe_kwargs(q, ModelConfig(arch=tiny_arch("qwen3_moe"), moe_aux_loss_coeff=0.0), lay,
                     te=False)
    assert off["moe_router_load_balancing_type"] == "none"
    unnorm = arch_spec(hf_config_from_dict(tiny_arch("qwen3_moe", norm_topk_prob=False)))
    assert moe_kwargs(unnorm, ModelConfig(arch=tiny_arch("qwen3_moe")), lay,
                      te=False)["moe_router_pre_softmax"] is True


@pytest.mark.parametrize("field,value,what", [
    ("shared_expert_intermediate_size", 64, "shared experts"),
    ("n_shared_experts", 1, "shared experts"),
    ("n_group", 4, "grouped (node-limited) routing"),
    ("topk_group", 2, "grouped (node-limited) routing"),
    ("kv_lora_rank", 16, "multi-head latent attention"),
    ("mlp_only_layers", [0], "dense layers among MoE layers"),
    ("decoder_sparse_step", 2, "dense layers among MoE layers"),
])
def test_unsupported_moe_variant_is_refused_naming_the_field(field, value, what):
    """If this fails, an MoE variant megarlhf cannot build (shared experts, grouped routing,
    MLA, dense layers in between) is accepted and trains a different model, or the refusal does
    not say which field to change."""
    with pytest.raises(UnsupportedArchitecture, match=f"{field}=.*{re.escape(what)}"):
        _spec("qwen3_moe", **{field: value})
    d = _job(**{f"actor.model.arch.{field}": value})
    with pytest.raises(ConfigError) as e:
        validate(from_dict(JobConfig, d))
    assert "actor.model" in str(e.value) and field in str(e.value) and what in str(e.value)


def test_unsupported_moe_model_types_say_what_they_need():
    """If this fails, a Qwen2-MoE / DeepSeek-V2 config gets a generic refusal that does not
    say which feature is missing."""
    from megarlhf.models.arch import ArchError

    with pytest.raises(ArchError, match=r"shared experts \(shared_expert_intermediate_size\)"):
        hf_config_from_dict({"model_type": "qwen2_moe"})
    _rejects(_job(**{"actor.model.arch": {"model_type": "deepseek_v2"}}),
             "actor.model", "grouped routing (n_group, topk_group)")


# --------------------------------------------------------------------------- sigmoid families

DEEPSEEK_V3 = {  # config.json of deepseek-ai/DeepSeek-V3 (fields megarlhf reads)
    "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168,
    "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1,
    "n_routed_experts": 256, "routed_scaling_factor": 2.5, "kv_lora_rank": 512,
    "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
    "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8, "first_k_dense_replace": 3,
    "norm_topk_prob": True, "hidden_act": "silu", "max_position_embeddings": 163840,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1,
                     "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096},
    "num_nextn_predict_layers": 1, "attention_bias": False,
}
GLM_4_5 = {  # config.json of zai-org/GLM-4.5
    "model_type": "glm4_moe", "vocab_size": 151552, "hidden_size": 5120,
    "intermediate_size": 12288, "moe_intermediate_size": 1536, "num_hidden_layers": 92,
    "num_attention_heads": 96, "num_key_value_heads": 8, "head_dim": 128,
    "n_shared_experts": 1, "n_routed_experts": 160, "routed_scaling_factor": 2.5,
    "n_group": 1, "topk_group": 1, "num_experts_per_tok": 8, "first_k_dense_replace": 3,
    "norm_topk_prob": True, "hidden_act": "silu", "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5, "rope_theta": 1000000, "partial_rotary_factor": 0.5,
    "attention_bias": True, "use_qk_norm": True, "tie_word_embeddings": False,
    "num_nextn_predict_layers": 1,
}
# As written (transformers adds rope_theta / rope_type to a rope_scaling dict it reads).
GLM_4_5_AIR = dict(  # config.json of zai-org/GLM-4.5-Air: GLM-4.5's architecture, smaller
    GLM_4_5, hidden_size=4096, intermediate_size=10944, moe_intermediate_size=1408,
    num_hidden_layers=46, n_routed_experts=128, routed_scaling_factor=1.0,
    first_k_dense_replace=1, use_qk_norm=False)
_CONFIG_JSON = {"deepseek_v3": copy.deepcopy(DEEPSEEK_V3), "glm4_moe": copy.deepcopy(GLM_4_5),
                "glm4_moe_air": copy.deepcopy(GLM_4_5_AIR)}


def test_sigmoid_families_read_the_real_configs():
    """If this fails, DeepSeek-V3's or GLM-4.5's config is read wrongly (routing, grouping,
    scaling, shared experts, dense layers, latent attention, yarn, partial rotary, MTP) and the
    model megatron builds is not the checkpoint's."""
    from megarlhf.config.schema import ModelConfig
    from megarlhf.models.builder import moe_kwargs
    from megarlhf.parallel.layout import ParallelLayout

    # What deepseek-ai/DeepSeek-V3's config.json also says (its remote code's fields), bf16.
    d = arch_spec(hf_config_from_dict(dict(DEEPSEEK_V3, topk_method="noaux_tc",
                                           scoring_func="sigmoid", moe_layer_freq=1)))
    mo, ml = d.moe, d.mla
    assert (mo.num_experts, mo.topk, mo.ffn_hidden_size, d.ffn_hidden_size) == (256, 8, 2048,
                                                                                  18432)
    assert (mo.score_function, mo.expert_bias, mo.num_groups, mo.group_topk) == ("sigmoid", True,
                                                                                 8, 4)
    assert (mo.routed_scaling, mo.shared_ffn_hidden_size, mo.first_dense_layers) == (2.5, 2048, 3)
    assert (ml.q_lora_rank, ml.kv_lora_rank, ml.qk_nope_head_dim, ml.qk_rope_head_dim,
            ml.v_head_dim) == (1536, 512, 128, 64, 128)
    rope = dict(ml.rope)
    assert rope["rope_type"] == "yarn" and rope["rotary_scaling_factor"] == 40
    assert (rope["mscale"], rope["mscale_all_dim"]) == (1.0, 1.0)
    assert rope["original_max_position_embeddings"] == 4096
    assert d.mtp_layers == 1 and not d.qkv_bias and d.head_dim == 192
    assert [d.is_moe_layer(i) for i in (0, 2, 3, 60)] == [False, False, True, True]
    lay = ParallelLayout(tp=1, dp=64, ep=64, etp=1)
    kw = moe_kwargs(d, ModelConfig(arch=DEEPSEEK_V3), lay, te=False)
    assert kw["moe_router_score_function"] == "sigmoid" and kw["moe_router_enable_expert_bias"]
    assert kw["moe_router_topk_scaling_factor"] == 2.5 and kw["moe_router_bias_update_rate"] == 1e-3
    assert (kw["moe_router_num_groups"], kw["moe_router_group_topk"]) == (8, 4)
    assert kw["moe_layer_freq"] == [0] * 3 + [1] * 58
    assert kw["moe_shared_expert_intermediate_size"] == 2048
    assert kw["moe_aux_loss_coeff"] == 0.0  # aux-loss-free: the expert bias balances

    # moonshotai/Kimi-K2-Instruct: DeepSeek-V3's architecture under its own model_type.
    k = arch_spec(hf_config_from_dict(dict(
        DEEPSEEK_V3, model_type="kimi_k2", num_attention_heads=64, num_key_value_heads=64,
        n_routed_experts=384, n_group=1, topk_group=1, first_k_dense_replace=1,
        routed_scaling_factor=2.827, rope_scaling=dict(DEEPSEEK_V3["rope_scaling"], factor=32.0),
        vocab_size=163840)))
    assert (k.model_type, k.moe.num_experts, k.moe.num_groups, k.moe.routed_scaling) == (
        "deepseek_v3", 384, 1, 2.827)
    assert dict(k.mla.rope)["rotary_scaling_factor"] == 32.0

    g = arch_spec(hf_config_from_dict(GLM_4_5))
    assert (g.moe.num_experts, g.moe.num_groups, g.moe.first_dense_layers) == (160, 1, 3)
    assert g.qkv_bias and g.qk_norm and g.rotary_percent == 0.5 and g.head_dim == 128
    assert g.mla is None and g.mtp_layers == 1
    kw = moe_kwargs(g, ModelConfig(arch=GLM_4_5), lay, te=False)
    assert "moe_router_num_groups" not in kw  # one group: plain top-k


@pytest.mark.parametrize("family,fields,needle", [
    ("glm4_moe", dict(norm_topk_prob=False), "norm_topk_prob=false"),
    ("glm4_moe", dict(num_experts_per_tok=1), "num_experts_per_tok=1"),
    ("glm4_moe", dict(n_group=2, topk_group=2), "num_experts_per_tok = 2 * topk_group"),
    ("glm4_moe", dict(n_group=3), "not divisible by n_group=3"),
    ("glm4_moe", dict(first_k_dense_replace=4), "first_k_dense_replace=4"),
    ("glm4_moe", dict(partial_rotary_factor=0.3), "partial_rotary_factor"),
    ("deepseek_v3", dict(attention_bias=True), "attention_bias=true"),
    ("deepseek_v3", dict(scoring_func="softmax"), "scoring_func='softmax'"),
    ("deepseek_v3", dict(topk_method="group_limited_greedy"), "topk_method="),
    ("deepseek_v3", dict(moe_layer_freq=2), "moe_layer_freq=2"),
    ("deepseek_v3", dict(quantization_config={"quant_method": "fp8"}), "convert them to bf16"),
    ("deepseek_v3", dict(rope_interleave=False), "rope_interleave=false"),
    ("deepseek_v3", dict(rms_norm_eps=1e-5), "rms_norm_eps=1e-05"),
    ("deepseek_v3", dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                          "original_max_position_embeddings": 64,
                                          "attention_factor": 1.2}), "attention_factor"),
    ("deepseek_v3", dict(rope_parameters={"rope_type": "linear", "factor": 2.0,
                                          "rope_theta": 1e4}), "rope_type='linear'"),
])
def test_sigmoid_family_variants_megatron_computes_differently_are_refused(family, fields,
                                                                          needle):
    """If this fails, a config whose routing or attention megatron computes differently from
    transformers (unnormalised sigmoid top-k, top-1, group scores of another width, attention
    biases in MLA, non-interleaved rope, latent-norm eps, yarn variants) is accepted and trains
    another model, or the refusal does not name the field."""
    with pytest.raises(UnsupportedArchitecture, match=re.escape(needle)):
        _spec(family, num_layers=4, **fields)
    _rejects(_job(**{"actor.model.arch": tiny_arch(family, num_layers=4, **fields)}), needle)


def test_sigmoid_family_layouts_and_mtp_from_scratch_are_checked_before_any_worker():
    """If this fails, expert parallelism that splits routing groups across ranks, a shared-expert
    width TP does not divide, or a from-scratch model claiming MTP layers is accepted and fails
    (or trains something else) later."""
    arch = tiny_arch("glm4_moe", num_layers=4)  # 8 experts in 2 groups of 4
    ok = _job(**{"actor.model.arch": arch, "actor.parallel.ep": 2})
    validate(from_dict(JobConfig, ok))
    # 12 experts in 3 groups of 4, 6 per EP rank: the second group straddles both ranks.
    _rejects(_job(**{"actor.model.arch": dict(arch, n_routed_experts=12, n_group=3),
                     "actor.parallel.ep": 2}), "groups straddle ranks")
    validate(from_dict(JobConfig, _job(**{"actor.model.arch": dict(
        arch, n_routed_experts=12, n_group=3), "actor.parallel.ep": 3, "actor.num_gpus": 3,
        "batch.train_prompts_global": 6, "batch.rollout_prompts_global": 12})))
    _rejects(_job(**{"actor.model.arch": dict(arch, moe_intermediate_size=30),
                     "actor.parallel.tp": 4, "actor.parallel.sequence_parallel": True}),
             "shared experts' width 30")
    _rejects(_job(**{"actor.model.arch": dict(arch, num_nextn_predict_layers=1)}),
             "num_nextn_predict_layers: 0")


# --------------------------------------------------------------------------- names


class _Layer(torch.nn.Module):
    def __init__(self, number):
        super().__init__()
        self.layer_number = number


def _fake_te_chunk(spec, layers, n_local):
    """A module tree with the parameter names of megatron's TE spec for MoE layers."""
    h, E = spec.hidden_size, spec.moe.num_experts
    chunk = torch.nn.Module()
    chunk.decoder = torch.nn.Module()
    chunk.decoder.layers = torch.nn.ModuleList()
    for number in layers:
        layer = _Layer(number)
        att = torch.nn.Module()
        att.linear_qkv = torch.nn.Module()
        att.linear_qkv.layer_norm_weight = torch.nn.Parameter(torch.zeros(h))
        att.linear_qkv.weight = torch.nn.Parameter(torch.zeros(1))
        att.linear_proj = torch.nn.Linear(1, 1, bias=False)
        att.q_layernorm = torch.nn.Module()
        att.q_layernorm.weight = torch.nn.Parameter(torch.zeros(1))
        att.k_layernorm = torch.nn.Module()
        att.k_layernorm.weight = torch.nn.Parameter(torch.zeros(1))
        layer.self_attention = att
        layer.pre_mlp_layernorm = torch.nn.Module()
        layer.pre_mlp_layernorm.weight = torch.nn.Parameter(torch.zeros(h))
        layer.mlp = torch.nn.Module()
        layer.mlp.router = torch.nn.Module()
        layer.mlp.router.weight = torch.nn.Parameter(torch.zeros(E, h))
        layer.mlp.experts = torch.nn.Module()
        for fc in ("linear_fc1", "linear_fc2"):
            grouped = torch.nn.Module()
            for i in range(n_local):
                setattr(grouped, f"weight{i}", torch.nn.Parameter(torch.zeros(1)))
            setattr(layer.mlp.experts, fc, grouped)
        chunk.decoder.layers.append(layer)
    return chunk


def test_te_grouped_expert_names_map_to_global_experts():
    """If this fails, a GPU run with Transformer Engine's grouped experts (weight0..weightN per
    GroupedLinear) loads or syncs the wrong experts: local expert i of EP rank r must be HF
    expert r * E/ep + i, in the layer's global number."""
    from types import SimpleNamespace

    from megarlhf.parallel.layout import ParallelLayout
    from megarlhf.weights.mapping import local_params

    spec = _spec("qwen3_moe")  # 8 experts
    lay = ParallelLayout(tp=1, pp=2, dp=4, ep=4, etp=1)
    ctx = SimpleNamespace(layout=lay, tp_rank=0, ep_rank=3, etp_rank=0)
    chunk = _fake_te_chunk(spec, layers=[3, 4], n_local=2)  # stage 1 of 4 layers (1-based 3, 4)
    bundle = SimpleNamespace(spec=spec, ctx=ctx, te=True, head="lm",
                             unwrapped=lambda: [chunk])
    by_name = {lp.name: lp for lp in local_params(bundle)}
    fc1 = by_name["decoder.layers.1.mlp.experts.linear_fc1.weight1"]
    assert fc1.hf_names == ("model.layers.3.mlp.experts.7.gate_proj.weight",
                            "model.layers.3.mlp.experts.7.up_proj.weight")
    assert fc1.expert and fc1.kind == "gate_up" and fc1.split_size == 1
    fc2 = by_name["decoder.layers.0.mlp.experts.linear_fc2.weight0"]
    assert fc2.hf_names == ("model.layers.2.mlp.experts.6.down_proj.weight",) and fc2.kind == "row"
    assert by_name["decoder.layers.0.mlp.router.weight"].hf_names == \
        ("model.layers.2.mlp.gate.weight",)
    assert by_name["decoder.layers.0.pre_mlp_layernorm.weight"].hf_names == \
        ("model.layers.2.post_attention_layernorm.weight",)
    assert by_name["decoder.layers.0.self_attention.linear_qkv.layer_norm_weight"].hf_names == \
        ("model.layers.2.input_layernorm.weight",)
    # SequentialMLP (local spec) names the same experts local_experts.{i}.
    seq = {pm.megatron for pm in expert_param_maps(spec, grouped=False)}
    assert seq == {"decoder.layers.{l}.mlp.experts.local_experts.{i}.linear_fc1.weight",
                   "decoder.layers.{l}.mlp.experts.local_experts.{i}.linear_fc2.weight"}


def test_hf_names_are_the_on_disk_names_transformers_writes(tmp_path):
    """If this fails, megarlhf's HF contract (the names it reads, exports and streams to the
    rollout engine) drifts from what transformers' save_pretrained writes for MoE checkpoints,
    or the fused in-memory <-> per-expert conversion is wrong in either direction."""
    from safetensors.torch import load_file

    from megarlhf.models.tiny import build_hf_model
    from megarlhf.weights.mapping import hf_names_for

    for family in ("qwen3_moe", "mixtral"):
        arch = tiny_arch(family, num_layers=2)
        model = build_hf_model(arch, seed=1)
        spec = arch_spec(hf_config_from_dict(arch))
        d = tmp_path / family
        model.save_pretrained(str(d))
        disk = load_file(str(d / "model.safetensors"))
        assert sorted(hf_names_for(spec, "lm")) == sorted(disk)
        mem = {k: v for k, v in model.state_dict().items()}
        converted = hf_experts_fused_to_disk(mem, spec)
        assert sorted(converted) == sorted(disk)
        for k, v in disk.items():
            assert torch.equal(converted[k], v), (family, k)
        back = hf_experts_disk_to_fused(disk, spec)
        assert sorted(back) == sorted(mem)
        for k, v in mem.items():
            assert torch.equal(back[k], v), (family, k)
        # transformers loads what hf_experts_disk_to_fused produced, strictly.
        fresh = build_hf_model(arch, seed=2)
        fresh.load_state_dict(back, strict=True)


def test_validate_refuses_fused_expert_checkpoints(tmp_path):
    """If this fails, a checkpoint holding transformers' in-memory fused experts is read as if
    experts were missing, with no hint at the cause."""
    from safetensors.torch import save_file

    from megarlhf.models.tiny import build_hf_model
    from megarlhf.weights.validate import HFValidationError, inspect_hf_dir

    arch = tiny_arch("qwen3_moe", num_layers=2)
    model = build_hf_model(arch)
    d = tmp_path / "fused"
    model.save_pretrained(str(d))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(HFValidationError, match="experts stored fused"):
        inspect_hf_dir(str(d))


# --------------------------------------------------------------------------- config rules


def _job(**over):
    d = {
        "kind": "grpo",
        "cluster": {"num_nodes": 1, "gpus_per_node": 8},
        "actor": {"model": {"arch": tiny_arch("qwen3_moe")}, "num_gpus": 4,
                  "parallel": {"tp": 1, "ep": 2}, "micro_batch_size_per_rank": 2},
        "rollout": {"num_gpus": 2, "tp": 1},
        "batch": {"rollout_prompts_global": 8, "train_prompts_global": 4,
                  "n_samples_per_prompt": 4},
    }
    for k, v in over.items():
        node = d
        parts = k.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return d


def _rejects(d, *needles):
    with pytest.raises(ConfigError) as e:
        validate(from_dict(JobConfig, d))
    for n in needles:
        assert n in str(e.value), f"{n!r} not in: {e.value}"


def test_expert_parallel_config_rules():
    """If this fails, a layout megatron cannot build for an MoE model passes validation (or a
    valid one is refused): experts not divisible by ep, etp*ep not dividing a stage's ranks, MoE
    training at TP > 1 without sequence parallelism, ep on a dense model, allgather with PP."""
    job = validate(from_dict(JobConfig, _job()))
    assert job.actor.layout().describe() == "TP1/PP1/DP4 EP2/ETP1"
    assert job.actor.layout().edp == 2
    _rejects(_job(**{"actor.parallel": {"ep": 3}}), "actor.parallel.ep = 3",
             "8 experts", "[1, 2, 4, 8]")
    _rejects(_job(**{"actor.parallel": {"ep": 8}}), "etp*ep = 1*8 = 8 does not divide 4")
    _rejects(_job(**{"actor.parallel": {"tp": 2, "ep": 2}}),
             "actor.parallel.sequence_parallel=true")
    validate(from_dict(JobConfig, _job(**{"actor.parallel": {"tp": 2, "ep": 2,
                                                             "sequence_parallel": True}})))
    _rejects(_job(**{"actor.parallel": {"ep": 2, "etp": 3}}), "etp = 3 does not divide")
    _rejects(_job(**{"actor.model.arch": tiny_arch("llama")}), "the model (llama) is dense")
    _rejects(_job(**{"actor.parallel": {"pp": 2, "ep": 2},
                     "actor.model.moe_token_dispatcher": "allgather"}),
             "moe_token_dispatcher=allgather")
    # Routing replay needs the rollout engine's expert choices, which no engine returns yet.
    _rejects(_job(**{"actor.model.moe_routing_replay": True}),
             "moe_routing_replay=true", "does not return them")


# --------------------------------------------------------------------------- plan


def test_plan_shards_experts_by_ep_hand_calculation():
    """If this fails, `megarlhf plan` miscounts an MoE model: experts are held E/ep per GPU and
    their optimizer state is sharded over expert-DP, not DP (hand calculation, Qwen3-30B-A3B)."""
    from megarlhf.planning.plan import ModelShape, estimate_role

    d = _job(**{"actor.model": {"arch": dict(QWEN3_30B_A3B), "dtype": "bf16",
                                "recompute": "full"},
                "actor.num_gpus": 8, "actor.max_tokens_per_micro_batch": 4096,
                "actor.parallel": {"tp": 2, "sequence_parallel": True, "ep": 4, "etp": 1},
                "actor.optimizer": {"name": "adam", "use_distributed_optimizer": True}})
    job = validate(from_dict(JobConfig, d))
    h, a, g, hd, F, E, L, V = 2048, 32, 4, 128, 768, 128, 48, 151936
    attn = 2 * h * a * hd + 2 * h * g * hd  # q, o + k, v = 18,874,368
    experts = 3 * h * F * E  # 603,979,776 per layer
    rep = 2 * h + 2 * hd + E * h  # two norms, q/k norms, the router
    shape = ModelShape.from_model(job.actor.model)
    assert shape.total_params() == L * (attn + experts + rep) + 2 * V * h + h \
        == 30_532_122_624  # Qwen3-30B-A3B's published 30.5B
    est = estimate_role(job, "actor")  # TP2 x DP4; experts EP4 x ETP1, expert-DP 2
    assert est.layout.edp == 2
    vp = 152_064  # 151936 padded to a multiple of 128 * tp
    dense = L * (attn // 2 + rep) + 2 * (vp * h // 2) + h  # 777,205,760
    exp = L * experts // 4  # 7,247,757,312: 32 of 128 experts on each GPU
    (st,) = est.stages
    assert (st.params, st.expert_params) == (dense + exp, exp)
    assert st.weights == 2 * (dense + exp)
    assert st.grads == 4 * (dense + exp)
    # Adam + fp32 main params: 12 bytes, over DP*CP = 4 (dense) and expert-DP = 2 (experts).
    assert st.optimizer == 12 * dense / 4 + 12 * exp / 2


def test_shipped_moe_configs_are_the_real_models():
    """If this fails, the Qwen3-30B-A3B, Qwen3-235B-A22B, DeepSeek-V3, GLM-4.5(-Air) config no
    longer describes the real model (its config.json), or the 235B one stopped being the dense
    200B-class config's sibling on 16 nodes."""
    from megarlhf.config import load_config
    from megarlhf.planning.plan import ModelShape

    small = load_config(os.path.join(REPO, "configs", "qwen3_30b_a3b_grpo_8xh100.yaml"))
    big = load_config(os.path.join(REPO, "configs", "qwen3_235b_a22b_grpo_16nodes.yaml"))
    assert 30.4e9 < ModelShape.from_model(small.actor.model).total_params() < 30.6e9
    assert small.cluster.num_nodes == 1 and small.actor.parallel.ep == 8
    assert 234.9e9 < ModelShape.from_model(big.actor.model).total_params() < 235.2e9
    assert big.cluster.num_nodes == 16 and big.actor.parallel.ep == 64
    # The DeepSeek-V3 lineage: the real config.json of each (but the MTP layer a model given by
    # `arch` cannot carry), sized as published.
    for name, real, low, high, nodes in (
            ("deepseek_v3_671b_grpo_32nodes.yaml", _CONFIG_JSON["deepseek_v3"], 671.0e9, 671.1e9,
             32),
            ("glm45_355b_grpo_16nodes.yaml", _CONFIG_JSON["glm4_moe"], 352.7e9, 352.9e9, 16),
            ("glm45_air_106b_grpo_4nodes.yaml", _CONFIG_JSON["glm4_moe_air"], 106.8e9, 106.9e9,
             4)):
        job = load_config(os.path.join(REPO, "configs", name))
        assert dict(job.actor.model.arch) == dict(real, num_nextn_predict_layers=0), name
        assert low < ModelShape.from_model(job.actor.model).total_params() < high
        assert job.cluster.num_nodes == nodes and job.rollout.engine == "vllm"


def _gib(x):
    return x / 2**30


def test_plan_counts_deepseek_v3_by_hand():
    """If this fails, `megarlhf plan` miscounts DeepSeek-V3 (configs/deepseek_v3_671b_grpo_32nodes
    .yaml) against the hand calculation of docs/benchmarks.md ("Plan memory: DeepSeek-V3 and
    GLM-4.5"): multi-head latent attention (down-projections replicated over TP by Transformer
    Engine), the 3 dense layers, shared experts, the fp32 expert bias, MLA's latent KV cache in
    vLLM, and accepts layouts that run out of memory (or refuses ones that fit)."""
    from megarlhf.config import load_config
    from megarlhf.planning.plan import GIB, ModelShape, make_plan

    job = load_config(os.path.join(REPO, "configs", "deepseek_v3_671b_grpo_32nodes.yaml"))
    h, n, ql, kvl, dn, dr, dv = 7168, 128, 1536, 512, 128, 64, 128
    Fd, Fe, E, L, dense_layers, V = 18432, 2048, 256, 61, 3, 129280
    up = ql * n * (dn + dr) + kvl * n * (dn + dv) + n * dv * h  # q_b, kv_b, o: split over TP
    down = h * ql + h * (kvl + dr)  # q_a, kv_a: replicated over TP (Transformer Engine)
    norms = h + ql + kvl + h  # input, q latent, kv latent, pre-MLP
    assert (up, down) == (171_966_464, 15_138_816)
    dense_mlp, shared, router, experts = 3 * h * Fd, 3 * h * Fe, E * h, E * 3 * h * Fe
    dense_layer = up + down + norms + dense_mlp  # 583,483,392
    moe_layer = up + down + norms + shared + router + experts + E  # + the expert bias
    total = dense_layers * dense_layer + (L - dense_layers) * moe_layer + 2 * V * h + h
    assert total == 671_026_419_200  # DeepSeek-V3's published 671B (without its 14B MTP layer)
    assert ModelShape.from_model(job.actor.model).total_params() == total

    plan = make_plan(job)
    assert plan.fits, plan.problems
    # TP8 x DP32 (PP1), experts EP256 x ETP1 (expert-DP 1): one expert of each MoE layer per GPU.
    t, moe_layers = 8, L - dense_layers
    vp = 130_048  # 129280 padded to a multiple of 128 * 8
    per_dense = (up + dense_mlp) // t + down + norms  # 86,196,224
    per_moe = (up + shared) // t + down + norms + router  # 43,991,040
    dense = dense_layers * per_dense + moe_layers * per_moe + 2 * (vp * h // t) + h
    exp = moe_layers * experts // 256  # 2,554,331,136
    bias = moe_layers * E  # 14,848 fp32
    assert (dense, exp) == (3_043_122_176, 2_554_331_136)
    actor = plan.roles["actor"]
    (st,) = actor.stages
    assert (st.params, st.expert_params, st.buffer_params) == (dense + exp + bias, exp, bias)
    assert st.weights == 2 * (dense + exp) + 4 * bias  # 10.43 GiB
    assert st.grads == 4 * (dense + exp)  # 20.85 GiB
    assert st.optimizer == 12 * dense / 32 + 12 * exp / 1  # 29.61 GiB
    # Activations (full recompute, 4096 tokens, SP over TP8, one micro-batch in flight at PP1):
    # every layer's input, the largest layer's tensors (an MoE layer's), the logits.
    s = 4096
    attn = 3 + 4 * n * (dn + dr) / h + 4 * n * dv / h
    latent = (4 * ql + 2 * (kvl + dr) + 2 * kvl) / h
    moe = 3 + 8 * E / h + 8 * (4 + 8 * Fe / h)
    a_moe = s * h * ((4 + attn) / t + moe / t + 8 * Fe / (h * t) + latent)
    assert a_moe > s * h * ((4 + attn + 3 + 8 * Fd / h) / t + latent)  # the dense layer's
    act = L * 2 * s * h / t + a_moe + s * vp / t * 6
    assert st.activations == pytest.approx(act)
    assert _gib(st.total) == pytest.approx(62.0, abs=0.05)
    ref = plan.roles["reference"].stages[0]  # forward only, 8192 tokens
    assert ref.activations == pytest.approx(2 * a_moe + 2 * s * vp / t * 6)

    # vLLM TP8: the model / 8 in bf16, MLA's down-projections whole on every rank, the expert
    # bias in fp32; the KV cache is the latent (kv_lora + rope dims) per token and layer, whole
    # on every TP rank.
    r = plan.rollout
    weights = (total - bias) * 2 / t + L * down * 2 * (t - 1) / t + bias * 4
    assert r.weights == weights == 169_372_729_088  # 157.74 GiB
    share = 0.94 * 178 * GIB
    assert r.kv == pytest.approx(share - weights - 2 * GIB)
    assert r.kv_tokens == pytest.approx((share - weights - 2 * GIB) / (L * (kvl + dr) * 2))
    # The weight sync: every byte once (bf16, the bias fp32); colocated, so its phase holds the
    # actor's weights, vLLM's weights and a bucket on each side.
    assert plan.sync.total_bytes == (total - bias) * 2 + bias * 4
    phases = {p.active: p for p in plan.phases}
    assert phases["weight sync"].total == pytest.approx(
        st.weights + weights + 2 * 1024 * 2**20 + 3 * GIB)
    assert _gib(phases["weight sync"].total) == pytest.approx(173.17, abs=0.01)
    assert _gib(phases["rollout"].total) == pytest.approx(0.94 * 178 + 3)


def test_plan_counts_glm45_by_hand():
    """If this fails, `megarlhf plan` miscounts GLM-4.5 (configs/glm45_355b_grpo_16nodes.yaml)
    against the hand calculation of docs/benchmarks.md: stage 0 holds the 3 dense layers (dense
    MLPs, no experts), the other stages only MoE layers; shared experts split over TP; q/k/v
    bias and qk-norm; the expert bias."""
    from megarlhf.config import load_config
    from megarlhf.planning.plan import GIB, ModelShape, make_plan

    job = load_config(os.path.join(REPO, "configs", "glm45_355b_grpo_16nodes.yaml"))
    h, a, g, d, Fd, Fe, E, L, V = 5120, 96, 8, 128, 12288, 1536, 160, 92, 151552
    attn = 2 * h * a * d + 2 * h * g * d + a * d + 2 * g * d  # q, o, k, v, q/k/v bias
    norms = 2 * h + 2 * d  # input and pre-MLP norms, q/k norms
    dense_mlp, shared, router, experts = 3 * h * Fd, 3 * h * Fe, E * h, E * 3 * h * Fe
    total = 3 * (attn + norms + dense_mlp) + 89 * (attn + norms + shared + router + experts + E) \
        + 2 * V * h + h
    assert total == ModelShape.from_model(job.actor.model).total_params() == 352_797_829_024

    plan = make_plan(job)
    assert plan.fits, plan.problems
    # TP8 x PP4 x DP4: 23 layers per stage; experts EP32 x ETP1 (expert-DP 1), 5 per GPU.
    t, emb = 8, V * h // 8  # 151552 is a multiple of 128 * 8 already
    per_dense = (attn + dense_mlp) // t + norms
    per_moe = (attn + shared) // t + norms + router
    exp_layer = experts // 32
    want = [  # (dense params, expert params, expert bias) per stage
        (3 * per_dense + 20 * per_moe + emb, 20 * exp_layer, 20 * E),
        (23 * per_moe, 23 * exp_layer, 23 * E),
        (23 * per_moe, 23 * exp_layer, 23 * E),
        (23 * per_moe + h + emb, 23 * exp_layer, 23 * E),
    ]
    actor = plan.roles["actor"]
    got = [(st.params - st.expert_params - st.buffer_params, st.expert_params, st.buffer_params)
           for st in actor.stages]
    assert got == want
    for st, (dn, ex, b) in zip(actor.stages, want):
        assert st.weights == 2 * (dn + ex) + 4 * b
        assert st.grads == 4 * (dn + ex)
        assert st.optimizer == 12 * dn / 4 + 12 * ex  # DP*CP 4; expert-DP 1
    # Full recompute, 4096 tokens, 4 micro-batches in flight on stage 0, 1 on the last.
    s = 4096
    a_moe = s * h * ((4 + 3 + 4 * a * d / h + 4 * g * d / h) / t
                     + (3 + 8 * E / h + 8 * (4 + 8 * Fe / h)) / t + 8 * Fe / (h * t))
    kept = 23 * 2 * s * h / t
    assert actor.stages[0].activations == pytest.approx(4 * kept + a_moe)
    assert actor.stages[3].activations == pytest.approx(kept + a_moe + s * V / t * 6)
    assert actor.worst is actor.stages[3]
    assert _gib(actor.worst.total) == pytest.approx(51.04, abs=0.01)
    # vLLM TP8 (GQA: 8 KV groups, one per GPU): weights 82.1 GiB, KV 2*92*1*128*2 bytes a token.
    r = plan.rollout
    bias = 89 * E
    assert r.weights == (total - bias) * 2 / t + bias * 4
    assert r.kv_tokens == pytest.approx((0.85 * 139 * GIB - r.weights - 2 * GIB)
                                        / (2 * L * 1 * d * 2))
    phases = {p.active: p for p in plan.phases}
    assert _gib(phases["rollout"].total) == pytest.approx(0.85 * 139 + 3)
    assert phases["weight sync"].total == pytest.approx(
        actor.stages[3].weights + r.weights + 2 * 4096 * 2**20 + 3 * GIB)


def test_plan_mla_down_projections_follow_the_layer_spec():
    """If this fails, plan counts MLA's two down-projections as megatron does not place them:
    split by rows over TP in the local spec, whole on every TP rank with Transformer Engine;
    and MLA without a query latent (q_proj) is miscounted."""
    from megarlhf.config.schema import ModelConfig
    from megarlhf.planning.plan import ModelShape

    arch = dict(DEEPSEEK_V3, num_nextn_predict_layers=0)
    te = ModelShape.from_model(ModelConfig(arch=arch))
    local = ModelShape.from_model(ModelConfig(arch=arch, transformer_impl="local"))
    down = 7168 * 1536 + 7168 * 576
    assert te.attention_params()[1] - local.attention_params()[1] == down
    assert local.attention_params()[0] - te.attention_params()[0] == down
    assert te.total_params() == local.total_params()
    no_q_latent = ModelShape.from_model(ModelConfig(arch=dict(arch, q_lora_rank=None)))
    split, rep = no_q_latent.attention_params()
    assert split == 7168 * 128 * 192 + 512 * 128 * 256 + 128 * 128 * 7168
    assert rep == 7168 + 512 + 7168 * 576
    # vLLM caches the latent, the transformers engine every head's keys and values.
    assert te.kv_elements_per_token(8, "vllm") == 61 * 576
    assert te.kv_elements_per_token(8, "hf") == 61 * 16 * (192 + 128)
