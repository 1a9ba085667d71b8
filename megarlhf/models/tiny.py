"""Tiny architectures of every supported family, for tests, benchmarks, the demo and debugging.

``tiny_arch("qwen3")`` returns HF config fields; ``save_tiny_hf_model(dir, arch)`` writes a random
transformers model of that architecture (config.json + model.safetensors), built offline.
``tiny_arch("qwen3_moe")`` / ``tiny_arch("mixtral")``: 8 experts, top-2, head_dim 32.
"""

from __future__ import annotations

from typing import Any

import torch


def tiny_arch(family: str = "llama", *, vocab_size: int = 256, hidden_size: int = 64,
              num_layers: int = 4, num_heads: int = 4, num_kv_heads: int = 2,
              ffn: int = 128, tied: bool = False, max_pos: int = 4096,
              **extra: Any) -> dict[str, Any]:
    """HF config fields of a tiny ``family`` model (GQA by default)."""
    arch: dict[str, Any] = {
        "model_type": family,
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": ffn,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "max_position_embeddings": max_pos,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "initializer_range": 0.02,
    }
    if family in ("mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral"):
        arch["sliding_window"] = None
        arch["use_sliding_window"] = False
    if family == "qwen3":
        arch["head_dim"] = hidden_size // num_heads
    if family in ("qwen3_moe", "mixtral", "glm4_moe", "deepseek_v3"):
        arch.update(tiny_moe_fields(family))
    arch.update(extra)
    return arch


def tiny_moe_fields(family: str, num_experts: int = 8, topk: int = 2,
                    expert_ffn: int = 32) -> dict[str, Any]:
    """The MoE fields of a tiny ``qwen3_moe`` / ``mixtral`` (8 experts, top-2, width 32).

    Attention heads are 32 wide (``head_dim`` 32; 4 heads in 2 query groups, so TP2 works):
    vLLM's CPU attention refuses head_dim 16, and these models are meant to run there too.
    """
    out: dict[str, Any] = {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
                           "num_experts_per_tok": topk, "router_aux_loss_coef": 0.01}
    if family == "qwen3_moe":
        out.update(num_experts=num_experts, moe_intermediate_size=expert_ffn,
                   norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
    elif family == "deepseek_v3":
        # DeepSeek-V3 in miniature: GLM-4.5's routing below, and multi-latent attention (a
        # 32-wide query latent, a 16-wide key/value latent, per head 16 + 8 rope query/key dims
        # and 16 value dims; every head its own keys).
        out.update(tiny_moe_fields("glm4_moe", num_experts, topk, expert_ffn))
        for k in ("head_dim", "attention_bias", "use_qk_norm", "partial_rotary_factor",
                  "router_aux_loss_coef"):
            out.pop(k)
        out.update(num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16,
                   qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, rope_interleave=True)
    elif family == "glm4_moe":
        # GLM-4.5's shape in miniature: the first layer dense, a shared expert, sigmoid routing
        # with expert bias, scaled weights, qkv bias, RoPE on half of each head; routing in 2
        # groups of 4 experts of which each token takes the best 1 (DeepSeek-V3's grouped
        # routing; GLM-4.5 itself has one group). No MTP layer (tests add one).
        out.update(n_routed_experts=num_experts, moe_intermediate_size=expert_ffn,
                   num_experts_per_tok=topk, n_shared_experts=1, first_k_dense_replace=1,
                   n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                   attention_bias=True, use_qk_norm=False, partial_rotary_factor=0.5,
                   num_nextn_predict_layers=0)
        out.pop("router_aux_loss_coef")
    else:
        out.update(num_local_experts=num_experts, intermediate_size=expert_ffn,
                   router_jitter_noise=0.0)
    return out


def build_hf_model(arch: dict[str, Any], seed: int = 0, head: str = "lm"):
    """A random transformers model for ``arch`` (fp32, eval mode)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from megarlhf.models.arch import hf_config_from_dict

    cfg = hf_config_from_dict(arch)
    torch.manual_seed(seed)
    if head == "lm":
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    else:
        cfg.num_labels = 1
        cfg.pad_token_id = 0
        model = AutoModelForSequenceClassification.from_config(cfg, dtype=torch.float32)
    # Random init of norms is all ones; perturb them so a mapping mix-up cannot hide.
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith(".bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            elif n.endswith("mlp.gate.weight"):
                # An MoE router: widen the gaps between expert scores so that top-k choices do
                # not hinge on rounding (1e-7 changes) when implementations are compared.
                p.normal_(0.0, 0.5, generator=g)
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):  # sigmoid routing's expert bias
                b.copy_(0.05 * torch.randn(b.shape, generator=g))
    return model.eval()


def save_tiny_hf_model(out_dir: str, arch: dict[str, Any], seed: int = 0, head: str = "lm"):
    """Writes a random ``arch`` model as an HF directory (safetensors); returns the model."""
    model = build_hf_model(arch, seed=seed, head=head)
    model.save_pretrained(out_dir, safe_serialization=True)
    return model
