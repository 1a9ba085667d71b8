"""Which HF tensors each parameter of this rank's megatron chunks corresponds to.

Layers carry global numbers (megatron's ``layer_number``, so PP and VPP offsets are applied);
experts carry global numbers too: local expert ``i`` of expert-parallel rank ``r`` is expert
``r * E/ep + i`` (megatron's ``local_expert_indices``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from megarlhf.models.builder import ModelBundle
from megarlhf.models.families import (
    ArchSpec,
    ParamMap,
    embedding_param_map,
    expert_param_maps,
    final_norm_param_map,
    layer_param_maps,
    output_param_map,
)

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
# Expert parameters: SequentialMLP's local_experts.{i}.<name> or TEGroupedMLP's <name>{i}.
_SEQ_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.+)$")
_GROUPED_EXPERT = re.compile(r"^mlp\.experts\.(linear_fc[12]\.weight)(\d+)$")


@dataclass(frozen=True)
class LocalParam:
    """One parameter of this rank, with the HF names (global layer numbers) it maps to."""

    chunk: int  # virtual pipeline chunk index
    name: str  # megatron name inside the chunk
    param: torch.Tensor
    kind: str
    hf_names: tuple[str, ...]
    global_layer: int | None  # 0-based global layer number, None outside the decoder layers
    # How the parameter is split: over tp ranks (dense) or etp ranks (experts).
    split_size: int = 1
    split_rank: int = 0
    expert: bool = False


class UnmappedParameterError(KeyError):
    pass


def local_params(bundle: ModelBundle) -> list[LocalParam]:
    """Every parameter of this rank's chunks, mapped to HF names. Raises on an unknown one."""
    spec = bundle.spec
    ctx = bundle.ctx
    lay = ctx.layout
    tp, tpr = lay.tp, ctx.tp_rank
    # Per kind of layer (dense, MoE: families with leading dense layers have both).
    layer_maps = {moe: {m.megatron.split("{l}.", 1)[1]: m for m in layer_param_maps(
        spec, bundle.te, moe)} for moe in (False, True)}
    expert_maps = {_expert_key(m): m for grouped in (False, True)
                   for m in expert_param_maps(spec, grouped)}
    n_local = spec.moe.num_experts // lay.ep if spec.moe is not None else 0
    emb = embedding_param_map()
    norm = final_norm_param_map()
    out = output_param_map(bundle.head)
    result: list[LocalParam] = []
    for ci, model in enumerate(bundle.unwrapped()):
        layers = model.decoder.layers if hasattr(model, "decoder") else []
        for name, p in _tensors(model):
            m = _LAYER.match(name)
            if m:
                li, suffix = int(m.group(1)), m.group(2)
                gl = layers[li].layer_number - 1
                e = _SEQ_EXPERT.match(suffix) or _GROUPED_EXPERT.match(suffix)
                if e is not None and spec.moe is not None:
                    if e.re is _SEQ_EXPERT:
                        local, key = int(e.group(1)), ("seq", e.group(2))
                    else:
                        local, key = int(e.group(2)), ("grouped", e.group(1))
                    pm = expert_maps.get(key)
                    if pm is None or local >= n_local:
                        raise UnmappedParameterError(
                            f"megatron parameter {name!r} has no HF counterpart in the "
                            f"{spec.model_type} table")
                    ge = ctx.ep_rank * n_local + local
                    hf = tuple(h.replace("{L}", str(gl)).replace("{E}", str(ge)) for h in pm.hf)
                    result.append(LocalParam(ci, name, p, pm.kind, hf, gl, lay.expert_tp,
                                             ctx.etp_rank, True))
                    continue
                pm = layer_maps[spec.is_moe_layer(gl)].get(suffix)
                if pm is None:
                    raise UnmappedParameterError(
                        f"megatron parameter {name!r} has no HF counterpart in the "
                        f"{spec.model_type} table")
                hf = tuple(h.replace("{L}", str(gl)) for h in pm.hf)
                result.append(LocalParam(ci, name, p, pm.kind, hf, gl, tp, tpr))
                continue
            if name == emb.megatron:
                result.append(LocalParam(ci, name, p, emb.kind, emb.hf, None, tp, tpr))
            elif name == norm.megatron:
                result.append(LocalParam(ci, name, p, norm.kind, norm.hf, None, tp, tpr))
            elif name == out.megatron:
                if bundle.head == "lm" and spec.tie_word_embeddings:
                    # The last stage's copy of the tied embedding (pipeline parallel only).
                    result.append(LocalParam(ci, name, p, emb.kind, emb.hf, None, tp, tpr))
                else:
                    result.append(LocalParam(ci, name, p, out.kind, out.hf, None, tp, tpr))
            else:
                raise UnmappedParameterError(
                    f"megatron parameter {name!r} has no HF counterpart in the "
                    f"{spec.model_type} table")
    return result


def _tensors(model: torch.nn.Module):
    """The parameters of ``model`` and the persistent buffers weights are made of (the router's
    ``expert_bias``: not trained by gradients, but part of the model megarlhf converts and
    syncs)."""
    yield from model.named_parameters()
    for name, b in model.named_buffers():
        if name.endswith(".router.expert_bias") and b is not None:
            yield name, b


def _expert_key(pm: ParamMap) -> tuple[str, str]:
    """("seq", "linear_fc1.weight") / ("grouped", "linear_fc1.weight") of an expert template."""
    tail = pm.megatron.split("mlp.experts.", 1)[1]
    if tail.startswith("local_experts.{i}."):
        return "seq", tail[len("local_experts.{i}."):]
    return "grouped", tail.replace("{i}", "")


def expected_hf_names(bundle: ModelBundle) -> list[str]:
    """All HF tensor names of the full model (all stages), in HF order."""
    return hf_names_for(bundle.spec, bundle.head)


def hf_names_for(spec: ArchSpec, head: str) -> list[str]:
    """All HF tensor names of a ``spec`` model with ``head`` ("lm" or "scalar"), in HF order.

    A tied LM has no ``lm_head.weight`` (transformers does not store the tied copy). HF names do
    not depend on the layer-spec flavour (local or Transformer Engine). MoE layers list their
    experts (on-disk names) after the router, expert by expert.
    """
    names = list(embedding_param_map().hf)
    experts = expert_param_maps(spec, False)
    n = spec.moe.num_experts if spec.moe is not None else 0
    for layer in range(spec.num_layers):
        for pm in layer_param_maps(spec, False, spec.is_moe_layer(layer)):
            names.extend(h.replace("{L}", str(layer)) for h in pm.hf)
        for e in range(n if spec.is_moe_layer(layer) else 0):
            for pm in experts:
                names.extend(h.replace("{L}", str(layer)).replace("{E}", str(e)) for h in pm.hf)
    names.extend(final_norm_param_map().hf)
    if not (head == "lm" and spec.tie_word_embeddings):
        names.extend(output_param_map(head).hf)
    return names
