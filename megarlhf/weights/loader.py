"""HF tensors -> the shard each rank owns, at any TP/PP/VPP layout.

Each rank reads only the HF tensors its own parameters need (lazily, from safetensors), turns
them into megatron's layout with :mod:`megarlhf.weights.transforms` and copies its shard in place.
Peak extra memory per rank is one full HF tensor group (e.g. q, k and v of one layer).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from megarlhf.models.builder import ModelBundle
from megarlhf.weights.mapping import expected_hf_names, local_params
from megarlhf.weights.transforms import WeightLayoutError, hf_to_megatron_full, shard


class WeightLoadError(ValueError):
    """HF weights do not fit the model; the message names the tensor and the mismatch."""


def check_hf_names(bundle: ModelBundle, available: Iterable[str]) -> None:
    """Refuses a checkpoint with missing or unexpected tensors (never a silent partial load)."""
    available = set(available)
    expected = set(expected_hf_names(bundle))
    tied_lm = bundle.head == "lm" and bundle.spec.tie_word_embeddings
    if tied_lm:
        available.discard("lm_head.weight")  # some tied checkpoints also store the copy
    # Rotary caches some exporters leave behind carry no weights.
    available = {n for n in available if not n.endswith("rotary_emb.inv_freq")}
    missing = sorted(expected - available)
    unexpected = sorted(available - expected)
    if bundle.head == "scalar":
        # A scalar model starting from an LM checkpoint: the LM head is dropped, the value head
        # keeps its fresh initialisation.
        unexpected = [n for n in unexpected if n != "lm_head.weight"]
        missing = [n for n in missing if n != "score.weight"]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors ({len(missing)}): {', '.join(missing[:8])}"
                         + (" ..." if len(missing) > 8 else ""))
        if unexpected:
            parts.append(f"unexpected tensors ({len(unexpected)}): {', '.join(unexpected[:8])}"
                         + (" ..." if len(unexpected) > 8 else ""))
        raise WeightLoadError(
            "the HF weights do not match the configured architecture "
            f"({bundle.spec.model_type}, {bundle.spec.num_layers} layers, head={bundle.head}): "
            + "; ".join(parts))


@torch.no_grad()
def load_hf_weights(bundle: ModelBundle, get: Callable[[str], torch.Tensor],
                    names: Iterable[str]) -> int:
    """Copies HF tensors into this rank's shards; returns the number of parameters set.

    Args:
        bundle: this rank's model.
        get: returns the HF tensor of a name (e.g. ``HFCheckpointReader.get`` or ``dict.get``).
        names: every HF tensor name available (checked against the architecture first).
    """
    check_hf_names(bundle, names)
    available = set(names)
    lay = bundle.ctx.layout
    n = 0
    for lp in local_params(bundle):
        if bundle.head == "scalar" and lp.hf_names == ("score.weight",) \
                and "score.weight" not in available:
            continue
        hf = [get(h) for h in lp.hf_names]
        try:
            full = hf_to_megatron_full(lp.kind, hf, bundle.spec, bundle.padded_vocab_size,
                                       lp.hf_names)
        except WeightLayoutError as e:
            raise WeightLoadError(str(e)) from None
        piece = shard(lp.kind, full, lay.tp, bundle.ctx.tp_rank)
        if tuple(piece.shape) != tuple(lp.param.shape):
            raise WeightLoadError(
                f"{'+'.join(lp.hf_names)} -> megatron {lp.name}: shard shape "
                f"{tuple(piece.shape)} does not match the parameter's {tuple(lp.param.shape)} "
                "(the config and the weights disagree on the architecture)")
        lp.param.copy_(piece.to(lp.param.dtype))
        n += 1
    return n


def load_hf_dir(bundle: ModelBundle, hf_dir: str) -> int:
    """Loads an HF safetensors directory into this rank's shards."""
    from megarlhf.weights.hf_io import HFCheckpointReader

    reader = HFCheckpointReader(hf_dir)
    return load_hf_weights(bundle, reader.get, reader.names())
