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

Mixture-of-experts families replace every layer's MLP with a router and ``E`` SwiGLU experts:

==========  =======================  ==========================  ==============================
family      attention                routing                     HF names (on disk) of layer L
==========  =======================  ==========================  ==============================
qwen3_moe   as qwen3 (qk-norm)       softmax, top-k (8 of 128),  mlp.gate, mlp.experts.{e}.
                                     renormalised (norm_topk)    {gate,up,down}_proj
mixtral     as mistral               softmax, top-k (2 of 8),    block_sparse_moe.gate,
                                     renormalised                block_sparse_moe.experts.{e}.
                                                                 {w1,w3,w2} (gate, up, down)
==========  =======================  ==========================  ==============================

Neither has shared experts, grouped routing or dense layers: a qwen3_moe / mixtral config asking
for any of those is refused naming the field (:data:`UNSUPPORTED_MOE_FIELDS`). The router runs
in fp32 (``moe_router_dtype``), as transformers computes its softmax.

The DeepSeek-V3 lineage routes differently (``glm4_moe`` here; ``deepseek_v3`` adds multi-head
latent attention):

==========  =============================  ====================================================
glm4_moe    attention                      GQA, q/k/v bias (``attention_bias``), optional
                                           qk-norm, RoPE on the first ``partial_rotary_factor``
                                           of each head (rotate-half, not interleaved)
            layers                         the first ``first_k_dense_replace`` layers dense
                                           (``intermediate_size``), the rest MoE
            routing                        sigmoid scores; top-k chosen on score + expert bias
                                           (``mlp.gate.e_score_correction_bias``, fp32),
                                           optionally within the best ``topk_group`` of
                                           ``n_group`` groups; the chosen k scores (without the
                                           bias) renormalised, times ``routed_scaling_factor``
            shared experts                 ``mlp.shared_experts.{gate,up,down}_proj``, width
                                           ``moe_intermediate_size * n_shared_experts``, added
                                           to every MoE layer's output (no gate)
            multi-token prediction         the ``num_nextn_predict_layers`` layers after the
                                           last (``model.layers.{N..}``) are not built: their
                                           tensors are carried unchanged from the source
                                           checkpoint into every export (:data:`ArchSpec.mtp_layers`)
==========  =============================  ====================================================

``deepseek_v3`` (DeepSeek-V3/R1; Kimi-K2's ``kimi_k2`` configs read as it) routes the same way
and replaces GQA with multi-head latent attention (:class:`MLASpec`): ``q_a_proj`` ->
``q_a_layernorm`` -> ``q_b_proj`` (or ``q_proj`` without a query latent), ``kv_a_proj_with_mqa``
(the key/value latent and one RoPE key shared by all heads) -> ``kv_a_layernorm`` ->
``kv_b_proj`` (per head [k_nope; v]), ``o_proj``: megatron's MLA with the same tensors
unchanged, interleaved RoPE on the rope dims, default or yarn rope (softmax scale included).
vLLM's CPU build does not run MLA: on CPU its rollouts use the transformers engine.

The expert bias is not trained by gradients: megatron adds ``rate * sign(mean load - load)`` to
it after every optimizer step (``moe_router_enable_expert_bias``, the aux-loss-free balancing of
DeepSeek-V3), from the tokens each expert received in that step.

HF names: the contract is the names a checkpoint holds *on disk* (one tensor per expert, as
above). transformers 5 keeps the experts of a layer fused in memory (``mlp.experts.gate_up_proj``
``(E, 2F, H)`` = [gate; up] per expert, ``mlp.experts.down_proj`` ``(E, H, F)``, and Mixtral's
``block_sparse_moe`` renamed ``mlp``) and converts on ``save_pretrained`` / ``from_pretrained``;
:func:`hf_experts_fused_to_disk` / :func:`hf_experts_disk_to_fused` do the same for a state dict.

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

_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral", "glm4_moe",
             "deepseek_v3")
MOE_FAMILIES = ("qwen3_moe", "mixtral", "glm4_moe", "deepseek_v3")
# Families routed as DeepSeek-V3 (sigmoid + expert bias, shared experts, leading dense layers).
SIGMOID_FAMILIES = ("glm4_moe", "deepseek_v3")

# MoE model types transformers knows but megarlhf does not build, with what they need.
_UNSUPPORTED_MOE_TYPES = {
    "qwen2_moe": "shared experts (shared_expert_intermediate_size)",
    "deepseek_v2": "multi-head latent attention (kv_lora_rank), shared experts "
                   "(n_shared_experts) and grouped routing (n_group, topk_group)",
    "gpt_oss": "attention sinks, biased experts and a clamped SwiGLU",
}

# Fields that turn a qwen3_moe / mixtral config into a variant megarlhf does not build, each with
# the value that means "off" and what it would need.
UNSUPPORTED_MOE_FIELDS = {
    "shared_expert_intermediate_size": ((None, 0), "shared experts"),
    "n_shared_experts": ((None, 0), "shared experts"),
    "num_shared_experts": ((None, 0), "shared experts"),
    "moe_shared_expert_intermediate_size": ((None, 0), "shared experts"),
    "n_group": ((None, 1), "grouped (node-limited) routing"),
    "topk_group": ((None, 1), "grouped (node-limited) routing"),
    "kv_lora_rank": ((None,), "multi-head latent attention (MLA)"),
    "q_lora_rank": ((None,), "multi-head latent attention (MLA)"),
    "first_k_dense_replace": ((None, 0), "dense layers among MoE layers"),
    "mlp_only_layers": ((None, ()), "dense layers among MoE layers"),
    "decoder_sparse_step": ((None, 1), "dense layers among MoE layers"),
    "router_jitter_noise": ((None, 0.0), "random router jitter in training"),
    "topk_method": ((None, "greedy"), "grouped routing"),
    "scoring_func": ((None, "softmax"), "a router score function other than softmax"),
}


def supported_model_types() -> tuple[str, ...]:
    return _FAMILIES


def unsupported_message(model_type: str) -> str:
    """Why ``model_type`` is refused (what it needs, for known MoE variants)."""
    need = _UNSUPPORTED_MOE_TYPES.get(model_type)
    if need:
        return (f"model_type {model_type!r} is not supported: it needs {need}, which megarlhf "
                f"does not build; supported families: {', '.join(_FAMILIES)}")
    return f"model_type {model_type!r} is not supported; supported families: {', '.join(_FAMILIES)}"


class UnsupportedArchitecture(ValueError):
    pass


@dataclass(frozen=True)
class MoESpec:
    """The mixture-of-experts part of an architecture (every layer's MLP is MoE).

    Attributes:
        num_experts: routed experts per layer ``E``.
        ffn_hidden_size: each expert's SwiGLU width ``F``.
        topk: experts per token ``k``.
        norm_topk_prob: the k chosen probabilities are renormalised to sum to 1.
        aux_loss_coeff: the HF config's ``router_aux_loss_coef``.
        hf_block: HF module of the MoE block on disk (``mlp`` or ``block_sparse_moe``).
        hf_gate_up_down: HF names of an expert's gate, up and down projections.
        score_function: ``softmax`` or ``sigmoid`` (DeepSeek-V3 lineage).
        expert_bias: the router has a per-expert bias used for choosing experts only
            (``e_score_correction_bias``; megatron's ``expert_bias`` buffer, fp32).
        num_groups: expert groups of grouped (node-limited) routing (1: not grouped).
        group_topk: groups each token may choose from (1 when not grouped).
        routed_scaling: factor on the routed experts' weights (1.0: none).
        shared_ffn_hidden_size: width of the shared experts' MLP (0: no shared experts).
        first_dense_layers: the first this many layers have a dense MLP (not MoE).
    """

    num_experts: int
    ffn_hidden_size: int
    topk: int
    norm_topk_prob: bool
    aux_loss_coeff: float
    hf_block: str
    hf_gate_up_down: tuple[str, str, str]
    score_function: str = "softmax"
    expert_bias: bool = False
    num_groups: int = 1
    group_topk: int = 1
    routed_scaling: float = 1.0
    shared_ffn_hidden_size: int = 0
    first_dense_layers: int = 0

    def is_moe_layer(self, layer: int) -> bool:
        """Whether global layer ``layer`` (0-based) has the MoE block (else a dense MLP)."""
        return layer >= self.first_dense_layers


@dataclass(frozen=True)
class MLASpec:
    """Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2): queries through a low-rank
    ``q_lora_rank`` latent (or a plain projection when None), keys and values from one shared
    ``kv_lora_rank`` latent plus a ``qk_rope_head_dim`` RoPE key shared by all heads.

    Attributes:
        q_lora_rank: the query latent's width, None for a direct q projection.
        kv_lora_rank: the key/value latent's width.
        qk_nope_head_dim / qk_rope_head_dim: each head's query/key dims without / with RoPE.
        v_head_dim: each head's value dims.
        rope: megatron's rope fields (``rope_type`` rope or yarn and the yarn parameters).
    """

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope: tuple[tuple[str, Any], ...]


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
    moe: MoESpec | None = None  # None for dense models
    rotary_percent: float = 1.0  # the share of each head's dims RoPE rotates (the first ones)
    mtp_layers: int = 0  # multi-token-prediction layers after the last: carried, not built
    mla: MLASpec | None = None  # multi-head latent attention (deepseek_v3) instead of GQA

    def is_moe_layer(self, layer: int) -> bool:
        """Whether global layer ``layer`` (0-based) has an MoE block."""
        return self.moe is not None and self.moe.is_moe_layer(layer)

    @property
    def dense_ffn_hidden_size(self) -> int:
        """Width of the dense layers' MLP (``ffn_hidden_size``; for an MoE family whose layers
        are all MoE it is the experts' width and no dense layer exists)."""
        return self.ffn_hidden_size

    def padded_vocab_size(self, tp: int, multiple: int) -> int:
        """Vocabulary padded to a multiple of ``multiple * tp`` (megatron's convention)."""
        m = multiple * tp
        return ((self.vocab_size + m - 1) // m) * m


def arch_spec(hf_config) -> ArchSpec:
    """Reads an :class:`ArchSpec` from a transformers config of a supported family."""
    mt = hf_config.model_type
    if mt not in _FAMILIES:
        raise UnsupportedArchitecture(unsupported_message(mt))
    act = getattr(hf_config, "hidden_act", "silu")
    if act != "silu":
        raise UnsupportedArchitecture(f"{mt}: hidden_act={act!r} is not supported (only silu)")
    heads = hf_config.num_attention_heads
    groups = getattr(hf_config, "num_key_value_heads", None) or heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    rope = dict(getattr(hf_config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    mla = _mla_spec(hf_config, rope) if mt == "deepseek_v3" else None
    if mla is not None:
        heads = hf_config.num_attention_heads
        groups = heads  # every head has its own keys (from the shared latent)
        head_dim = mla.qk_nope_head_dim + mla.qk_rope_head_dim
    elif rope_type not in ("default", "linear", "llama3"):
        raise UnsupportedArchitecture(
            f"{mt}: rope_type={rope_type!r} is not supported (default, linear, llama3)"
        )
    if getattr(hf_config, "mlp_bias", False):
        raise UnsupportedArchitecture(f"{mt}: mlp_bias=true is not supported")
    if mla is not None:
        qkv_bias = False
    elif mt == "qwen2":
        qkv_bias = True
    elif mt in ("llama", "qwen3", "qwen3_moe", "glm4_moe"):
        qkv_bias = bool(getattr(hf_config, "attention_bias", False))
    else:
        qkv_bias = False
    moe = _moe_spec(hf_config) if mt in MOE_FAMILIES else None
    rotary_percent = 1.0 if mla is not None else float(rope.get(
        "partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", 1.0)) or 1.0)
    if not 0.0 < rotary_percent <= 1.0 or int(head_dim * rotary_percent) % 2:
        raise UnsupportedArchitecture(
            f"{mt}: partial_rotary_factor={rotary_percent} must be in (0, 1] and rotate an even "
            f"number of each head's {head_dim} dims")
    mtp = int(getattr(hf_config, "num_mtp_layers", 0) or 0) if mt in SIGMOID_FAMILIES else 0
    if mt in ("mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral"):
        sw = getattr(hf_config, "sliding_window", None)
        use_sw = getattr(hf_config, "use_sliding_window", mt in ("mistral", "mixtral"))
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
        # The dense MLP's width; in a family whose layers are all MoE, the experts' width.
        ffn_hidden_size=moe.ffn_hidden_size if moe and not moe.first_dense_layers
        else hf_config.intermediate_size,
        num_attention_heads=heads,
        num_query_groups=groups,
        head_dim=head_dim,
        vocab_size=hf_config.vocab_size,
        max_position_embeddings=hf_config.max_position_embeddings,
        norm_eps=hf_config.rms_norm_eps,
        rope_theta=float(rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))),
        rope_type=rope_type,
        qkv_bias=qkv_bias,
        qk_norm=mt in ("qwen3", "qwen3_moe") or (
            mt == "glm4_moe" and bool(getattr(hf_config, "use_qk_norm", False))),
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        init_std=float(getattr(hf_config, "initializer_range", 0.02)),
        hf_config=hf_config,
        moe=moe,
        rotary_percent=rotary_percent,
        mtp_layers=mtp,
        mla=mla,
    )


def _mla_spec(hf_config, rope: dict) -> MLASpec:
    """The attention fields of a deepseek_v3 config as megatron's MLA computes them (exactly
    transformers' DeepseekV3Attention: interleaved RoPE on the rope dims, yarn's frequencies,
    cos/sin factor and softmax scale); refuses what megatron computes differently."""
    mt = hf_config.model_type

    def refuse(msg: str):
        raise UnsupportedArchitecture(f"{mt}: {msg}")

    if getattr(hf_config, "attention_bias", False):
        refuse("attention_bias=true is not supported: megatron's multi-latent attention has no "
               "biases on its q/kv projections; set attention_bias: false")
    if not getattr(hf_config, "rope_interleave", True):
        refuse("rope_interleave=false is not supported (DeepSeek-V3, R1 and Kimi-K2 interleave "
               "their rope dims, as megatron's MLA does); set rope_interleave: true")
    eps = float(hf_config.rms_norm_eps)
    if abs(eps - 1e-6) > 1e-12:
        refuse(f"rms_norm_eps={eps} is not supported: transformers' q/kv latent norms always "
               "use 1e-6 and megatron's use rms_norm_eps, so they agree only at 1e-6")
    rope_type = rope.get("rope_type", "default")
    theta = float(rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))
    if rope_type == "default":
        # mscale_all_dim 0: megatron applies yarn's softmax factor even to plain rope otherwise.
        kw: dict[str, Any] = dict(rope_type="rope", rotary_base=theta, rotary_scaling_factor=1.0,
                                  mscale=1.0, mscale_all_dim=0.0)
    elif rope_type == "yarn":
        orig = rope.get("original_max_position_embeddings")
        if not orig:
            refuse("yarn rope_parameters need original_max_position_embeddings")
        factor = rope.get("factor") or hf_config.max_position_embeddings / orig
        m, mad = rope.get("mscale"), rope.get("mscale_all_dim")
        if rope.get("attention_factor") is not None:
            refuse("yarn with an explicit attention_factor is not supported by megatron's MLA; "
                   "remove it (it is derived from factor and mscale)")
        if rope.get("truncate", True) is not True:
            refuse("yarn with truncate=false is not supported by megatron's MLA")
        if not mad:
            m, mad = 1.0, 0.0  # transformers scales cos/sin by get_mscale(factor) only
        elif not m:
            refuse("yarn with mscale_all_dim but no mscale is not supported; set mscale")
        kw = dict(rope_type="yarn", rotary_base=theta, rotary_scaling_factor=float(factor),
                  mscale=float(m), mscale_all_dim=float(mad),
                  original_max_position_embeddings=int(orig),
                  beta_fast=float(rope.get("beta_fast") or 32),
                  beta_slow=float(rope.get("beta_slow") or 1))
    else:
        refuse(f"rope_type={rope_type!r} is not supported with multi-latent attention "
               "(default, yarn)")
    q = getattr(hf_config, "q_lora_rank", None)
    return MLASpec(q_lora_rank=int(q) if q else None, kv_lora_rank=int(hf_config.kv_lora_rank),
                   qk_nope_head_dim=int(hf_config.qk_nope_head_dim),
                   qk_rope_head_dim=int(hf_config.qk_rope_head_dim),
                   v_head_dim=int(hf_config.v_head_dim), rope=tuple(sorted(kw.items())))


def _is_off(value: Any, off: tuple) -> bool:
    if isinstance(value, (list, tuple)) and () in off:
        return len(value) == 0
    return any(value == o or (value is None and o is None) for o in off)


def _moe_spec(hf_config) -> MoESpec:
    """The MoE fields of an MoE family's config; refuses variants naming the field."""
    mt = hf_config.model_type
    if mt in SIGMOID_FAMILIES:
        return _sigmoid_moe_spec(hf_config)
    for fname, (off, what) in UNSUPPORTED_MOE_FIELDS.items():
        v = getattr(hf_config, fname, None)
        if not _is_off(v, off):
            raise UnsupportedArchitecture(
                f"{mt}: {fname}={v!r} asks for {what}, which megarlhf does not build; "
                f"remove it (or set it to {off[-1]!r})")
    num_experts = getattr(hf_config, "num_local_experts", None) or \
        getattr(hf_config, "num_experts", None)
    topk = getattr(hf_config, "num_experts_per_tok", None)
    if not num_experts or not topk:
        raise UnsupportedArchitecture(
            f"{mt}: the config needs num_experts (num_local_experts) and num_experts_per_tok")
    if topk > num_experts:
        raise UnsupportedArchitecture(
            f"{mt}: num_experts_per_tok={topk} is larger than the {num_experts} experts")
    if mt == "qwen3_moe":
        ffn = hf_config.moe_intermediate_size
        norm = bool(getattr(hf_config, "norm_topk_prob", False))
        block, names = "mlp", ("gate_proj", "up_proj", "down_proj")
    else:  # mixtral: intermediate_size is each expert's width; the top-k is renormalised
        ffn = hf_config.intermediate_size
        norm = True
        block, names = "block_sparse_moe", ("w1", "w3", "w2")
    if int(topk) == 1 and norm:
        # Renormalising one chosen probability makes every routing weight exactly 1: the router
        # gets no gradient through the output. megatron-core refuses it (top-1 needs the
        # pre-softmax router, i.e. weights that are not renormalised).
        fix = ("set norm_topk_prob=false (the chosen expert's softmax probability weights its "
               "output) or num_experts_per_tok >= 2" if mt == "qwen3_moe" else
               "Mixtral always renormalises, so use num_experts_per_tok >= 2 (for upcycling: "
               "--topk 2)")
        raise UnsupportedArchitecture(
            f"{mt}: num_experts_per_tok=1 with renormalised routing weights gives every token's "
            f"expert weight 1 and the router no gradient, which megatron-core does not build; "
            f"{fix}")
    return MoESpec(num_experts=int(num_experts), ffn_hidden_size=int(ffn), topk=int(topk),
                   norm_topk_prob=norm,
                   aux_loss_coeff=float(getattr(hf_config, "router_aux_loss_coef", 0.0) or 0.0),
                   hf_block=block, hf_gate_up_down=names)


# Fields of DeepSeek-V3 / GLM-4.5 configs (their remote code's, which real config.json files
# carry) that would change the model, each with the values megarlhf builds and what else needs.
SIGMOID_FAMILY_FIELDS = {
    "scoring_func": ((None, "sigmoid"), "a router score other than sigmoid"),
    "topk_method": ((None, "noaux_tc"), "a routing method other than DeepSeek-V3's bias-corrected "
                                        "(noaux_tc) grouped top-k"),
    "moe_layer_freq": ((None, 1), "MoE layers other than every layer after the dense ones"),
    "quantization_config": ((None,), "quantized weights (DeepSeek-V3 ships FP8 blocks): convert "
                                     "them to bf16 first (e.g. DeepSeek's fp8_cast_bf16.py), "
                                     "then drop quantization_config"),
}


def _sigmoid_moe_spec(hf_config) -> MoESpec:
    """The MoE fields of a DeepSeek-V3-style config (glm4_moe): sigmoid routing with expert bias,
    optional groups, shared experts, leading dense layers. Refuses what megatron computes
    differently from transformers, naming the field."""
    mt = hf_config.model_type
    n = getattr(hf_config, "n_routed_experts", None)
    topk = getattr(hf_config, "num_experts_per_tok", None)
    layers = hf_config.num_hidden_layers

    def refuse(msg: str):
        raise UnsupportedArchitecture(f"{mt}: {msg}")

    for fname, (on, what) in SIGMOID_FAMILY_FIELDS.items():
        v = getattr(hf_config, fname, None)
        if not _is_off(v, on):
            refuse(f"{fname}={v!r} asks for {what}, which megarlhf does not build"
                   + ("" if fname == "quantization_config" else
                      f"; remove it (or set it to {on[-1]!r})"))
    if not n or not topk:
        refuse("the config needs n_routed_experts and num_experts_per_tok")
    n, topk = int(n), int(topk)
    if topk > n:
        refuse(f"num_experts_per_tok={topk} is larger than the {n} routed experts")
    if not getattr(hf_config, "norm_topk_prob", True) and topk > 1:
        refuse("norm_topk_prob=false with sigmoid routing is not supported: megatron always "
               "renormalises the chosen experts' sigmoid scores; set norm_topk_prob=true")
    if topk == 1:
        refuse("num_experts_per_tok=1 with sigmoid routing is not supported (transformers "
               "renormalises the one score to 1, megatron does not); use num_experts_per_tok>=2")
    groups = int(getattr(hf_config, "n_group", 1) or 1)
    gtopk = int(getattr(hf_config, "topk_group", 1) or 1)
    if groups > 1 or gtopk > 1:
        if n % groups:
            refuse(f"n_routed_experts={n} is not divisible by n_group={groups}")
        if not 1 <= gtopk <= groups:
            refuse(f"topk_group={gtopk} must be between 1 and n_group={groups}")
        # transformers scores a group by its 2 best experts; megatron by its topk/topk_group best.
        if topk % gtopk or topk // gtopk != 2:
            refuse(f"grouped routing with num_experts_per_tok={topk} and topk_group={gtopk} is "
                   "not supported: transformers scores a group by the sum of its 2 best experts, "
                   "megatron by its num_experts_per_tok/topk_group best, which agree only when "
                   f"num_experts_per_tok = 2 * topk_group (e.g. topk_group={topk // 2})")
        if gtopk * (n // groups) < topk:
            refuse(f"topk_group={gtopk} groups of {n // groups} experts hold fewer than "
                   f"num_experts_per_tok={topk} experts")
    dense = int(getattr(hf_config, "first_k_dense_replace", 0) or 0)
    if not 0 <= dense < layers:
        refuse(f"first_k_dense_replace={dense} must leave at least one of the {layers} layers "
               "MoE (a model without MoE layers is a dense model: use its dense family)")
    shared = int(getattr(hf_config, "n_shared_experts", 0) or 0)
    width = int(hf_config.moe_intermediate_size)
    return MoESpec(num_experts=n, ffn_hidden_size=width, topk=topk, norm_topk_prob=True,
                   aux_loss_coeff=0.0, hf_block="mlp",
                   hf_gate_up_down=("gate_proj", "up_proj", "down_proj"),
                   score_function="sigmoid", expert_bias=True,
                   num_groups=groups if groups > 1 else 1, group_topk=gtopk if groups > 1 else 1,
                   routed_scaling=float(getattr(hf_config, "routed_scaling_factor", 1.0) or 1.0),
                   shared_ffn_hidden_size=width * shared, first_dense_layers=dense)


def hf_inv_freq(spec: ArchSpec) -> torch.Tensor | None:
    """RoPE inverse frequencies computed exactly as transformers does for scaled rope types.

    Megatron only implements llama3 scaling with fixed low/high frequency factors; to match any
    config we overwrite its ``inv_freq`` with transformers' own. None for plain rope.
    """
    if spec.rope_type == "default" or spec.mla is not None:  # MLA: megatron's own rope / yarn
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
#   fp32         replicated, and fp32 on every path (the router's expert bias: its updates are
#                finer than bf16 resolves)
#   vocab        rows = vocabulary, padded to the padded vocab size, split by rows
#   column       split by rows (output features)               (unused by these families)
#   row          split by columns (input features): o_proj, down_proj
#   qkv          q, k, v fused per query group, split by groups:  rows [q_g, k_g, v_g] for g
#   gate_up      gate and up fused as [gate; up], each half split by rows
#
# Expert weights (``expert=True``) use the same kinds but are split over the expert-tensor-parallel
# ranks (etp) instead of tp, and a rank holds experts ep_rank * E/ep ... (ep_rank + 1) * E/ep - 1.


@dataclass(frozen=True)
class ParamMap:
    megatron: str  # megatron name; "{l}" is the layer index inside the model chunk
    hf: tuple[str, ...]  # HF names; "{L}" is the global layer index, "{E}" the global expert
    kind: str
    expert: bool = False  # an expert weight: split over etp ranks; "{i}" is the local expert


def layer_param_maps(spec: ArchSpec, te: bool, moe_layer: bool | None = None) -> list[ParamMap]:
    """Per-layer entries (templates with {l} / {L}) of an MoE layer (``moe_layer``) or a dense
    one (:meth:`ArchSpec.is_moe_layer` says which a layer is); ``None``: MoE for an MoE family."""
    moe_layer = spec.moe is not None and (moe_layer is None or moe_layer)
    p = "decoder.layers.{l}."
    h = "model.layers.{L}."
    if spec.mla is not None:
        m = _mla_param_maps(spec, te)
    else:
        m = [
            ParamMap(p + ("self_attention.linear_qkv.layer_norm_weight" if te
                          else "input_layernorm.weight"),
                     (h + "input_layernorm.weight",), "replicated"),
            ParamMap(p + "self_attention.linear_qkv.weight",
                     (h + "self_attn.q_proj.weight", h + "self_attn.k_proj.weight",
                      h + "self_attn.v_proj.weight"), "qkv"),
            ParamMap(p + "self_attention.linear_proj.weight", (h + "self_attn.o_proj.weight",),
                     "row"),
        ]
    if moe_layer:
        # An MoE layer keeps its pre-MLP norm as a module of its own in both specs; the router
        # is replicated over TP (fp32 logits; TP ranks see the same, or their SP share of, tokens).
        b = h + spec.moe.hf_block + "."
        m += [
            ParamMap(p + "pre_mlp_layernorm.weight", (h + "post_attention_layernorm.weight",),
                     "replicated"),
            ParamMap(p + "mlp.router.weight", (b + "gate.weight",), "replicated"),
        ]
        if spec.moe.expert_bias:
            # A buffer, not a parameter: changed by megatron from the experts' load, kept fp32.
            m.append(ParamMap(p + "mlp.router.expert_bias", (b + "gate.e_score_correction_bias",),
                              "fp32"))
        if spec.moe.shared_ffn_hidden_size:
            # Shared experts are a dense MLP inside the MoE block: split over TP, not EP/ETP.
            m += [
                ParamMap(p + "mlp.shared_experts.linear_fc1.weight",
                         (b + "shared_experts.gate_proj.weight", b + "shared_experts.up_proj.weight"),
                         "gate_up"),
                ParamMap(p + "mlp.shared_experts.linear_fc2.weight",
                         (b + "shared_experts.down_proj.weight",), "row"),
            ]
    else:
        m += [
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


def _mla_param_maps(spec: ArchSpec, te: bool) -> list[ParamMap]:
    """Multi-latent attention's entries: every tensor is the HF one unchanged (per head
    [nope; rope] rows for q, [k_nope; v] for kv_up, [kv latent; rope key] for the kv
    down-projection). The down-projections are split by rows over TP in megatron's local spec
    (and gathered inside the layer: whole-row chunks, ``column``), replicated in Transformer
    Engine's; there the latent norms are fused into the up-projections."""
    p = "decoder.layers.{l}.self_attention."
    h = "model.layers.{L}."
    a = h + "self_attn."
    down = "replicated" if te else "column"
    m = [ParamMap("decoder.layers.{l}.input_layernorm.weight", (h + "input_layernorm.weight",),
                  "replicated")]
    if spec.mla.q_lora_rank is None:
        m.append(ParamMap(p + "linear_q_proj.weight", (a + "q_proj.weight",), "column"))
    else:
        m += [
            ParamMap(p + "linear_q_down_proj.weight", (a + "q_a_proj.weight",), down),
            ParamMap(p + ("linear_q_up_proj.layer_norm_weight" if te else "q_layernorm.weight"),
                     (a + "q_a_layernorm.weight",), "replicated"),
            ParamMap(p + "linear_q_up_proj.weight", (a + "q_b_proj.weight",), "column"),
        ]
    m += [
        ParamMap(p + "linear_kv_down_proj.weight", (a + "kv_a_proj_with_mqa.weight",), down),
        ParamMap(p + ("linear_kv_up_proj.layer_norm_weight" if te else "kv_layernorm.weight"),
                 (a + "kv_a_layernorm.weight",), "replicated"),
        ParamMap(p + "linear_kv_up_proj.weight", (a + "kv_b_proj.weight",), "column"),
        ParamMap(p + "linear_proj.weight", (a + "o_proj.weight",), "row"),
    ]
    return m


def expert_param_maps(spec: ArchSpec, grouped: bool) -> list[ParamMap]:
    """Per-expert entries of an MoE layer ({l}: layer in chunk, {i}: local expert; {L}, {E}).

    ``grouped``: Transformer Engine's grouped experts (``TEGroupedMLP``: one GroupedLinear per
    projection holding ``weight0 .. weight{n-1}``, one per local expert) instead of megatron's
    ``SequentialMLP`` (``local_experts.{i}``, one MLP module per local expert).
    """
    if spec.moe is None:
        return []
    p = "decoder.layers.{l}.mlp.experts."
    fc1, fc2 = (("linear_fc1.weight{i}", "linear_fc2.weight{i}") if grouped else
                ("local_experts.{i}.linear_fc1.weight", "local_experts.{i}.linear_fc2.weight"))
    e = "model.layers.{L}." + spec.moe.hf_block + ".experts.{E}."
    gate, up, down = spec.moe.hf_gate_up_down
    return [
        ParamMap(p + fc1, (e + gate + ".weight", e + up + ".weight"), "gate_up", expert=True),
        ParamMap(p + fc2, (e + down + ".weight",), "row", expert=True),
    ]


def hf_experts_fused_to_disk(state: dict, spec: ArchSpec) -> dict:
    """A transformers in-memory MoE state dict (fused experts) under the on-disk names.

    transformers 5 holds ``model.layers.L.mlp.experts.gate_up_proj`` ``(E, 2F, H)`` (rows
    [gate; up] per expert) and ``...experts.down_proj`` ``(E, H, F)``, and names Mixtral's
    block ``mlp``; checkpoints (and megarlhf's HF contract) name each expert
    (:func:`expert_param_maps`). Other tensors pass unchanged. Views, no copies.
    """
    if spec.moe is None:
        return dict(state)
    mo = spec.moe
    gate, up, down = mo.hf_gate_up_down
    out = {}
    for name, t in state.items():
        parts = name.split(".")
        if len(parts) > 4 and parts[0] == "model" and parts[1] == "layers" and parts[3] == "mlp":
            base = f"model.layers.{parts[2]}.{mo.hf_block}."
            rest = ".".join(parts[4:])
            if rest == "experts.gate_up_proj":
                f = t.shape[1] // 2
                for e in range(t.shape[0]):
                    out[f"{base}experts.{e}.{gate}.weight"] = t[e, :f]
                    out[f"{base}experts.{e}.{up}.weight"] = t[e, f:]
                continue
            if rest == "experts.down_proj":
                for e in range(t.shape[0]):
                    out[f"{base}experts.{e}.{down}.weight"] = t[e]
                continue
            out[base + rest] = t
            continue
        out[name] = t
    return out


def hf_experts_disk_to_fused(state: dict, spec: ArchSpec) -> dict:
    """Inverse of :func:`hf_experts_fused_to_disk`: on-disk names -> transformers' in-memory
    (fused) names, e.g. to ``load_state_dict`` a resharder stream into a transformers model."""
    if spec.moe is None:
        return dict(state)
    mo = spec.moe
    gate, up, down = mo.hf_gate_up_down
    prefix = "." + mo.hf_block + "."
    out: dict = {}
    experts: dict[int, dict[str, dict[int, Any]]] = {}
    for name, t in state.items():
        parts = name.split(".")
        if len(parts) > 4 and parts[0] == "model" and parts[1] == "layers" \
                and parts[3] == mo.hf_block:
            layer = int(parts[2])
            if parts[4] == "experts" and len(parts) == 8:
                experts.setdefault(layer, {}).setdefault(parts[6], {})[int(parts[5])] = t
                continue
            out[name.replace(prefix, ".mlp.", 1)] = t
            continue
        out[name] = t
    for layer, by in experts.items():
        n = mo.num_experts
        base = f"model.layers.{layer}.mlp.experts."
        for proj in (gate, up, down):
            if sorted(by.get(proj, {})) != list(range(n)):
                raise KeyError(f"layer {layer}: {proj} of experts {sorted(by.get(proj, {}))} "
                               f"given, expected all {n}")
        out[base + "gate_up_proj"] = torch.stack(
            [torch.cat([by[gate][e], by[up][e]], dim=0) for e in range(n)])
        out[base + "down_proj"] = torch.stack([by[down][e] for e in range(n)])
    return out


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
