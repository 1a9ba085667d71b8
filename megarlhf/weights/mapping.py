"""Which HF tensors each parameter of this rank's megatron chunks corresponds to."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from megarlhf.models.builder import ModelBundle
from megarlhf.models.families import (
    ArchSpec,
    embedding_param_map,
    final_norm_param_map,
    layer_param_maps,
    output_param_map,
)

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class LocalParam:
    """One parameter of this rank, with the HF names (global layer numbers) it maps to."""

    chunk: int  # virtual pipeline chunk index
    name: str  # megatron name inside the chunk
    param: torch.Tensor
    kind: str
    hf_names: tuple[str, ...]
    global_layer: int | None  # 0-based global layer number, None outside the decoder layers


class UnmappedParameterError(KeyError):
    pass


def local_params(bundle: ModelBundle) -> list[LocalParam]:
    """Every parameter of this rank's chunks, mapped to HF names. Raises on an unknown one."""
    spec = bundle.spec
    layer_maps = {m.megatron.split("{l}.", 1)[1]: m for m in layer_param_maps(spec, bundle.te)}
    emb = embedding_param_map()
    norm = final_norm_param_map()
    out = output_param_map(bundle.head)
    result: list[LocalParam] = []
    for ci, model in enumerate(bundle.unwrapped()):
        layers = model.decoder.layers if hasattr(model, "decoder") else []
        for name, p in model.named_parameters():
            m = _LAYER.match(name)
            if m:
                li, suffix = int(m.group(1)), m.group(2)
                pm = layer_maps.get(suffix)
                if pm is None:
                    raise UnmappedParameterError(
                        f"megatron parameter {name!r} has no HF counterpart in the "
                        f"{spec.model_type} table")
                gl = layers[li].layer_number - 1
                hf = tuple(h.replace("{L}", str(gl)) for h in pm.hf)
                result.append(LocalParam(ci, name, p, pm.kind, hf, gl))
                continue
            if name == emb.megatron:
                result.append(LocalParam(ci, name, p, emb.kind, emb.hf, None))
            elif name == norm.megatron:
                result.append(LocalParam(ci, name, p, norm.kind, norm.hf, None))
            elif name == out.megatron:
                if bundle.head == "lm" and spec.tie_word_embeddings:
                    # The last stage's copy of the tied embedding (pipeline parallel only).
                    result.append(LocalParam(ci, name, p, emb.kind, emb.hf, None))
                else:
                    result.append(LocalParam(ci, name, p, out.kind, out.hf, None))
            else:
                raise UnmappedParameterError(
                    f"megatron parameter {name!r} has no HF counterpart in the "
                    f"{spec.model_type} table")
    return result


def expected_hf_names(bundle: ModelBundle) -> list[str]:
    """All HF tensor names of the full model (all stages), in HF order."""
    return hf_names_for(bundle.spec, bundle.head)


def hf_names_for(spec: ArchSpec, head: str) -> list[str]:
    """All HF tensor names of a ``spec`` model with ``head`` ("lm" or "scalar"), in HF order.

    A tied LM has no ``lm_head.weight`` (transformers does not store the tied copy). HF names do
    not depend on the layer-spec flavour (local or Transformer Engine).
    """
    names = list(embedding_param_map().hf)
    for layer in range(spec.num_layers):
        for pm in layer_param_maps(spec, False):
            names.extend(h.replace("{L}", str(layer)) for h in pm.hf)
    names.extend(final_norm_param_map().hf)
    if not (head == "lm" and spec.tie_word_embeddings):
        names.extend(output_param_map(head).hf)
    return names
