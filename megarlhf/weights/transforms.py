"""Per-tensor transforms between HF layout and megatron's TP shards: the only place that knows them.

Every path weights take (HF -> megatron loading, megatron -> HF export, weight sync into a rollout
engine, checkpoint conversion) goes through these functions, keyed by a :class:`ParamMap` kind:

=========== ======================================================================================
kind        megatron tensor (TP=1)                            split over TP ranks
=========== ======================================================================================
replicated  = the HF tensor                                   none (identical on every rank)
fp32        = the HF tensor, fp32 on every path (expert bias)  none
vocab       HF rows padded with zeros to the padded vocab      rows, contiguous blocks
row         = the HF tensor                                   columns (input features)
qkv         per query group g: [q heads of g; k_g; v_g]        rows = whole query groups
gate_up     [gate; up]                                        gate and up rows each, then fused
=========== ======================================================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megarlhf.models.families import ArchSpec


# Kinds held whole by every TP rank. ``fp32`` tensors also keep fp32 in every output dtype.
REPLICATED = ("replicated", "fp32")


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
    if kind in ("replicated", "fp32", "row", "column"):
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
    if tp == 1 or kind in REPLICATED:
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
    if len(shards) == 1 or kind in REPLICATED:
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
    if kind in ("replicated", "fp32", "row", "column"):
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


# --- shard pieces: where each part of one TP shard lives in the HF tensors ------------------
#
# The functions above move whole tensors (read everything, then cut). The resharder and the lazy
# loader move only what one rank owns: a TP shard maps onto a few rectangular regions of the HF
# tensor(s), one :class:`ShardPiece` each. A piece is also a *view* of the shard, so the same
# description serves both directions without copying the shard:
#
#   export (shard -> HF):   hf[piece.hf_index][piece.region] = piece.view.reshape(region shape)
#   import (HF -> shard):   piece.view.copy_(hf[piece.hf_index][piece.region].view(view shape))
#
# Pieces never cover vocabulary padding rows (they do not exist in HF), so a shard filled from
# its pieces must start zeroed.


@dataclass(frozen=True)
class ShardPiece:
    """One rectangular region of an HF tensor that a TP shard holds.

    Attributes:
        hf_index: which of the parameter's HF tensors (q=0, k=1, v=2; gate=0, up=1; else 0).
        rows: ``(start, stop)`` along the HF tensor's dim 0.
        cols: ``(start, stop)`` along dim 1, or None for all of it (then the region is
            contiguous in a row-major HF tensor, so it can be written in place).
        view: the shard's elements of this region, as a view of the shard; its row-major order
            is the region's, so ``view.reshape(region_shape)`` is the HF region.
    """

    hf_index: int
    rows: tuple[int, int]
    cols: tuple[int, int] | None
    view: torch.Tensor

    def region_shape(self, hf_shape: Sequence[int]) -> tuple[int, ...]:
        """Shape of the HF region (``hf_shape`` is the full HF tensor's shape)."""
        r = (self.rows[1] - self.rows[0],)
        if self.cols is None:
            return r + tuple(hf_shape[1:])
        return r + (self.cols[1] - self.cols[0],) + tuple(hf_shape[2:])

    def region_of(self, hf: torch.Tensor) -> torch.Tensor:
        """The region as a view of the HF tensor ``hf``."""
        t = hf[self.rows[0]: self.rows[1]]
        return t if self.cols is None else t[:, self.cols[0]: self.cols[1]]


def megatron_full_shape(kind: str, shard_shape: Sequence[int], tp: int) -> tuple[int, ...]:
    """Shape of the TP=1 megatron tensor whose TP shards have ``shard_shape``."""
    s = list(shard_shape)
    if tp == 1 or kind in REPLICATED:
        return tuple(s)
    if kind in ("vocab", "qkv", "column", "gate_up"):
        s[0] *= tp
    elif kind == "row":
        s[1] *= tp
    else:
        raise ValueError(f"unknown weight kind {kind!r}")
    return tuple(s)


def hf_shapes(kind: str, full_shape: Sequence[int], spec: ArchSpec) -> list[tuple[int, ...]]:
    """Shapes of the HF tensor(s) of a TP=1 megatron tensor of ``full_shape``."""
    full = torch.empty(tuple(full_shape), device="meta")
    return [tuple(t.shape) for t in megatron_full_to_hf(kind, full, spec)]


def shard_pieces(kind: str, shard: torch.Tensor, spec: ArchSpec, tp: int,
                 tp_rank: int) -> list[ShardPiece]:
    """The HF regions TP rank ``tp_rank``'s ``shard`` holds, each with a view of the shard.

    ``shard`` may be a meta tensor (geometry only). Replicated tensors give the whole tensor on
    every rank. Inverse of :func:`shard` + :func:`hf_to_megatron_full`, restricted to one rank.

    Raises:
        WeightLayoutError: the shard's shape does not fit the architecture and TP size.
    """
    n = shard.shape[0]
    if kind in REPLICATED or tp == 1 and kind in ("row", "column"):
        return [ShardPiece(0, (0, n), None, shard)]
    if kind == "column":
        return [ShardPiece(0, (tp_rank * n, (tp_rank + 1) * n), None, shard)]
    if kind == "row":
        c = shard.shape[1]
        return [ShardPiece(0, (0, n), (tp_rank * c, (tp_rank + 1) * c), shard)]
    if kind == "vocab":
        start = tp_rank * n
        stop = min(spec.vocab_size, start + n)
        if stop <= start:
            return []  # a shard of padding only
        return [ShardPiece(0, (start, stop), None, shard[: stop - start])]
    if kind == "gate_up":
        if n % 2:
            raise WeightLayoutError(f"gate_up shard with an odd number of rows ({n})")
        f = n // 2
        rows = (tp_rank * f, (tp_rank + 1) * f)
        return [ShardPiece(0, rows, None, shard[:f]), ShardPiece(1, rows, None, shard[f:])]
    if kind == "qkv":
        ng, hd = spec.num_query_groups, spec.head_dim
        qpg = spec.num_attention_heads // ng
        if ng % tp:
            raise WeightLayoutError(f"{ng} query groups are not divisible by tp={tp}")
        ngl = ng // tp
        rest = tuple(shard.shape[1:])
        if n != ngl * (qpg + 2) * hd:
            raise WeightLayoutError(
                f"qkv shard has {n} rows; {ngl} query groups of {qpg} q heads + k + v of "
                f"head_dim {hd} need {ngl * (qpg + 2) * hd}")
        g = shard.view((ngl, (qpg + 2) * hd) + rest)
        g0 = tp_rank * ngl
        return [
            ShardPiece(0, (g0 * qpg * hd, (g0 + ngl) * qpg * hd), None, g[:, : qpg * hd]),
            ShardPiece(1, (g0 * hd, (g0 + ngl) * hd), None, g[:, qpg * hd: (qpg + 1) * hd]),
            ShardPiece(2, (g0 * hd, (g0 + ngl) * hd), None, g[:, (qpg + 1) * hd:]),
        ]
    raise ValueError(f"unknown weight kind {kind!r}")
