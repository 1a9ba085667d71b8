"""Checking an HF model directory against its config before any heavy work.

:func:`inspect_hf_dir` reads only ``config.json`` and the safetensors headers (names, shapes,
dtypes) and refuses, with one message listing every problem found:

* an architecture megarlhf does not support (model_type, activation, rope type, head class);
* config and weights that disagree - the vocabulary, hidden size, attention heads, query groups
  (``num_key_value_heads``) or MLP width, each diagnosed from the tensor shapes ("the weights
  have 8 key/value heads of head_dim 16, the config says num_key_value_heads=2");
* missing or unexpected tensors, and any other shape mismatch.

A conversion that passes this check cannot stop half-way for a reason visible in the inputs.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from megarlhf.models.families import ArchSpec
from megarlhf.weights.hf_io import mtp_layer_of
from megarlhf.weights.mapping import hf_names_for

# What a ``*For...`` class in config.json's ``architectures`` means for the head.
_HEAD_OF_CLASS_SUFFIX = {"ForCausalLM": "lm", "ForSequenceClassification": "scalar"}


class HFValidationError(ValueError):
    """The HF directory cannot be converted as it is; the message lists every problem."""


@dataclass(frozen=True)
class HFModelInfo:
    """What a valid HF directory holds (read from its config and safetensors headers).

    Attributes:
        hf_dir: the directory.
        raw_config: config.json as written (kept verbatim in checkpoints and exports).
        spec: the architecture read from it.
        head: "lm" or "scalar" (a ``score.weight`` head, ``*ForSequenceClassification``).
        dtype: the weights' dtype (the most common one by bytes, if they are mixed).
        names: the HF tensor names present.
        score_missing: a scalar model requested from an LM checkpoint: its head starts fresh.
    """

    hf_dir: str
    raw_config: dict[str, Any]
    spec: ArchSpec
    head: str
    dtype: torch.dtype
    names: tuple[str, ...]
    score_missing: bool = False


def expected_hf_shapes(spec: ArchSpec, head: str) -> dict[str, tuple[int, ...]]:
    """The HF name -> shape of every tensor of a ``spec`` model with ``head``, in HF order."""
    h, v, f, hd = spec.hidden_size, spec.vocab_size, spec.ffn_hidden_size, spec.head_dim
    q, kv = spec.num_attention_heads * hd, spec.num_query_groups * hd
    layer = {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.q_proj.bias": (q,),
        "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.bias": (kv,),
        "self_attn.q_norm.weight": (hd,),
        "self_attn.k_norm.weight": (hd,),
        "self_attn.o_proj.weight": (h, q),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (f, h),
        "mlp.up_proj.weight": (f, h),
        "mlp.down_proj.weight": (h, f),
    }
    if spec.mla is not None:
        ml, n = spec.mla, spec.num_attention_heads
        qk = ml.qk_nope_head_dim + ml.qk_rope_head_dim
        layer.update({
            "self_attn.q_a_proj.weight": (ml.q_lora_rank or 0, h),
            "self_attn.q_a_layernorm.weight": (ml.q_lora_rank or 0,),
            "self_attn.q_b_proj.weight": (n * qk, ml.q_lora_rank or 0),
            "self_attn.q_proj.weight": (n * qk, h),
            "self_attn.kv_a_proj_with_mqa.weight": (ml.kv_lora_rank + ml.qk_rope_head_dim, h),
            "self_attn.kv_a_layernorm.weight": (ml.kv_lora_rank,),
            "self_attn.kv_b_proj.weight": (n * (ml.qk_nope_head_dim + ml.v_head_dim),
                                           ml.kv_lora_rank),
            "self_attn.o_proj.weight": (h, n * ml.v_head_dim),
        })
    if spec.moe is not None:
        mo = spec.moe
        gate, up, down = mo.hf_gate_up_down
        fe, b = mo.ffn_hidden_size, mo.hf_block
        layer[f"{b}.gate.weight"] = (mo.num_experts, h)
        layer[f"{b}.gate.e_score_correction_bias"] = (mo.num_experts,)
        layer[f"{b}.experts.*.{gate}.weight"] = (fe, h)
        layer[f"{b}.experts.*.{up}.weight"] = (fe, h)
        layer[f"{b}.experts.*.{down}.weight"] = (h, fe)
        fs = mo.shared_ffn_hidden_size
        layer[f"{b}.shared_experts.gate_proj.weight"] = (fs, h)
        layer[f"{b}.shared_experts.up_proj.weight"] = (fs, h)
        layer[f"{b}.shared_experts.down_proj.weight"] = (h, fs)
    top = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,),
           "lm_head.weight": (v, h), "score.weight": (1, h)}
    out = {}
    for name in hf_names_for(spec, head):
        if name.startswith("model.layers."):
            key = name.split(".", 3)[3]
            parts = key.split(".")
            if len(parts) == 5 and parts[1] == "experts":  # <block>.experts.<e>.<proj>.weight
                parts[2] = "*"
                key = ".".join(parts)
            out[name] = layer[key]
        else:
            out[name] = top[name]
    return out


def name_problems(spec: ArchSpec, head: str,
                  available: Iterable[str]) -> tuple[list[str], list[str]]:
    """``(missing, unexpected)`` HF names for a ``spec`` model with ``head``.

    Tolerated: ``lm_head.weight`` next to tied embeddings (some exporters store the copy),
    rotary ``inv_freq`` buffers, and - for a scalar model started from an LM checkpoint - a
    missing ``score.weight`` with an ``lm_head.weight`` that is dropped.
    """
    available = {n for n in available if not n.endswith("rotary_emb.inv_freq")
                 and mtp_layer_of(n, spec.num_layers, spec.mtp_layers) is None}
    if head == "lm" and spec.tie_word_embeddings:
        available.discard("lm_head.weight")
    expected = set(hf_names_for(spec, head))
    missing = sorted(expected - available)
    unexpected = sorted(available - expected)
    if head == "scalar":
        unexpected = [n for n in unexpected if n != "lm_head.weight"]
        missing = [n for n in missing if n != "score.weight"]
    return missing, unexpected


def _listing(what: str, names: list[str]) -> str:
    more = f" ... (+{len(names) - 8} more)" if len(names) > 8 else ""
    return f"{what} ({len(names)}): {', '.join(names[:8])}{more}"


def diagnose_shapes(spec: ArchSpec, head: str,
                    shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Problems in ``shapes`` (HF name -> shape): architecture disagreements first, then the rest.

    The diagnosis names the config field that disagrees with the weights (vocab_size,
    hidden_size, num_attention_heads, num_key_value_heads, intermediate_size, head_dim).
    """
    problems: list[str] = []
    hd = spec.head_dim
    emb = shapes.get("model.embed_tokens.weight")
    if emb is not None and len(emb) == 2:
        if emb[0] != spec.vocab_size:
            problems.append(f"vocabulary: config.json has vocab_size={spec.vocab_size} but "
                            f"model.embed_tokens.weight has {emb[0]} rows")
        if emb[1] != spec.hidden_size:
            problems.append(f"hidden size: config.json has hidden_size={spec.hidden_size} but "
                            f"model.embed_tokens.weight has {emb[1]} columns")
    q = shapes.get("model.layers.0.self_attn.q_proj.weight")
    if q is not None and len(q) == 2 and q[0] != spec.num_attention_heads * hd:
        problems.append(
            f"attention heads: config.json has num_attention_heads={spec.num_attention_heads} "
            f"(head_dim {hd}: q_proj should have {spec.num_attention_heads * hd} rows) but "
            f"model.layers.0.self_attn.q_proj.weight has {q[0]} rows"
            + (f" = {q[0] // hd} heads of head_dim {hd}" if q[0] % hd == 0 else ""))
    k = shapes.get("model.layers.0.self_attn.k_proj.weight")
    kv = shapes.get("model.layers.0.self_attn.kv_b_proj.weight")
    if spec.mla is not None and kv is not None and len(kv) == 2:
        ml = spec.mla
        per = ml.qk_nope_head_dim + ml.v_head_dim
        if kv[0] != spec.num_attention_heads * per or kv[1] != ml.kv_lora_rank:
            problems.append(
                f"latent attention: config.json has num_attention_heads="
                f"{spec.num_attention_heads}, qk_nope_head_dim + v_head_dim = {per} and "
                f"kv_lora_rank={ml.kv_lora_rank} (kv_b_proj should be "
                f"{(spec.num_attention_heads * per, ml.kv_lora_rank)}) but "
                f"model.layers.0.self_attn.kv_b_proj.weight is {tuple(kv)}")
    if k is not None and len(k) == 2 and k[0] != spec.num_query_groups * hd:
        problems.append(
            f"query groups: config.json has num_key_value_heads={spec.num_query_groups} "
            f"(head_dim {hd}: k_proj should have {spec.num_query_groups * hd} rows) but "
            f"model.layers.0.self_attn.k_proj.weight has {k[0]} rows"
            + (f" = {k[0] // hd} key/value heads of head_dim {hd}" if k[0] % hd == 0 else ""))
    g = shapes.get("model.layers.0.mlp.gate_proj.weight")
    if g is not None and len(g) == 2 and g[0] != spec.ffn_hidden_size:
        problems.append(f"MLP width: config.json has intermediate_size={spec.ffn_hidden_size} but "
                        f"model.layers.0.mlp.gate_proj.weight has {g[0]} rows")
    if spec.moe is not None:
        mo = spec.moe
        width = "intermediate_size" if spec.model_type == "mixtral" else "moe_intermediate_size"
        n_name = {"qwen3_moe": "num_experts", "mixtral": "num_local_experts"}.get(
            spec.model_type, "n_routed_experts")
        first = f"model.layers.{mo.first_dense_layers}.{mo.hf_block}"  # the first MoE layer
        r = shapes.get(f"{first}.gate.weight")
        if r is not None and len(r) == 2 and r[0] != mo.num_experts:
            problems.append(f"experts: config.json has {n_name}={mo.num_experts} but "
                            f"{first}.gate.weight (the router) has {r[0]} rows")
        eg = shapes.get(f"{first}.experts.0.{mo.hf_gate_up_down[0]}.weight")
        if eg is not None and len(eg) == 2 and eg[0] != mo.ffn_hidden_size:
            problems.append(f"expert width: config.json has {width}={mo.ffn_hidden_size} but "
                            f"{first}.experts.0.{mo.hf_gate_up_down[0]}.weight has {eg[0]} rows")
        sg = shapes.get(f"{first}.shared_experts.gate_proj.weight")
        if sg is not None and len(sg) == 2 and sg[0] != mo.shared_ffn_hidden_size:
            problems.append(
                f"shared experts: config.json has n_shared_experts * moe_intermediate_size = "
                f"{mo.shared_ffn_hidden_size} but {first}.shared_experts.gate_proj.weight has "
                f"{sg[0]} rows")
        dense = [n for n in shapes if n.startswith(f"model.layers.{mo.first_dense_layers}.mlp.")
                 and n.endswith(".gate_proj.weight") and ".experts." not in n
                 and ".shared_experts." not in n]
        if mo.first_dense_layers and dense:
            problems.append(f"layer {mo.first_dense_layers} has a dense MLP ({dense[0]}) but "
                            f"config.json has first_k_dense_replace={mo.first_dense_layers}: "
                            "count the dense layers again")
        fused = [n for n in shapes if n.endswith((".experts.gate_up_proj", ".experts.down_proj"))]
        if fused:
            problems.append(
                f"experts stored fused ({fused[0]}, ...: transformers' in-memory layout); "
                "megarlhf reads checkpoints with one tensor per expert, as save_pretrained "
                "writes them (megarlhf.models.families.hf_experts_fused_to_disk converts a "
                "state dict)")
    qn = shapes.get("model.layers.0.self_attn.q_norm.weight")
    if qn is not None and qn != (hd,):
        problems.append(f"head_dim: config.json implies head_dim={hd} but "
                        f"model.layers.0.self_attn.q_norm.weight has shape {qn}")
    expected = expected_hf_shapes(spec, head)
    if head == "lm" and spec.tie_word_embeddings:
        expected["lm_head.weight"] = (spec.vocab_size, spec.hidden_size)
    wrong = [f"{n}: {tuple(shapes[n])}, expected {expected[n]}" for n in expected
             if n in shapes and tuple(shapes[n]) != expected[n]]
    if wrong:
        problems.append(_listing("tensors with a wrong shape", wrong))
    return problems


def _head_from_config(raw: dict[str, Any]) -> str | None:
    """The head config.json's ``architectures`` asks for, or None when it does not say."""
    archs = raw.get("architectures") or []
    heads = set()
    for a in archs:
        for suffix, head in _HEAD_OF_CLASS_SUFFIX.items():
            if a.endswith(suffix):
                heads.add(head)
                break
        else:
            if not a.endswith("Model"):
                raise HFValidationError(
                    f"architecture {a!r} is not supported: megarlhf converts *ForCausalLM "
                    "(language models) and *ForSequenceClassification with num_labels=1 "
                    "(reward models / critics)")
    if len(heads) > 1:
        raise HFValidationError(f"config.json lists architectures {archs} with different heads")
    return heads.pop() if heads else None


def inspect_hf_dir(hf_dir: str, head: str = "auto") -> HFModelInfo:
    """Validates an HF model directory for conversion; returns what it holds.

    Args:
        hf_dir: directory with config.json and safetensors weights.
        head: "lm", "scalar", or "auto" (scalar when the weights have ``score.weight``).

    Raises:
        HFValidationError: every problem found, in one message.
    """
    from megarlhf.models.arch import ArchError, hf_config_from_dict
    from megarlhf.models.families import UnsupportedArchitecture, arch_spec
    from megarlhf.weights.hf_io import HFCheckpointError, HFCheckpointReader

    if head not in ("auto", "lm", "scalar"):
        raise HFValidationError(f"head must be auto, lm or scalar, got {head!r}")
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise HFValidationError(f"{hf_dir}: no config.json (not a Hugging Face model directory)")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise HFValidationError(f"{path}: not valid JSON ({e})") from None
    try:
        spec = arch_spec(hf_config_from_dict(raw))
    except (ArchError, UnsupportedArchitecture) as e:
        raise HFValidationError(f"{hf_dir}: unsupported architecture: {e}") from None
    config_head = _head_from_config(raw)
    try:
        reader = HFCheckpointReader(hf_dir)
        names = reader.names()
        shapes = {n: reader.shape(n) for n in names}
        dtypes = {n: reader.dtype(n) for n in names}
    except HFCheckpointError as e:
        raise HFValidationError(str(e)) from None

    if head == "auto":
        head = "scalar" if "score.weight" in shapes else (config_head or "lm")
    if head == "scalar":
        from dataclasses import replace

        spec = replace(spec, tie_word_embeddings=False)  # a scalar model has no LM head to tie
        labels = raw.get("num_labels", len(raw.get("id2label") or {}) or 1)
        if config_head == "scalar" and labels != 1:
            raise HFValidationError(
                f"{hf_dir}: a sequence-classification model with num_labels={labels}; megarlhf's "
                "scalar head (reward model / critic) has exactly one output")

    problems = diagnose_shapes(spec, head, shapes)
    for i in range(spec.mtp_layers):
        if not any(mtp_layer_of(n, spec.num_layers, spec.mtp_layers) == i for n in names):
            problems.append(
                f"config.json has num_nextn_predict_layers={spec.mtp_layers} but the weights "
                f"hold no model.layers.{spec.num_layers + i}.* tensors (multi-token prediction "
                "layer "f"{i}); set num_nextn_predict_layers to the layers the checkpoint has "
                "(megarlhf carries them unchanged, it does not build them)")
    missing, unexpected = name_problems(spec, head, names)
    if missing:
        problems.append(_listing("missing tensors", missing))
    if unexpected:
        problems.append(_listing("unexpected tensors", unexpected))
    if problems:
        raise HFValidationError(
            f"{hf_dir} does not match its config.json ({spec.model_type}, {spec.num_layers} "
            f"layers, head={head}); nothing was converted:\n  - " + "\n  - ".join(problems))

    by_bytes: Counter = Counter()
    for n, s in shapes.items():
        numel = 1
        for d in s:
            numel *= d
        by_bytes[dtypes[n]] += numel * dtypes[n].itemsize
    dtype = by_bytes.most_common(1)[0][0] if by_bytes else torch.float32
    return HFModelInfo(hf_dir=hf_dir, raw_config=raw, spec=spec, head=head, dtype=dtype,
                       names=tuple(names),
                       score_missing=head == "scalar" and "score.weight" not in shapes)
