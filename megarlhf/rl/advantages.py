"""Advantage estimators (methods.md 2.3): GAE, GRPO, Dr.GRPO, RLOO, REINFORCE++,
REINFORCE++-baseline.

Inputs are ``(B, T)`` token tensors with a response ``mask`` — padded rows (row b is sequence
b) or packed rows with ``segment_ids`` (see :mod:`megarlhf.rl._segments`) — and ``(S,)``
sequence tensors. Outputs are fp32 and exactly 0 at masked positions. Recursions over time skip
masked tokens: "the next token" is the next *valid* token of the same sequence.

Which rewards go in:

* GAE and REINFORCE++ take per-token rewards (the sequence reward on the last valid token, KL
  folded in or not): :func:`megarlhf.rl.rewards.rewards_with_kl`.
* GRPO takes the sequence rewards of :func:`megarlhf.rl.rewards.process_rewards` with
  ``normalization="group"``: they already are the advantages, and normalizing again here would
  undo the shrinking of negatives that 2.2 applies *after* normalization.
* Dr.GRPO: either ``process_rewards(..., scale_by_std=False)`` + :func:`grpo_advantages`, or
  ``process_rewards(..., normalization="none")`` + :func:`dr_grpo_advantages` (centers here);
  aggregate its loss with ``"seq_mean_token_sum_norm"`` (no length normalization).
* RLOO and REINFORCE++-baseline take un-normalized (clipped) sequence rewards.

Group-based estimators take either ``group_size`` (N consecutive responses per prompt) or
``group_ids`` (a group label per sequence: groups of unequal size, e.g. after some samples of a
prompt were filtered out or failed), see :mod:`megarlhf.rl._groups`.

Whitening and REINFORCE++'s normalization are over the batch passed in; the driver calls them
on the global batch, not per data-parallel rank.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megarlhf.rl._groups import group_index, group_matrix
from megarlhf.rl._segments import broadcast_to_tokens, reverse_scan
from megarlhf.rl.rewards import normalize_rewards, token_level_rewards


def whiten(values: Tensor, mask: Tensor, *, shift_mean: bool = True,
           eps: float = 1e-8) -> Tensor:
    """Masked whitening: ``(x - mean) / sqrt(var + eps)`` over all valid tokens.

    ``var`` is the population variance (divide by the valid-token count). If all valid values
    are equal the scaled deviations are 0 there, so the result is 0 (``shift_mean``) or the
    mean itself (``shift_mean=False``: scaling without shifting keeps the mean).

    Args:
        values: ``(B, T)``.
        mask: ``(B, T)`` valid tokens.
        shift_mean: False adds the mean back (scale only), as some PPO codebases do.
        eps: added to the variance.

    Returns:
        ``(B, T)`` fp32, 0 at masked positions.
    """
    m = mask.bool()
    x = torch.where(m, values.float(), 0.0)
    n = m.sum().clamp(min=1).float()
    mean = x.sum() / n
    var = torch.where(m, (x - mean).square(), 0.0).sum() / n
    out = (x - mean) * torch.rsqrt(var + eps)
    if bool(m.any()):
        valid = values.float()[m]
        if bool(valid.max() == valid.min()):
            out = torch.zeros_like(out)  # no spread: every deviation is exactly 0
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, 0.0)


def gae_advantages(token_rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0,
                   lam: float = 0.95, whiten_advantages: bool = False,
                   segment_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation (PPO with a critic).

    Backwards over the valid tokens of each sequence::

        delta_t = r_t + gamma * V_{t+1} - V_t          (V past the last token = 0)
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t                            (the critic's target)

    Args:
        token_rewards: ``(B, T)`` per-token rewards, sequence reward on the last valid token.
        values: ``(B, T)`` critic values ``V_t`` of the rollout.
        mask: ``(B, T)`` response tokens.
        gamma: discount.
        lam: GAE lambda.
        whiten_advantages: whiten ``A`` over the valid tokens of the batch (returns are
            computed before whitening).
        segment_ids: packed rows, see :mod:`megarlhf.rl._segments`.

    Returns:
        ``(advantages, returns)``, both ``(B, T)`` fp32, 0 at masked positions.
    """
    m = mask.bool()
    adv = reverse_scan(token_rewards, values, m, gamma, lam, segment_ids)  # (B, T)
    returns = torch.where(m, adv + values.float(), 0.0)
    if whiten_advantages:
        adv = whiten(adv, m)
    return adv, returns


def discounted_returns(token_rewards: Tensor, mask: Tensor, *, gamma: float = 1.0,
                       segment_ids: Tensor | None = None) -> Tensor:
    """``G_t = r_t + gamma * G_{t+1}`` over the valid tokens of each sequence.

    Args:
        token_rewards: ``(B, T)``.
        mask: ``(B, T)``.
        gamma: discount.
        segment_ids: packed rows.

    Returns:
        ``(B, T)`` fp32, 0 at masked positions.
    """
    return reverse_scan(token_rewards, None, mask.bool(), gamma, 1.0, segment_ids)


def grpo_advantages(seq_rewards: Tensor, mask: Tensor, *,
                    segment_ids: Tensor | None = None) -> Tensor:
    """GRPO: the group-normalized sequence reward, broadcast to every response token.

    ``A_{i,t} = r~_i`` for every valid token t of response i, where ``r~`` is the output of
    :func:`megarlhf.rl.rewards.process_rewards` (``normalization="group"``, i.e.
    ``(r_i - mean_group) / (std_group + eps)``, then negatives shrunk).

    Args:
        seq_rewards: ``(S,)`` processed sequence rewards.
        mask: ``(B, T)``.
        segment_ids: packed rows.

    Returns:
        ``(B, T)`` fp32.
    """
    return broadcast_to_tokens(seq_rewards.float(), mask, segment_ids)


def dr_grpo_advantages(seq_rewards: Tensor, mask: Tensor, group_size: int | None = None, *,
                       segment_ids: Tensor | None = None,
                       group_ids: Tensor | None = None) -> Tensor:
    """Dr.GRPO: ``A_i = r_i - mean_group(r)`` (no std division), broadcast to tokens.

    Pair it with ``aggregate(..., mode="seq_mean_token_sum_norm", length_constant=L)`` so that
    no per-response length normalization enters the loss either.

    Args:
        seq_rewards: ``(S,)`` un-normalized sequence rewards, ``S = P * group_size``, groups
            consecutive.
        mask: ``(B, T)``.
        group_size: N.
        segment_ids: packed rows.
        group_ids: ``(S,)`` group labels instead of ``group_size`` (groups of unequal size).

    Returns:
        ``(B, T)`` fp32; a group with equal rewards gets exactly 0.
    """
    centered = normalize_rewards(seq_rewards, group_size, "group", scale_by_std=False,
                                 group_ids=group_ids)
    return broadcast_to_tokens(centered, mask, segment_ids)


def rloo_baseline_advantages(seq_rewards: Tensor, group_size: int | None = None, *,
                             group_ids: Tensor | None = None) -> Tensor:
    """RLOO's sequence advantages ``A_i = r_i - (sum_{j in g(i)} r_j - r_i) / (n_g - 1)``.

    With groups of equal size N this is ``N / (N - 1) * (r_i - mean(r))``; with unequal groups
    each uses its own size ``n_g``. A response alone in its group has no one to leave out: 0.

    Args:
        seq_rewards: ``(S,)`` sequence rewards.
        group_size: N >= 2 (equal consecutive groups).
        group_ids: ``(S,)`` group labels instead (:mod:`megarlhf.rl._groups`).

    Returns:
        ``(S,)`` fp32; a group with equal rewards gets exactly 0.
    """
    if group_ids is None and group_size is not None and group_size < 2:
        raise ValueError("RLOO needs group_size >= 2 responses per prompt (the baseline of a "
                         f"response is the mean of the others), got {group_size}; use "
                         "GRPO/REINFORCE++ with batch normalization for N = 1")
    r = seq_rewards.float()
    idx, G = group_index(r.numel(), group_size, group_ids, device=r.device)
    M, valid, pos = group_matrix(r, idx, G)  # (G, n_max)
    n = valid.sum(-1, keepdim=True)  # (G, 1)
    total = M.sum(-1, keepdim=True)  # padding is 0
    adv = M - (total - M) / (n - 1).clamp(min=1)
    hi = torch.where(valid, M, float("-inf")).amax(-1, keepdim=True)
    lo = torch.where(valid, M, float("inf")).amin(-1, keepdim=True)
    adv = torch.where((hi == lo) | (n < 2), torch.zeros_like(adv), adv)
    return adv[idx, pos]


def rloo_advantages(seq_rewards: Tensor, mask: Tensor, group_size: int | None = None, *,
                    segment_ids: Tensor | None = None,
                    group_ids: Tensor | None = None) -> Tensor:
    """RLOO: each response's baseline is the mean reward of the *other* N - 1 of its prompt.

    ``A_i = r_i - (sum_j r_j - r_i) / (N - 1) = N / (N - 1) * (r_i - mean(r))``, broadcast to
    the response tokens (:func:`rloo_baseline_advantages`).

    Args:
        seq_rewards: ``(S,)`` sequence rewards, ``S = P * group_size``, groups consecutive.
        mask: ``(B, T)``.
        group_size: N >= 2 (with one sample there is no one to leave out).
        segment_ids: packed rows.
        group_ids: ``(S,)`` group labels instead of ``group_size`` (groups of unequal size).

    Returns:
        ``(B, T)`` fp32; a group with equal rewards gets exactly 0.
    """
    adv = rloo_baseline_advantages(seq_rewards, group_size, group_ids=group_ids)  # (S,)
    return broadcast_to_tokens(adv, mask, segment_ids)


def reinforce_pp_advantages(token_rewards: Tensor, mask: Tensor, *, gamma: float = 1.0,
                            segment_ids: Tensor | None = None,
                            eps: float = 1e-8) -> tuple[Tensor, Tensor]:
    """REINFORCE++: token-level discounted returns, normalized over the whole batch.

    ``G_t = r_t + gamma * G_{t+1}`` (token rewards carry the KL penalty and the sequence
    reward on the last token), then ``A = (G - mean(G)) / sqrt(var(G) + eps)`` with mean and
    population variance over every valid token of the batch.

    Args:
        token_rewards: ``(B, T)``.
        mask: ``(B, T)``.
        gamma: discount.
        segment_ids: packed rows.
        eps: added to the variance.

    Returns:
        ``(advantages, returns)``, ``(B, T)`` fp32, 0 at masked positions.
    """
    returns = discounted_returns(token_rewards, mask, gamma=gamma, segment_ids=segment_ids)
    return whiten(returns, mask, eps=eps), returns


def reinforce_pp_baseline_advantages(seq_rewards: Tensor, mask: Tensor,
                                     group_size: int | None = None, *,
                                     kl: Tensor | None = None, kl_coef: float = 0.0,
                                     gamma: float = 1.0, segment_ids: Tensor | None = None,
                                     group_ids: Tensor | None = None,
                                     eps: float = 1e-8) -> tuple[Tensor, Tensor]:
    """REINFORCE++-baseline (Hu et al. 2025, "REINFORCE++", section 3.2): the group mean as the
    baseline, then REINFORCE++'s global normalization::

        r'_i = r_i - mean_{j in g(i)} r_j                (no std division)
        r_t  = -kl_coef * KL_t  (+ r'_i on the last token)
        G_t  = r_t + gamma * G_{t+1},   A = (G - mean(G)) / sqrt(var(G) + eps)   over the batch

    Args:
        seq_rewards: ``(S,)`` raw (clipped) sequence rewards.
        mask: ``(B, T)``.
        group_size: N (equal consecutive groups).
        kl: ``(B, T)`` per-token KL to fold into the rewards, or None.
        kl_coef: beta.
        gamma: discount.
        segment_ids: packed rows.
        group_ids: ``(S,)`` group labels instead of ``group_size`` (groups of unequal size).
        eps: added to the variance.

    Returns:
        ``(advantages, returns)``, ``(B, T)`` fp32, 0 at masked positions.
    """
    centered = normalize_rewards(seq_rewards, group_size, "group", scale_by_std=False,
                                 group_ids=group_ids)
    tok = token_level_rewards(centered, mask, kl=kl, kl_coef=kl_coef, segment_ids=segment_ids)
    return reinforce_pp_advantages(tok, mask, gamma=gamma, segment_ids=segment_ids, eps=eps)


__all__ = [
    "whiten", "gae_advantages", "discounted_returns", "grpo_advantages", "dr_grpo_advantages",
    "rloo_advantages", "rloo_baseline_advantages", "reinforce_pp_advantages",
    "reinforce_pp_baseline_advantages",
]
