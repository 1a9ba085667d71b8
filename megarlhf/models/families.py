"""Model families as mapping tables: HF config -> megatron TransformerConfig, HF names <-> Megatron.

One table per family. Llama 2/3/3.1, Mistral, Qwen2 and Qwen3 are all Llama-shaped decoders
(RMSNorm, SwiGLU MLP, RoPE, GQA) that differ in a few switches:

==========  ========  ===========  =========  ==============================
family      qkv bias  qk-norm      head_dim   notes
==========  ========  ===========  =========  ==============================
llama       optional  no           derived    rope scaling (llama3, linear)
mistral     no        no           derived    sliding window not applied (*)
qwen2       yes       no           derived
qwen3       no        yes          explicit
==========  ========  ===========  =========  ==============================

(*) megatron's layers attend over the whole sequence; a Mistral config with a sliding window
shorter than the sequences trained on is refused (raise ``max_position`` or use sequences no
longer than the window).

The weight tables are keyed by megatron parameter names of *one layer-spec flavour*: the local
spec (``input_layernorm``, ``pre_mlp_layernorm``) or Transformer Engine's (the norms fused into
``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight``). Each entry says how the
tensor is split over tensor-parallel ranks (``kind``); :mod:`megarlhf.weights` does the splitting,
fusing and padding for every path weights take.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def supported_model_types() -> tuple[str, ...]:
    return _FAMILIES


class UnsupportedArchitecture(ValueError):
    pass


@dataclass(frozen=True)
class ArchSpec:
    """Everything megarlhf needs to build a family member on megatron."""

    model_type: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    norm_eps: float
    rope_theta: float
    rope_type: str
    qkv_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool
    init_std: float
    hf_config: Any  # the transformers PretrainedConfig it was read from

    def padded_vocab_size(self, tp: int, multiple: int) -> int:
        """Vocabulary padded to a multiple of ``multiple * tp`` (megatron's convention)."""
        m = multiple * tp
        return ((self.vocab_size + m - 1) // m) * m


def arch_spec(hf_config) -> ArchSpec:
    """Reads an :class:`ArchSpec` from a transformers config of a supported family."""
    mt = hf_config.model_type
    if mt not in _FAMILIES:
        raise UnsupportedArchitecture(
            f"model_type {mt!r} is not supported; supported families: {', '.join(_FAMILIES)}"
        )
    act = getattr(hf_config, "hidden_act", "silu")
    if act != "silu":
        raise UnsupportedArchitecture(f"{mt}: hidden_act={act!r} is not supported (only silu)")
    heads = hf_config.num_attention_heads
    groups = getattr(hf_config, "num_key_value_heads", None) or heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    rope = dict(getattr(hf_config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ("default", "linear", "llama3"):
        raise UnsupportedArchitecture(
            f"{mt}: rope_type={rope_type!r} is not supported (default, linear, llama3)"
        )
    if getattr(hf_config, "mlp_bias", False):
        raise UnsupportedArchitecture(f"{mt}: mlp_bias=true is not supported")
    if mt == "qwen2":
        qkv_bias = True
    elif mt == "llama":
        qkv_bias = bool(getattr(hf_config, "attention_bias", False))
    elif mt == "qwen3":
        qkv_bias = bool(getattr(hf_config, "attention_bias", False))
    else:
        qkv_bias = False
    if mt in ("mistral", "qwen2", "qwen3"):
        sw = getattr(hf_config, "sliding_window", None)
        use_sw = getattr(hf_config, "use_sliding_window", mt == "mistral")
        if sw is not None and use_sw and sw < hf_config.max_position_embeddings:
            raise UnsupportedArchitecture(
                f"{mt}: sliding_window={sw} < max_position_embeddings="
                f"{hf_config.max_position_embeddings} is not supported (megatron attends over the "
                "whole sequence); set sliding_window: null or max_position_embeddings <= window"
            )
    return ArchSpec(
        model_type=mt,
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size,
        num_attention_heads=heads,
        num_query_groups=groups,
        head_dim=head_dim,
        vocab_size=hf_config.vocab_size,
        max_position_embeddings=hf_config.max_position_embeddings,
        norm_eps=hf_config.rms_norm_eps,
        rope_theta=float(rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))),
        rope_type=rope_type,
        qkv_bias=qkv_bias,
        qk_norm=(mt == "qwen3"),
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        init_std=float(getattr(hf_config, "initializer_range", 0.02)),
        hf_config=hf_config,
    )


def hf_inv_freq(spec: ArchSpec) -> torch.Tensor | None:
    """RoPE inverse frequencies computed exactly as transformers does for scaled rope types.

    Megatron only implements llama3 scaling with fixed low/high frequency factors; to match any
    config we overwrite its ``inv_freq`` with transformers' own. None for plain rope.
    """
    if spec.rope_type == "default":
        return None
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[spec.rope_type](spec.hf_config, "cpu")
    if abs(float(attention_scaling) - 1.0) > 1e-12:
        raise UnsupportedArchitecture(
            f"rope_type={spec.rope_type!r} scales attention by {attention_scaling}; not supported"
        )
    return inv_freq.float()


# --- weight-name tables --------------------------------------------------------------------
#
# kind: how a megatron tensor relates to its HF tensor(s) and how it is split over TP ranks.
#   replicated   same tensor on every TP rank (norms, scalar head)
#   vocab        rows = vocabulary, padded to the padded vocab size, split by rows
#   column       split by rows (output features)               (unused by these families)
#   row          split by columns (input features): o_proj, down_proj
#   qkv          q, k, v fused per query group, split by groups:  rows [q_g, k_g, v_g] for g
#   gate_up      gate and up fused as [gate; up], each half split by rows


@dataclass(frozen=True)
class ParamMap:
    megatron: str  # megatron name; "{l}" is the layer index inside the model chunk
    hf: tuple[str, ...]  # HF names; "{L}" is the global layer index
    kind: str


def layer_param_maps(spec: ArchSpec, te: bool) -> list[ParamMap]:
    """Per-layer entries (templates with {l} / {L})."""
    p = "decoder.layers.{l}."
    h = "model.layers.{L}."
    m = [
        ParamMap(p + ("self_attention.linear_qkv.layer_norm_weight" if te else "input_layernorm.weight"),
                 (h + "input_layernorm.weight",), "replicated"),
        ParamMap(p + "self_attention.linear_qkv.weight",
                 (h + "self_attn.q_proj.weight", h + "self_attn.k_proj.weight",
                  h + "self_attn.v_proj.weight"), "qkv"),
        ParamMap(p + "self_attention.linear_proj.weight", (h + "self_attn.o_proj.weight",), "row"),
        ParamMap(p + ("mlp.linear_fc1.layer_norm_weight" if te else "pre_mlp_layernorm.weight"),
                 (h + "post_attention_layernorm.weight",), "replicated"),
        ParamMap(p + "mlp.linear_fc1.weight",
                 (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"), "gate_up"),
        ParamMap(p + "mlp.linear_fc2.weight", (h + "mlp.down_proj.weight",), "row"),
    ]
    if spec.qkv_bias:
        m.append(ParamMap(p + "self_attention.linear_qkv.bias",
                          (h + "self_attn.q_proj.bias", h + "self_attn.k_proj.bias",
                           h + "self_attn.v_proj.bias"), "qkv"))
    if spec.qk_norm:
        m.append(ParamMap(p + "self_attention.q_layernorm.weight",
                          (h + "self_attn.q_norm.weight",), "replicated"))
        m.append(ParamMap(p + "self_attention.k_layernorm.weight",
                          (h + "self_attn.k_norm.weight",), "replicated"))
    return m


def embedding_param_map() -> ParamMap:
    return ParamMap("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab")


def final_norm_param_map() -> ParamMap:
    return ParamMap("decoder.final_layernorm.weight", ("model.norm.weight",), "replicated")


def output_param_map(head: str) -> ParamMap:
    """The output layer: the LM head (vocab-parallel) or a scalar head (critic / reward model).

    Scalar heads export as transformers' ``*ForSequenceClassification`` ``score`` (num_labels=1).
    """
    if head == "lm":
        return ParamMap("output_layer.weight", ("lm_head.weight",), "vocab")
    return ParamMap("output_layer.weight", ("score.weight",), "replicated")
