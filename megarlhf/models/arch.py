"""Reading a model's architecture: an HF config (from a directory or a dict of its fields).

The HF config is the single description of an architecture in megarlhf: models built from
scratch give its fields under ``model.arch``; pretrained ones bring ``config.json``. It is read
through transformers so every family sees the same normalised view (transformers 5 moves
``rope_theta`` / ``rope_scaling`` into ``rope_parameters``).
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

from megarlhf.config.schema import ModelConfig


class ArchError(ValueError):
    """The architecture cannot be read or is not supported; the message says what to change."""


def _raw_config(model: ModelConfig) -> dict[str, Any]:
    if model.arch is not None:
        return dict(model.arch)
    path = os.path.join(model.hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ArchError(f"model.hf_dir={model.hf_dir!r} has no config.json; point model.hf_dir at "
                        "a Hugging Face model directory")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ArchError(f"{path}: not valid JSON ({e})") from None


MODEL_TYPE_ALIASES = {"kimi_k2": "deepseek_v3"}


def hf_config_from_dict(raw: dict[str, Any]):
    """A transformers ``PretrainedConfig`` for the config fields in ``raw`` (offline)."""
    from transformers import AutoConfig

    from megarlhf.models.families import supported_model_types

    raw = copy.deepcopy(dict(raw))  # transformers fills nested dicts (rope_scaling) in place
    model_type = raw.pop("model_type", None)
    # Checkpoints of these model types are another family's architecture under their own name
    # (Kimi-K2's config.json: model_type kimi_k2, architectures DeepseekV3ForCausalLM).
    model_type = MODEL_TYPE_ALIASES.get(model_type, model_type)
    if model_type is None:
        raise ArchError("the model config has no model_type; add e.g. model_type: llama "
                        f"(supported: {', '.join(supported_model_types())})")
    if model_type not in supported_model_types():
        from megarlhf.models.families import unsupported_message

        raise ArchError(unsupported_message(model_type))
    raw.pop("architectures", None)
    raw.pop("transformers_version", None)
    try:
        return AutoConfig.for_model(model_type, **raw)
    except Exception as e:  # noqa: BLE001 - transformers raises several types for bad fields
        raise ArchError(f"model config ({model_type}) is invalid: {e}") from None


def load_hf_config(model: ModelConfig):
    """The normalised HF config of ``model`` (no weights are read)."""
    return hf_config_from_dict(_raw_config(model))


def arch_summary(model: ModelConfig) -> dict[str, Any]:
    """Numbers the config validator needs: heads, query groups, layers, hidden, vocab; experts,
    their width and top-k for MoE models (``num_experts`` 0 for dense ones).

    Raises:
        ArchError: the architecture is not supported (the message names the field).
    """
    from megarlhf.models.families import UnsupportedArchitecture, arch_spec

    raw = _raw_config(model)
    cfg = hf_config_from_dict(raw)
    try:
        spec = arch_spec(cfg)
    except UnsupportedArchitecture as e:
        raise ArchError(str(e)) from None
    if model.arch is not None and spec.mtp_layers:
        raise ArchError(
            f"model.arch has num_nextn_predict_layers={spec.mtp_layers}: a model built from "
            "scratch has no multi-token-prediction weights to carry (megarlhf does not build "
            "MTP layers); set num_nextn_predict_layers: 0")
    heads = cfg.num_attention_heads
    return {
        "model_type": cfg.model_type,
        "num_layers": cfg.num_hidden_layers,
        "num_attention_heads": heads,
        "num_query_groups": getattr(cfg, "num_key_value_heads", None) or heads,
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        # Multi-head latent attention (DeepSeek-V2/V3 style) carries a KV LoRA rank.
        "mla": getattr(cfg, "kv_lora_rank", None) is not None,
        "num_experts": spec.moe.num_experts if spec.moe else 0,
        "moe_ffn_hidden_size": spec.moe.ffn_hidden_size if spec.moe else 0,
        "moe_topk": spec.moe.topk if spec.moe else 0,
        "moe_groups": spec.moe.num_groups if spec.moe else 1,
        "moe_group_topk": spec.moe.group_topk if spec.moe else 1,
        "moe_shared_ffn_hidden_size": spec.moe.shared_ffn_hidden_size if spec.moe else 0,
        "moe_first_dense_layers": spec.moe.first_dense_layers if spec.moe else 0,
        "max_position_embeddings": spec.max_position_embeddings,
    }
