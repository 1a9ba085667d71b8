"""Tiny architectures of every supported family, for tests, benchmarks, the demo and debugging.

``tiny_arch("qwen3")`` returns HF config fields; ``save_tiny_hf_model(dir, arch)`` writes a random
transformers model of that architecture (config.json + model.safetensors), built offline.
"""

from __future__ import annotations

from typing import Any

import torch


def tiny_arch(family: str = "llama", *, vocab_size: int = 256, hidden_size: int = 64,
              num_layers: int = 4, num_heads: int = 4, num_kv_heads: int = 2,
              ffn: int = 128, tied: bool = False, max_pos: int = 256,
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
    if family in ("mistral", "qwen2", "qwen3"):
        arch["sliding_window"] = None
        arch["use_sliding_window"] = False
    if family == "qwen3":
        arch["head_dim"] = hidden_size // num_heads
    arch.update(extra)
    return arch


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
    return model.eval()


def save_tiny_hf_model(out_dir: str, arch: dict[str, Any], seed: int = 0, head: str = "lm"):
    """Writes a random ``arch`` model as an HF directory (safetensors); returns the model."""
    model = build_hf_model(arch, seed=seed, head=head)
    model.save_pretrained(out_dir, safe_serialization=True)
    return model
