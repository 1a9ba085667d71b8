"""HF tensors -> the shard each rank owns, at any TP/PP/VPP layout.

Each rank fills only its own parameters: those of its pipeline stage, in every virtual-pipeline
chunk (layer numbers are global, from megatron's ``layer_number``), each cut to its TP shard;
of an MoE layer only its expert-parallel rank's experts, each cut to its expert-TP shard.
From a safetensors directory (:func:`load_hf_dir`) a rank reads only the rows/columns its shard
holds (:func:`megarlhf.weights.transforms.shard_pieces`), so the bytes read per rank are its
share of the model and the extra memory is one shard. From an in-memory ``get`` (a state dict)
the whole HF tensor is taken and cut.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from megarlhf.models.builder import ModelBundle
from megarlhf.weights.mapping import LocalParam, local_params
from megarlhf.weights.transforms import (
    WeightLayoutError,
    hf_shapes,
    hf_to_megatron_full,
    megatron_full_shape,
    shard,
    shard_pieces,
)
from megarlhf.weights.validate import name_problems

# get_region(name, rows, cols) -> the HF tensor's region [rows[0]:rows[1], cols[0]:cols[1]]
RegionGetter = Callable[[str, tuple[int, int], "tuple[int, int] | None"], torch.Tensor]


class WeightLoadError(ValueError):
    """HF weights do not fit the model; the message names the tensor and the mismatch."""


def check_hf_names(bundle: ModelBundle, available: Iterable[str]) -> None:
    """Refuses a checkpoint with missing or unexpected tensors (never a silent partial load)."""
    missing, unexpected = name_problems(bundle.spec, bundle.head, available)
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
                    names: Iterable[str], *, get_region: RegionGetter | None = None,
                    get_shape: Callable[[str], tuple[int, ...]] | None = None,
                    progress: Callable[[LocalParam], None] | None = None) -> int:
    """Copies HF tensors into this rank's shards; returns the number of parameters set.

    Args:
        bundle: this rank's model (every VPP chunk is filled).
        get: returns the whole HF tensor of a name (e.g. ``dict.get``).
        names: every HF tensor name available (checked against the architecture first).
        get_region: reads a region of an HF tensor (``HFCheckpointReader.get_region``); when
            given (with ``get_shape``), only this rank's rows/columns are read.
        get_shape: the HF tensor's shape without reading it (``HFCheckpointReader.shape``).
        progress: called after each parameter (e.g. to advance a progress bar).
    """
    check_hf_names(bundle, names)
    available = set(names)
    n = 0
    for lp in local_params(bundle):
        if bundle.head == "scalar" and lp.hf_names == ("score.weight",) \
                and "score.weight" not in available:
            continue  # a scalar head on an LM checkpoint keeps its fresh initialisation
        if get_region is not None and get_shape is not None:
            piece = _read_shard(bundle, lp, get_region, get_shape)
        else:
            piece = _cut_shard(bundle, lp, get)
        lp.param.copy_(piece.to(lp.param.dtype))
        n += 1
        if progress is not None:
            progress(lp)
    return n


def _cut_shard(bundle: ModelBundle, lp: LocalParam, get) -> torch.Tensor:
    """Reads the whole HF tensor(s) and cuts this rank's shard."""
    hf = [get(h) for h in lp.hf_names]
    try:
        full = hf_to_megatron_full(lp.kind, hf, bundle.spec, bundle.padded_vocab_size,
                                   lp.hf_names)
    except WeightLayoutError as e:
        raise WeightLoadError(str(e)) from None
    piece = shard(lp.kind, full, lp.split_size, lp.split_rank)
    if tuple(piece.shape) != tuple(lp.param.shape):
        raise WeightLoadError(
            f"{'+'.join(lp.hf_names)} -> megatron {lp.name}: shard shape "
            f"{tuple(piece.shape)} does not match the parameter's {tuple(lp.param.shape)} "
            "(the config and the weights disagree on the architecture)")
    return piece


def _read_shard(bundle: ModelBundle, lp: LocalParam, get_region, get_shape) -> torch.Tensor:
    """Builds this rank's shard from the HF regions it holds, reading nothing else."""
    tp, tp_rank = lp.split_size, lp.split_rank  # etp for experts
    full_shape = megatron_full_shape(lp.kind, lp.param.shape, tp)
    want = hf_shapes(lp.kind, full_shape, bundle.spec)
    for name, shape in zip(lp.hf_names, want):
        got = tuple(get_shape(name))
        if got != tuple(shape):
            raise WeightLoadError(
                f"{name}: shape {got} does not match the architecture's {tuple(shape)} (megatron "
                f"{lp.name}; the config and the weights disagree)")
    out = torch.zeros(lp.param.shape, dtype=lp.param.dtype)  # vocab padding rows stay zero
    try:
        pieces = shard_pieces(lp.kind, out, bundle.spec, tp, tp_rank)
    except WeightLayoutError as e:
        raise WeightLoadError(f"{'+'.join(lp.hf_names)}: {e}") from None
    for p in pieces:
        data = get_region(lp.hf_names[p.hf_index], p.rows, p.cols)
        p.view.copy_(data.reshape(p.view.shape))
    return out


def load_hf_dir(bundle: ModelBundle, hf_dir: str,
                progress: Callable[[LocalParam], None] | None = None) -> int:
    """Loads an HF safetensors directory into this rank's shards (reading only its share)."""
    from megarlhf.weights.hf_io import HFCheckpointReader

    reader = HFCheckpointReader(hf_dir)
    return load_hf_weights(bundle, reader.get, reader.names(), get_region=reader.get_region,
                           get_shape=reader.shape, progress=progress)
