"""Reward-model losses and metrics (methods.md 1.1 and 1.2).

ORM, multi-task: one scalar score per sequence; a batch mixes preference pairs and
binary-labelled rows, each row carrying its kind (:data:`KIND_BINARY`, :data:`KIND_CHOSEN`,
:data:`KIND_REJECTED`, or :data:`KIND_IGNORE` for padding rows). The k-th chosen row of the
batch is paired with the k-th rejected row (in batch order)::

    L_pref = mean over pairs   of -log sigmoid(s_c - s_r)                (Bradley-Terry)
    L_bin  = mean over binary  of BCE(sigmoid(s), l)                     (l in {0, 1})
    L      = L_bin + L_pref           (a kind missing from the batch contributes 0)

PRM: a score (logit) at every position; BCE at the positions that end a reasoning step, with
Math-Shepherd labels: the fraction of K rollouts from that prefix that reach the right answer
("soft"), or whether any does ("hard" = fraction > 0).

Everything is computed in fp32. The ``*_normalizer`` arguments follow the contract of
:func:`megarlhf.rl.losses.aggregate`: pass the global count (pairs, binary rows, steps) summed
over micro-batches and ranks, and the per-micro-batch losses add up to the global loss.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from megarlhf.rl._segments import last_token_index, per_sequence_sum, sequence_index

KIND_IGNORE = -1
KIND_BINARY = 0
KIND_CHOSEN = 1
KIND_REJECTED = 2
Metrics = dict[str, Tensor]


def _mean_with(losses: Tensor, normalizer: Tensor | float | None) -> Tensor:
    denom = losses.numel() if normalizer is None else normalizer
    denom = torch.as_tensor(denom, dtype=torch.float32, device=losses.device).clamp(min=1.0)
    return losses.sum() / denom


def bradley_terry_loss(chosen: Tensor, rejected: Tensor, *,
                       normalizer: Tensor | float | None = None) -> Tensor:
    """``mean(-log sigmoid(s_c - s_r))`` over pairs; 0 for no pairs.

    Args:
        chosen: ``(P,)`` scores of the preferred responses.
        rejected: ``(P,)`` scores of the dispreferred responses.
        normalizer: global pair count (see the module docstring) or None.

    Returns:
        0-dim fp32.
    """
    return _mean_with(-F.logsigmoid(chosen.float() - rejected.float()), normalizer)


def binary_ce_loss(scores: Tensor, labels: Tensor, *,
                   normalizer: Tensor | float | None = None) -> Tensor:
    """``mean(-[l log sigmoid(s) + (1 - l) log(1 - sigmoid(s))])``; 0 for no rows.

    Args:
        scores: ``(M,)`` logits.
        labels: ``(M,)`` targets in [0, 1] (soft labels allowed).
        normalizer: global row count or None.

    Returns:
        0-dim fp32.
    """
    losses = F.binary_cross_entropy_with_logits(scores.float(), labels.float(), reduction="none")
    return _mean_with(losses, normalizer)


def pairwise_accuracy(chosen: Tensor, rejected: Tensor) -> Tensor:
    """Fraction of pairs with ``s_c > s_r``; a tie counts 1/2 (so a constant RM scores 0.5).

    Returns:
        0-dim fp32; 0 for no pairs.
    """
    c, r = chosen.detach().float(), rejected.detach().float()
    hits = (c > r).float() + 0.5 * (c == r).float()
    return hits.sum() / max(c.numel(), 1)


def binary_accuracy(scores: Tensor, labels: Tensor, *, threshold: float = 0.0) -> Tensor:
    """Fraction of rows with ``(s > threshold) == (l >= 0.5)`` (threshold 0 = probability 0.5).

    Returns:
        0-dim fp32; 0 for no rows.
    """
    pred = scores.detach().float() > threshold
    return (pred == (labels.detach().float() >= 0.5)).float().sum() / max(scores.numel(), 1)


def binary_auc(scores: Tensor, labels: Tensor) -> Tensor:
    """ROC AUC from ranks (Mann-Whitney U); tied scores get their average rank.

    ``AUC = (sum of positive ranks - P (P + 1) / 2) / (P * N)`` with ranks 1..M of the scores,
    P positives (``l >= 0.5``) and N negatives. Equals the probability that a random positive
    outscores a random negative, ties counting 1/2.

    Returns:
        0-dim fp32; NaN when one class is absent (AUC is undefined there).
    """
    s = scores.detach().float().reshape(-1)
    pos = labels.detach().float().reshape(-1) >= 0.5
    n_pos = int(pos.sum())
    n_neg = s.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return torch.tensor(float("nan"))
    sorted_s, order = torch.sort(s)
    _, inverse, counts = torch.unique_consecutive(sorted_s, return_inverse=True,
                                                  return_counts=True)
    ends = torch.cumsum(counts, 0).double()             # last 1-based rank of each tie group
    avg_rank = ends - (counts.double() - 1) / 2          # mean rank of each tie group
    ranks = torch.empty_like(s, dtype=torch.float64)
    ranks[order] = avg_rank[inverse]
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2
    return (u / (n_pos * n_neg)).float()


def orm_multitask_loss(scores: Tensor, kinds: Tensor, labels: Tensor | None = None, *,
                       pair_normalizer: Tensor | float | None = None,
                       binary_normalizer: Tensor | float | None = None
                       ) -> tuple[Tensor, Metrics]:
    """Multi-task ORM loss ``L = L_bin + L_pref`` over a mixed batch (methods.md 1.1).

    Args:
        scores: ``(B,)`` scalar RM outputs (logits), one per sequence.
        kinds: ``(B,)`` integer: :data:`KIND_BINARY`, :data:`KIND_CHOSEN`,
            :data:`KIND_REJECTED` or :data:`KIND_IGNORE`. The k-th chosen row pairs with the
            k-th rejected row; their counts must match.
        labels: ``(B,)`` 0/1 labels, read on binary rows only; may be None without binary rows.
        pair_normalizer: global number of pairs, or None (local).
        binary_normalizer: global number of binary rows, or None (local).

    Returns:
        ``(loss, metrics)``: ``loss_pref``, ``loss_bin``, ``pair_accuracy``, ``chosen_reward``,
        ``rejected_reward``, ``binary_accuracy``, ``binary_auc`` (NaN without both classes),
        ``num_pairs``, ``num_binary``. Metrics of a missing kind are 0 (AUC NaN).
    """
    s = scores.float().reshape(-1)
    k = kinds.reshape(-1)
    chosen, rejected = s[k == KIND_CHOSEN], s[k == KIND_REJECTED]  # (P,), (P,)
    if chosen.numel() != rejected.numel():
        raise ValueError(f"{chosen.numel()} chosen rows but {rejected.numel()} rejected rows; "
                         "every pair needs one of each")
    is_bin = k == KIND_BINARY
    bin_scores = s[is_bin]  # (M,)
    if bin_scores.numel() and labels is None:
        raise ValueError("binary rows need labels")
    bin_labels = labels.float().reshape(-1)[is_bin] if labels is not None else bin_scores
    loss_pref = bradley_terry_loss(chosen, rejected, normalizer=pair_normalizer)
    loss_bin = binary_ce_loss(bin_scores, bin_labels, normalizer=binary_normalizer)
    with torch.no_grad():
        n_p, n_b = chosen.numel(), bin_scores.numel()
        metrics = {
            "loss_pref": loss_pref.detach(),
            "loss_bin": loss_bin.detach(),
            "pair_accuracy": pairwise_accuracy(chosen, rejected),
            "chosen_reward": chosen.sum() / max(n_p, 1),
            "rejected_reward": rejected.sum() / max(n_p, 1),
            "binary_accuracy": binary_accuracy(bin_scores, bin_labels),
            "binary_auc": binary_auc(bin_scores, bin_labels),
            "num_pairs": torch.tensor(float(n_p)),
            "num_binary": torch.tensor(float(n_b)),
        }
    return loss_bin + loss_pref, metrics


def prm_step_loss(step_logits: Tensor, step_mask: Tensor, step_labels: Tensor, *,
                  label_type: Literal["soft", "hard"] = "soft",
                  normalizer: Tensor | float | None = None) -> tuple[Tensor, Metrics]:
    """PRM per-step BCE at the positions that end a reasoning step (methods.md 1.2).

    ``L = mean over step positions of BCE(sigmoid(s_t), y_t)`` where ``y_t`` is the soft label
    (fraction of rollouts that succeed) or the hard label ``1[fraction > 0]``.

    Args:
        step_logits: ``(B, T)`` PRM logits at every position.
        step_mask: ``(B, T)`` True at the last token of each step (intermediate and final).
        step_labels: ``(B, T)`` labels in [0, 1] at step positions (ignored elsewhere).
        label_type: ``"soft"`` or ``"hard"``.
        normalizer: global step count (see the module docstring) or None.

    Returns:
        ``(loss, metrics)``: ``step_accuracy`` (``(s > 0) == (y >= 0.5)``), ``step_score``
        (mean ``sigmoid(s)``), ``num_steps``. No steps gives loss 0 and zero gradient.
    """
    if label_type not in ("soft", "hard"):
        raise ValueError(f"PRM label_type must be 'soft' or 'hard', got {label_type!r}")
    m = step_mask.bool()
    logits = torch.where(m, step_logits.float(), 0.0)  # (B, T)
    y = torch.where(m, step_labels.float(), 0.0)
    if label_type == "hard":
        y = (y > 0).float()
    per_pos = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
    per_pos = torch.where(m, per_pos, 0.0)
    count = m.sum()
    denom = count if normalizer is None else normalizer
    denom = torch.as_tensor(denom, dtype=torch.float32, device=logits.device).clamp(min=1.0)
    loss = per_pos.sum() / denom
    with torch.no_grad():
        n = count.clamp(min=1)
        correct = ((logits > 0) == (y >= 0.5)) & m
        metrics = {
            "step_accuracy": correct.float().sum() / n,
            "step_score": torch.where(m, torch.sigmoid(logits), 0.0).sum() / n,
            "num_steps": count.float(),
        }
    return loss, metrics


def prm_sequence_score(step_logits: Tensor, step_mask: Tensor,
                       reduction: Literal["last", "min", "prod"] = "last", *,
                       segment_ids: Tensor | None = None,
                       num_sequences: int | None = None) -> Tensor:
    """Scores a whole response with a PRM (methods.md 1.2): from the step probabilities
    ``p_k = sigmoid(s_k)``, the last step's (default), the minimum, or the product.

    Args:
        step_logits: ``(B, T)`` PRM logits.
        step_mask: ``(B, T)`` True at step ends.
        reduction: ``"last"`` | ``"min"`` | ``"prod"``.
        segment_ids: packed rows (sequence index per token).
        num_sequences: S for packed rows.

    Returns:
        ``(S,)`` fp32 probabilities in [0, 1]; a response without steps scores 0.
    """
    m = step_mask.bool()
    p = torch.sigmoid(step_logits.detach().float())  # (B, T)
    if reduction == "last":
        last = last_token_index(m, segment_ids, num_sequences)  # (S,)
        return torch.where(last >= 0, p.reshape(-1)[last.clamp(min=0)], 0.0)
    if reduction == "prod":
        log_sums, counts = per_sequence_sum(torch.where(m, p.clamp_min(1e-30).log(), 0.0), m,
                                            segment_ids, num_sequences)
        return torch.where(counts > 0, log_sums.exp(), 0.0)
    if reduction == "min":
        idx, S = sequence_index(m, segment_ids, num_sequences)
        out = torch.full((S,), 2.0, dtype=torch.float32, device=p.device)
        out = out.scatter_reduce(0, idx[m], p[m], reduce="amin", include_self=True)
        return torch.where(out > 1.0, 0.0, out)
    raise ValueError(f"PRM reduction must be 'last', 'min' or 'prod', got {reduction!r}")


__all__ = [
    "KIND_IGNORE", "KIND_BINARY", "KIND_CHOSEN", "KIND_REJECTED", "bradley_terry_loss",
    "binary_ce_loss", "pairwise_accuracy", "binary_accuracy", "binary_auc",
    "orm_multitask_loss", "prm_step_loss", "prm_sequence_score",
]
