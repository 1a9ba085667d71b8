"""Sequence bookkeeping shared by the rl functions: padded rows or packed rows + segment ids.

Every token-level function in :mod:`megarlhf.rl` takes ``(B, T)`` tensors and a ``mask``
(``True``/1 on the response tokens that count, ``False``/0 on prompt, padding and anything
else to ignore). Sequences are laid out in one of two ways:

* padded (``segment_ids=None``): row ``b`` holds sequence ``b``; ``S = B`` sequences.
* packed (``segment_ids`` given, ``(B, T)`` integer): ``segment_ids[b, t]`` is the index, in
  ``[0, S)``, of the sequence that token belongs to (the index into per-sequence tensors such as
  rewards). A sequence's tokens lie in one row, in order; several sequences may share a row.
  The value at masked positions is ignored (use -1 or anything).

Masked tokens may sit anywhere (left/right padding, holes such as tool outputs in a multi-turn
response); recursions over time skip them, so a hole is transparent.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sequence_index(mask: Tensor, segment_ids: Tensor | None,
                   num_sequences: int | None = None) -> tuple[Tensor, int]:
    """Per-token sequence index and the number of sequences.

    Args:
        mask: ``(B, T)`` bool/0-1.
        segment_ids: ``(B, T)`` integer or None (row = sequence).
        num_sequences: S if known (e.g. ``len(seq_rewards)``); inferred otherwise as
            ``max(segment_ids[mask]) + 1`` (0 if nothing is valid).

    Returns:
        ``(idx, S)``: ``idx`` ``(B, T)`` int64 with 0 at masked positions (callers must still
        mask), and ``S``.
    """
    m = mask.bool()
    B, T = m.shape
    if segment_ids is None:
        idx = torch.arange(B, device=m.device).unsqueeze(1).expand(B, T)  # (B, T)
        S = B if num_sequences is None else num_sequences
        if S != B:
            raise ValueError(f"{S} per-sequence values for {B} padded rows; pass segment_ids "
                             "for packed inputs")
        return idx, S
    if segment_ids.shape != m.shape:
        raise ValueError(f"segment_ids {tuple(segment_ids.shape)} must match mask "
                         f"{tuple(m.shape)}")
    idx = torch.where(m, segment_ids.long(), torch.zeros((), dtype=torch.long,
                                                          device=m.device))
    if num_sequences is None:
        S = int(idx.max().item()) + 1 if bool(m.any()) else 0
    else:
        S = num_sequences
        if bool(m.any()) and int(idx.max().item()) >= S:
            raise ValueError(f"segment id {int(idx.max().item())} out of range for {S} sequences")
    return idx, S


def per_sequence_sum(values: Tensor, mask: Tensor, segment_ids: Tensor | None,
                     num_sequences: int | None = None) -> tuple[Tensor, Tensor]:
    """Sum of ``values`` over the valid tokens of each sequence, and the valid-token count.

    ``values`` must already be zero at masked positions (differentiable in ``values``).

    Returns:
        ``(sums, counts)``, both ``(S,)`` in ``values``' dtype.
    """
    idx, S = sequence_index(mask, segment_ids, num_sequences)
    flat_idx = idx.reshape(-1)
    size = max(S, 1)  # an empty batch still gets a valid (all-zero) scatter target
    sums = values.new_zeros(size).index_add(0, flat_idx, values.reshape(-1))
    counts = values.new_zeros(size).index_add(0, flat_idx, mask.reshape(-1).to(values.dtype))
    return sums[:S], counts[:S]


def broadcast_to_tokens(seq_values: Tensor, mask: Tensor,
                        segment_ids: Tensor | None = None) -> Tensor:
    """Per-sequence values ``(S,)`` copied onto each valid token of their sequence; 0 elsewhere.

    Returns:
        ``(B, T)`` in ``seq_values``' dtype.
    """
    m = mask.bool()
    idx, _ = sequence_index(m, segment_ids, seq_values.shape[0])
    if seq_values.shape[0] == 0:
        return seq_values.new_zeros(m.shape)
    return torch.where(m, seq_values[idx], seq_values.new_zeros(()))  # (B, T)


def last_token_index(mask: Tensor, segment_ids: Tensor | None,
                     num_sequences: int | None = None) -> Tensor:
    """Flat index ``b * T + t`` of the last valid token of each sequence; -1 if it has none.

    Returns:
        ``(S,)`` int64.
    """
    m = mask.bool()
    B, T = m.shape
    idx, S = sequence_index(m, segment_ids, num_sequences)
    pos = torch.arange(B * T, device=m.device)
    out = torch.full((S,), -1, dtype=torch.long, device=m.device)
    flat_m = m.reshape(-1)
    return out.scatter_reduce(0, idx.reshape(-1)[flat_m], pos[flat_m], reduce="amax",
                              include_self=True)


def reverse_scan(token_rewards: Tensor, values: Tensor | None, mask: Tensor, gamma: float,
                 lam: float, segment_ids: Tensor | None) -> Tensor:
    """The GAE recursion run backwards over the valid tokens of each sequence.

    ``delta_t = r_t + gamma * V_next - V_t``; ``A_t = delta_t + gamma * lam * A_next``, where
    "next" is the next *valid* token of the same sequence (0 past its end). With ``values=None``
    and ``lam=1`` this is the discounted return ``G_t = r_t + gamma * G_next``.

    Returns:
        ``(B, T)`` fp32, 0 at masked positions.
    """
    m = mask.bool()
    B, T = m.shape
    r = torch.where(m, token_rewards.float(), 0.0)
    v = torch.zeros_like(r) if values is None else torch.where(m, values.float(), 0.0)
    seg, _ = sequence_index(m, segment_ids)
    out = torch.zeros_like(r)
    next_value = r.new_zeros(B)
    carry = r.new_zeros(B)
    last_seg = torch.full((B,), -1, dtype=torch.long, device=r.device)
    zero = r.new_zeros(())
    for t in range(T - 1, -1, -1):
        valid = m[:, t]
        new_seq = valid & (seg[:, t] != last_seg)  # a sequence ends here (seen backwards)
        next_value = torch.where(new_seq, zero, next_value)
        carry = torch.where(new_seq, zero, carry)
        delta = r[:, t] + gamma * next_value - v[:, t]
        a = delta + (gamma * lam) * carry
        out[:, t] = torch.where(valid, a, zero)
        carry = torch.where(valid, a, carry)
        next_value = torch.where(valid, v[:, t], next_value)
        last_seg = torch.where(valid, seg[:, t], last_seg)
    return out
