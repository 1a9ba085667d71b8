"""Token batches and how they become micro-batches (fixed count, or packed by a token budget).

Convention used across megarlhf: a :class:`TokenBatch` holds B right-padded sequences
``input_ids (B, S)`` with ``attention_mask (B, S)`` marking real tokens. Per-token fields are
aligned with the tokens: position ``t`` holds the value for token ``t`` (e.g. ``logp[:, t] =
log p(x_t | x_<t)``, so position 0 never carries a log-prob). Per-sequence fields are ``(B,)``.

Micro-batches are what one forward pass of the pipeline schedule sees:

* unpacked: consecutive groups of ``micro_batch_size`` sequences, each padded to its own longest
  sequence; causal attention (right padding never leaks into real tokens);
* packed: sequences first-fit-decreasing into rows of at most ``max_tokens`` tokens; positions
  restart at every sequence and attention is block-diagonal causal (an explicit mask for
  megatron's local attention; ``PackedSeqParams`` with cu_seqlens for Transformer Engine).

Either way :meth:`MicroBatch.unpack` maps per-token outputs back to (B, S) in the original order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class TokenBatch:
    """B right-padded sequences and fields aligned with them."""

    input_ids: Tensor  # (B, S) long
    attention_mask: Tensor  # (B, S) bool: real tokens
    fields: dict[str, Tensor] = field(default_factory=dict)  # (B, S) per token or (B,) per seq

    def __post_init__(self):
        if self.input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, S), got {tuple(self.input_ids.shape)}")
        self.attention_mask = self.attention_mask.bool()
        if self.attention_mask.shape != self.input_ids.shape:
            raise ValueError("attention_mask must have the shape of input_ids")
        B = self.input_ids.shape[0]
        for k, v in self.fields.items():
            if v.shape[0] != B:
                raise ValueError(f"field {k!r} has {v.shape[0]} rows, the batch has {B}")

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def lengths(self) -> Tensor:
        return self.attention_mask.sum(dim=1)

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def select(self, idx) -> "TokenBatch":
        """Rows ``idx`` (a list / tensor of indices or a slice), trimmed to their longest row."""
        ids = self.input_ids[idx]
        am = self.attention_mask[idx]
        s = int(am.sum(dim=1).max()) if am.numel() else 0
        s = max(s, 1)
        f = {k: (v[idx][:, :s] if v.dim() >= 2 and v.shape[1] == self.input_ids.shape[1]
                 else v[idx]) for k, v in self.fields.items()}
        return TokenBatch(ids[:, :s], am[:, :s], f)

    @staticmethod
    def from_sequences(seqs: list[list[int]] | list[Tensor], pad_id: int = 0,
                       fields: dict[str, list] | None = None) -> "TokenBatch":
        """Right-pads ``seqs``; per-token field lists are padded with zeros alongside."""
        lens = [len(s) for s in seqs]
        S = max(lens) if lens else 1
        B = len(seqs)
        ids = torch.full((B, S), pad_id, dtype=torch.long)
        am = torch.zeros((B, S), dtype=torch.bool)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
            am[i, : len(s)] = True
        out: dict[str, Tensor] = {}
        for k, vals in (fields or {}).items():
            first = torch.as_tensor(vals[0])
            if first.dim() == 0:
                out[k] = torch.stack([torch.as_tensor(v) for v in vals])
            else:
                t = torch.zeros((B, S), dtype=first.dtype)
                for i, v in enumerate(vals):
                    v = torch.as_tensor(v)
                    t[i, : len(v)] = v
                out[k] = t
        return TokenBatch(ids, am, out)

    def shard(self, rank: int, size: int) -> "TokenBatch":
        """The contiguous 1/size of the rows that data-parallel rank ``rank`` trains on."""
        if self.batch_size % size:
            raise ValueError(f"batch of {self.batch_size} sequences does not split over {size} "
                             "data-parallel ranks")
        n = self.batch_size // size
        return self.select(slice(rank * n, (rank + 1) * n))


@dataclass
class MicroBatch:
    """One forward pass's input, and where its rows came from."""

    input_ids: Tensor  # (b, s)
    position_ids: Tensor  # (b, s)
    attention_mask: Tensor | None  # (b, 1, s, s) bool, True = masked; None = plain causal
    fields: dict[str, Tensor]  # per-token (b, s) (packed like the tokens) or per-seq (n_seq,)
    # For every sequence of this micro-batch: (original index, row, start column, length).
    placement: list[tuple[int, int, int, int]]
    loss_mask_tokens: int = 0
    packed: bool = False
    cu_seqlens: Tensor | None = None  # (n_seq + 1,) int32 for THD packing (TE)
    max_seqlen: int = 0
    # Packed: (b, s) index of each token's sequence in this micro-batch (its position in
    # ``placement`` and in per-sequence fields), -1 on padding; None when unpacked (row = seq).
    # This is the ``segment_ids`` argument of the megarlhf.rl functions.
    segment_ids: Tensor | None = None

    @property
    def num_sequences(self) -> int:
        return len(self.placement)

    def unpack(self, values: Tensor, out: Tensor) -> None:
        """Writes per-token ``values (b, s)`` into ``out (B, S)`` at the original positions."""
        for orig, row, start, n in self.placement:
            out[orig, :n] = values[row, start: start + n].to(out.dtype)

    def seq_values(self, values: Tensor, positions: Tensor) -> Tensor:
        """Per-sequence values read at per-sequence token ``positions`` (within each sequence)."""
        rows = torch.tensor([p[1] for p in self.placement])
        cols = torch.tensor([p[2] for p in self.placement]) + positions.long()
        return values[rows, cols]


def _pad_to(n: int, multiple: int) -> int:
    return ((n + multiple - 1) // multiple) * multiple


def make_micro_batches(batch: TokenBatch, *, micro_batch_size: int | None = None,
                       max_tokens: int | None = None, pad_multiple: int = 1,
                       pad_id: int = 0, min_micro_batches: int = 1,
                       micro_batch_multiple: int = 1, group_size: int = 1) -> list[MicroBatch]:
    """Splits ``batch`` into micro-batches.

    Args:
        micro_batch_size: sequences per micro-batch (unpacked mode).
        max_tokens: token budget per micro-batch (packed mode; one row per micro-batch). A
            sequence longer than the budget is refused.
        pad_multiple: pad each micro-batch's length to a multiple of this (sequence parallelism
            needs a multiple of tp).
        min_micro_batches / micro_batch_multiple: add empty micro-batches (one pad token, no
            sequences) until the count is at least / a multiple of these (the interleaved pipeline
            schedule needs a multiple of pp). They carry no loss and produce no output.
        group_size: consecutive sequences ``[k*g, (k+1)*g)`` stay in one micro-batch, in order
            (a reward model's (chosen, rejected) pairs, a prompt's N samples for DPO).
    """
    if (micro_batch_size is None) == (max_tokens is None):
        raise ValueError("give exactly one of micro_batch_size or max_tokens")
    if batch.batch_size % group_size:
        raise ValueError(f"batch of {batch.batch_size} sequences is not a whole number of groups "
                         f"of {group_size}")
    if micro_batch_size is not None and micro_batch_size % group_size:
        raise ValueError(f"micro_batch_size_per_rank={micro_batch_size} must be a multiple of "
                         f"{group_size} (sequences that are trained together, e.g. RM pairs)")
    lens = batch.lengths.tolist()
    per_seq = {k: v for k, v in batch.fields.items() if v.dim() == 1}
    per_tok = {k: v for k, v in batch.fields.items() if v.dim() >= 2}
    mbs: list[MicroBatch] = []
    if micro_batch_size is not None:
        for start in range(0, batch.batch_size, micro_batch_size):
            idx = list(range(start, min(start + micro_batch_size, batch.batch_size)))
            s = _pad_to(max(max(lens[i] for i in idx), 1), pad_multiple)
            b = len(idx)
            ids = torch.full((b, s), pad_id, dtype=torch.long)
            f = {k: torch.zeros((b, s) + tuple(v.shape[2:]), dtype=v.dtype)
                 for k, v in per_tok.items()}
            for r, i in enumerate(idx):
                n = lens[i]
                ids[r, :n] = batch.input_ids[i, :n]
                for k, v in per_tok.items():
                    f[k][r, :n] = v[i, :n]
            for k, v in per_seq.items():
                f[k] = v[idx]
            pos = torch.arange(s).unsqueeze(0).expand(b, s).contiguous()
            mbs.append(MicroBatch(ids, pos, None, f, [(i, r, 0, lens[i]) for r, i in
                                                        enumerate(idx)]))
    else:
        units = [list(range(k, k + group_size)) for k in range(0, len(lens), group_size)]
        ulen = [sum(lens[i] for i in u) for u in units]
        too_long = [k for k, n in enumerate(ulen) if n > max_tokens]
        if too_long:
            k = too_long[0]
            what = f"sequence {k}" if group_size == 1 else f"group {k} ({group_size} sequences)"
            raise ValueError(f"{what} has {ulen[k]} tokens, more than max_tokens_per_micro_batch="
                             f"{max_tokens}; raise the budget")
        # First-fit decreasing over units; ties broken by index so packing is deterministic.
        order = sorted(range(len(units)), key=lambda k: (-ulen[k], k))
        bins: list[list[int]] = []
        room: list[int] = []
        for k in order:
            for bi in range(len(bins)):
                if room[bi] >= ulen[k]:
                    bins[bi].extend(units[k])
                    room[bi] -= ulen[k]
                    break
            else:
                bins.append(list(units[k]))
                room.append(max_tokens - ulen[k])
        for members in bins:
            members.sort()
            total = sum(lens[i] for i in members)
            s = _pad_to(max(total, 1), pad_multiple)
            ids = torch.full((1, s), pad_id, dtype=torch.long)
            pos = torch.zeros((1, s), dtype=torch.long)
            mask = torch.ones((1, 1, s, s), dtype=torch.bool)  # True = masked
            f = {k: torch.zeros((1, s) + tuple(v.shape[2:]), dtype=v.dtype)
                 for k, v in per_tok.items()}
            placement = []
            cu = [0]
            col = 0
            seg = torch.full((1, s), -1, dtype=torch.long)
            for j, i in enumerate(members):
                n = lens[i]
                seg[0, col: col + n] = j
                ids[0, col: col + n] = batch.input_ids[i, :n]
                pos[0, col: col + n] = torch.arange(n)
                mask[0, 0, col: col + n, col: col + n] = ~torch.tril(
                    torch.ones((n, n), dtype=torch.bool))
                for k, v in per_tok.items():
                    f[k][0, col: col + n] = v[i, :n]
                placement.append((i, 0, col, n))
                col += n
                cu.append(col)
            # Padding tokens attend to themselves only (keeps softmax finite; outputs unused).
            for c in range(col, s):
                mask[0, 0, c, c] = False
            if s > col:
                cu.append(s)
            for k, v in per_seq.items():
                f[k] = v[members]
            mbs.append(MicroBatch(ids, pos, mask, f, placement, packed=True,
                                  cu_seqlens=torch.tensor(cu, dtype=torch.int32),
                                  max_seqlen=max([lens[i] for i in members] + [s - col]),
                                  segment_ids=seg))
    target = max(min_micro_batches, len(mbs))
    target = _pad_to(target, micro_batch_multiple)
    while len(mbs) < target:
        s = _pad_to(1, pad_multiple)
        ids = torch.full((1, s), pad_id, dtype=torch.long)
        f = {k: torch.zeros((1, s) + tuple(v.shape[2:]), dtype=v.dtype) for k, v in
             per_tok.items()}
        for k, v in per_seq.items():
            f[k] = v[:0]
        mbs.append(MicroBatch(ids, torch.arange(s).unsqueeze(0), None, f, []))
    return mbs


def pad_micro_batches_uniform(mbs: list[MicroBatch], pad_id: int = 0,
                              shape: tuple[int, int] | None = None) -> list[MicroBatch]:
    """Pads every micro-batch to the same (rows, length): megatron's interleaved schedule
    communicates fixed tensor shapes. Padding rows and columns carry no sequence (no loss, no
    output) and attend only to themselves. ``shape``: at least this (rows, length) (e.g. the
    largest over the ranks that must agree)."""
    b = max(m.input_ids.shape[0] for m in mbs)
    s = max(m.input_ids.shape[1] for m in mbs)
    if shape is not None:
        b, s = max(b, shape[0]), max(s, shape[1])
    out = []
    for m in mbs:
        mb, ms = m.input_ids.shape
        if (mb, ms) == (b, s):
            out.append(m)
            continue
        ids = torch.full((b, s), pad_id, dtype=torch.long)
        ids[:mb, :ms] = m.input_ids
        pos = torch.zeros((b, s), dtype=torch.long)
        pos[:mb, :ms] = m.position_ids
        mask = None
        if m.attention_mask is not None:
            mask = ~torch.eye(s, dtype=torch.bool).expand(b, 1, s, s).clone()
            mask[:mb, :, :ms, :ms] = m.attention_mask
        fields = {}
        for k, v in m.fields.items():
            if v.dim() >= 2 and v.shape[0] == mb and v.shape[1] == ms:
                t = torch.zeros((b, s) + tuple(v.shape[2:]), dtype=v.dtype)
                t[:mb, :ms] = v
                fields[k] = t
            else:
                fields[k] = v
        seg = None
        if m.segment_ids is not None:
            seg = torch.full((b, s), -1, dtype=torch.long)
            seg[:mb, :ms] = m.segment_ids
        out.append(MicroBatch(ids, pos, mask, fields, m.placement, m.loss_mask_tokens,
                              m.packed, m.cu_seqlens, m.max_seqlen, seg))
    return out
