"""Groups of responses to one prompt, of equal or unequal size.

Group-based estimators (GRPO, Dr.GRPO, RLOO, REINFORCE++-baseline, online-DPO pairs, dynamic
sampling's filter) compare the responses of one prompt with each other. Two ways to say which
sequence belongs to which prompt:

* ``group_size=N`` (and ``group_ids=None``): the N responses of a prompt are consecutive and
  every prompt has N of them (``r.view(P, N)``);
* ``group_ids`` ``(S,)`` integer: sequence s belongs to the group ``group_ids[s]`` (any integer
  labels; sequences of a group need not be consecutive, groups may differ in size). This is what
  a batch holds after a prompt lost some samples (filtered, or failed generations).

Both become a padded ``(G, n_max)`` matrix with a validity mask (:func:`group_matrix`): with
equal consecutive groups it is exactly ``r.view(P, N)``, so the two ways give identical results.
"""

from __future__ import annotations

import torch
from torch import Tensor


def group_index(num: int, group_size: int | None = None, group_ids: Tensor | None = None, *,
                device: torch.device | None = None) -> tuple[Tensor, int]:
    """Dense group index in ``[0, G)`` of each of ``num`` sequences, and ``G``.

    Args:
        num: S, the number of sequences.
        group_size: N for equal consecutive groups (used when ``group_ids`` is None).
        group_ids: ``(S,)`` integer group labels (take precedence over ``group_size``).
        device: of the result.

    Returns:
        ``(idx, G)``: ``idx`` ``(S,)`` int64; with ``group_ids`` the groups are numbered in
        increasing label order.

    Raises:
        ValueError: neither is given, ``group_ids`` has the wrong length, or ``num`` is not a
            whole number of groups of ``group_size``.
    """
    if group_ids is not None:
        g = torch.as_tensor(group_ids).reshape(-1)
        if g.numel() != num:
            raise ValueError(f"group_ids has {g.numel()} entries for {num} sequences")
        if num == 0:
            return g.new_zeros(0, dtype=torch.long), 0
        labels, idx = torch.unique(g.long(), return_inverse=True)
        return idx.to(device or g.device), int(labels.numel())
    if group_size is None or group_size < 1 or num % group_size:
        raise ValueError(f"{num} rewards are not a whole number of groups of "
                         f"group_size={group_size}")
    return torch.arange(num, device=device) // group_size, num // group_size


def group_matrix(values: Tensor, idx: Tensor, num_groups: int, *, fill: float = 0.0
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """Sequence values laid out one group per row.

    Args:
        values: ``(S,)``.
        idx: ``(S,)`` dense group index (:func:`group_index`).
        num_groups: G.
        fill: value of the padding slots.

    Returns:
        ``(M, valid, pos)``: ``M`` ``(G, n_max)`` with ``M[idx[s], pos[s]] = values[s]`` (a group's
        sequences in their original order), ``valid`` ``(G, n_max)`` bool, ``pos`` ``(S,)``.
        ``values`` of a group are read back with ``M[idx, pos]``.
    """
    S = values.shape[0]
    counts = torch.bincount(idx, minlength=num_groups)  # (G,)
    n_max = int(counts.max()) if S else 0
    order = torch.argsort(idx, stable=True)
    starts = torch.cumsum(counts, 0) - counts  # (G,) first slot of each group in `order`
    pos = torch.empty_like(idx)
    pos[order] = torch.arange(S, device=idx.device) - starts[idx[order]]
    M = values.new_full((num_groups, n_max), fill)
    valid = torch.zeros(num_groups, n_max, dtype=torch.bool, device=values.device)
    M[idx, pos] = values
    valid[idx, pos] = True
    return M, valid, pos


def group_sizes(num: int, group_size: int | None = None, group_ids: Tensor | None = None
                ) -> Tensor:
    """``(S,)`` the size of each sequence's group."""
    idx, G = group_index(num, group_size, group_ids)
    return torch.bincount(idx, minlength=G)[idx]
