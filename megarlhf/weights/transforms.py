"""Per-tensor transforms between HF layout and megatron's TP shards — the only place that knows them.

Every path weights take (HF -> megatron loading, megatron -> HF export, weight sync into a rollout
engine, checkpoint conversion) goes through these functions, keyed by a :class:`ParamMap` kind:

=========== ======================================================================================
kind        megatron tensor (TP=1)                            split over TP ranks
=========== ======================================================================================
replicated  = the HF tensor                                   none (identical on every rank)
vocab       HF rows padded with zeros to the padded vocab      rows, contiguous blocks
row         = the HF tensor                                   columns (input features)
qkv         per query group g: [q heads of g; k_g; v_g]        rows = whole query groups
gate_up     [gate; up]                                        gate and up rows each, then fused
=========== ======================================================================================
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megarlhf.models.families import ArchSpec


class WeightLayoutError(ValueError):
    """A tensor's shape does not fit the architecture; the message names the tensor."""


def _expect(t: torch.Tensor, shape: tuple[int, ...], name: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise WeightLayoutError(
            f"{name}: shape {tuple(t.shape)} does not match the architecture's {tuple(shape)}")


def hf_to_megatron_full(kind: str, hf: Sequence[torch.Tensor], spec: ArchSpec,
                        padded_vocab: int, names: Sequence[str] = ()) -> torch.Tensor:
    """The megatron tensor of a TP=1 model from its HF tensor(s)."""
    name = ",".join(names) or kind
    if kind in ("replicated", "row", "column"):
        (t,) = hf
        return t
    if kind == "vocab":
        (t,) = hf
        if t.shape[0] != spec.vocab_size:
            raise WeightLayoutError(f"{name}: {t.shape[0]} rows but the config's vocab_size is "
                                    f"{spec.vocab_size}")
        if padded_vocab == t.shape[0]:
            return t
        pad = torch.zeros((padded_vocab - t.shape[0],) + tuple(t.shape[1:]), dtype=t.dtype)
        return torch.cat([t, pad], dim=0)
    if kind == "qkv":
        q, k, v = hf
        ng, hd = spec.num_query_groups, spec.head_dim
        qpg = spec.num_attention_heads // ng
        rest = tuple(q.shape[1:])
        _expect(q, (spec.num_attention_heads * hd,) + rest, names[0] if names else "q")
        _expect(k, (ng * hd,) + rest, names[1] if names else "k")
        _expect(v, (ng * hd,) + rest, names[2] if names else "v")
        q = q.reshape((ng, qpg * hd) + rest)
        k = k.reshape((ng, hd) + rest)
        v = v.reshape((ng, hd) + rest)
        return torch.cat([q, k, v], dim=1).reshape((ng * (qpg + 2) * hd,) + rest)
    if kind == "gate_up":
        gate, up = hf
        if gate.shape != up.shape:
            raise WeightLayoutError(f"{name}: gate {tuple(gate.shape)} and up {tuple(up.shape)} "
                                    "differ in shape")
        return torch.cat([gate, up], dim=0)
    raise ValueError(f"unknown weight kind {kind!r}")


def shard(kind: str, full: torch.Tensor, tp: int, tp_rank: int) -> torch.Tensor:
    """This TP rank's shard of a megatron tensor (as built for TP=1)."""
    if tp == 1 or kind == "replicated":
        return full
    if kind in ("vocab", "qkv", "column"):
        return full.chunk(tp, dim=0)[tp_rank]
    if kind == "row":
        return full.chunk(tp, dim=1)[tp_rank]
    if kind == "gate_up":
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[tp_rank], up.chunk(tp, dim=0)[tp_rank]], dim=0)
    raise ValueError(f"unknown weight kind {kind!r}")


def unshard(kind: str, shards: Sequence[torch.Tensor]) -> torch.Tensor:
    """The TP=1 megatron tensor from all TP ranks' shards (in rank order)."""
    if len(shards) == 1 or kind == "replicated":
        return shards[0]
    if kind in ("vocab", "qkv", "column"):
        return torch.cat(list(shards), dim=0)
    if kind == "row":
        return torch.cat(list(shards), dim=1)
    if kind == "gate_up":
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    raise ValueError(f"unknown weight kind {kind!r}")


def megatron_full_to_hf(kind: str, full: torch.Tensor, spec: ArchSpec) -> list[torch.Tensor]:
    """The HF tensor(s) of a TP=1 megatron tensor (inverse of :func:`hf_to_megatron_full`)."""
    if kind in ("replicated", "row", "column"):
        return [full]
    if kind == "vocab":
        return [full[: spec.vocab_size]]
    if kind == "qkv":
        ng, hd = spec.num_query_groups, spec.head_dim
        qpg = spec.num_attention_heads // ng
        rest = tuple(full.shape[1:])
        g = full.reshape((ng, (qpg + 2) * hd) + rest)
        q = g[:, : qpg * hd].reshape((ng * qpg * hd,) + rest)
        k = g[:, qpg * hd: (qpg + 1) * hd].reshape((ng * hd,) + rest)
        v = g[:, (qpg + 1) * hd:].reshape((ng * hd,) + rest)
        return [q, k, v]
    if kind == "gate_up":
        gate, up = full.chunk(2, dim=0)
        return [gate, up]
    raise ValueError(f"unknown weight kind {kind!r}")
