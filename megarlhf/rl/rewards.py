"""Reward processing, in the order of methods.md 2.2.

1. raw sequence reward ``r`` (RM, verifier or a mix) — the input;
2. optional clipping to ``[-c, c]``: :func:`clip_rewards`;
3. normalization over the N responses of one prompt, or over the batch: :func:`normalize_rewards`;
4. asymmetric shrinking, ``r *= alpha`` where ``r < 0``: :func:`shrink_negative_rewards`;
5. KL to the reference folded into per-token rewards, or kept for the loss:
   :func:`rewards_with_kl`.

:func:`process_rewards` runs steps 2-4; :func:`rewards_with_kl` runs step 5 and places the
sequence reward on the last valid response token.

Layout: a batch of ``B = P * N`` sequence rewards where the N responses of a prompt are
consecutive (``r.view(P, N)``). Everything is computed in fp32 whatever the input dtype.

Choice of std: the *population* standard deviation (divide by N) by default, so that a
normalized group has exactly zero mean and unit variance (up to ``eps``) and N = 1 is defined;
``unbiased_std=True`` divides by N - 1 instead (what ``torch.std`` and several GRPO codebases
do; it scales advantages by ``sqrt((N - 1) / N)``). ``eps = 1e-6`` is added to the std, not to
the variance. A group (or batch) whose rewards are all equal normalizes to exactly 0 — never
NaN, never ``(r - mean) / eps`` round-off noise.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from megarlhf.rl._segments import last_token_index
from megarlhf.rl.kl import KLEstimator, kl_estimate

Normalization = Literal["group", "batch", "none"]
NORMALIZATIONS: tuple[str, ...] = ("group", "batch", "none")
KLMode = Literal["reward", "loss", "none"]
KL_MODES: tuple[str, ...] = ("reward", "loss", "none")


def clip_rewards(rewards: Tensor, clip: float | None) -> Tensor:
    """``clamp(r, -clip, clip)``; ``clip=None`` leaves ``r`` unchanged.

    Args:
        rewards: ``(B,)`` sequence rewards.
        clip: positive bound ``c`` or None.

    Returns:
        ``(B,)`` fp32.
    """
    r = rewards.float()
    if clip is None:
        return r
    if clip <= 0:
        raise ValueError(f"reward clip must be > 0 (or None to disable), got {clip}")
    return r.clamp(-clip, clip)


def _standardize_rows(x: Tensor, scale_by_std: bool, unbiased_std: bool, eps: float) -> Tensor:
    """Row-wise ``(x - mean) / (std + eps)`` (or ``x - mean``) of a ``(G, N)`` tensor."""
    mean = x.mean(dim=-1, keepdim=True)  # (G, 1)
    centered = x - mean
    if scale_by_std:
        n = x.shape[-1]
        ddof = 1 if (unbiased_std and n > 1) else 0
        std = (centered.square().sum(-1, keepdim=True) / (n - ddof)).sqrt()
        centered = centered / (std + eps)
    constant = (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)) == 0  # (G, 1)
    return torch.where(constant, torch.zeros_like(centered), centered)


def normalize_rewards(rewards: Tensor, group_size: int, mode: Normalization = "group", *,
                      scale_by_std: bool = True, unbiased_std: bool = False,
                      eps: float = 1e-6) -> Tensor:
    """Group (or batch) normalization, ``r_i = (r_i - mean(r)) / (std(r) + eps)``.

    Args:
        rewards: ``(B,)`` with ``B = P * group_size``, the N responses of a prompt consecutive.
        group_size: N, responses per prompt.
        mode: ``"group"``: mean/std over the N responses of each prompt; with N = 1 (where a
            group's std is 0) it normalizes over the whole batch instead, as methods.md 2.2
            asks. ``"batch"``: over all B rewards. ``"none"``: unchanged.
        scale_by_std: False only centers (``r - mean``): Dr.GRPO's "no std division".
        unbiased_std: divide the variance by N - 1 instead of N (see the module docstring).
        eps: added to the std.

    Returns:
        ``(B,)`` fp32. A group whose rewards are all equal gives exactly 0.
    """
    if mode not in NORMALIZATIONS:
        raise ValueError(f"reward normalization must be one of {NORMALIZATIONS}, got {mode!r}")
    r = rewards.float()
    if r.dim() != 1:
        raise ValueError(f"rewards must be 1-D (B,), got shape {tuple(r.shape)}")
    if group_size < 1 or r.numel() % group_size:
        raise ValueError(f"{r.numel()} rewards are not a whole number of groups of "
                         f"group_size={group_size}")
    if mode == "none" or r.numel() == 0:
        return r
    if mode == "group" and group_size > 1:
        return _standardize_rows(r.view(-1, group_size), scale_by_std, unbiased_std,
                                 eps).reshape(-1)  # (P, N) -> (B,)
    return _standardize_rows(r.view(1, -1), scale_by_std, unbiased_std, eps).reshape(-1)


def shrink_negative_rewards(rewards: Tensor, alpha: float) -> Tensor:
    """Asymmetric shrinking: ``r = alpha * r if r < 0 else r``.

    Args:
        rewards: ``(B,)``.
        alpha: factor in ``[0, 1]`` (1 disables it).

    Returns:
        ``(B,)`` fp32.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"negative-reward shrink alpha must be in [0, 1], got {alpha}")
    r = rewards.float()
    return torch.where(r < 0, alpha * r, r)


def process_rewards(rewards: Tensor, group_size: int, *, clip: float | None = None,
                    normalization: Normalization = "group", scale_by_std: bool = True,
                    unbiased_std: bool = False, eps: float = 1e-6,
                    shrink_alpha: float = 1.0) -> Tensor:
    """Steps 2-4 of methods.md 2.2: clip, then normalize, then shrink negatives.

    Args:
        rewards: ``(B,)`` raw sequence rewards, ``B = P * group_size``, groups consecutive.
        group_size: N responses per prompt.
        clip: clip bound ``c`` or None.
        normalization: ``"group"`` | ``"batch"`` | ``"none"`` (see :func:`normalize_rewards`).
        scale_by_std: divide by the std (False for Dr.GRPO).
        unbiased_std: N - 1 in the variance instead of N.
        eps: added to the std.
        shrink_alpha: multiplier of negative rewards after normalization (1 disables it).

    Returns:
        ``(B,)`` fp32 processed sequence rewards; for GRPO these are the advantages
        (see :func:`megarlhf.rl.advantages.grpo_advantages`).
    """
    r = clip_rewards(rewards, clip)
    r = normalize_rewards(r, group_size, normalization, scale_by_std=scale_by_std,
                          unbiased_std=unbiased_std, eps=eps)
    return shrink_negative_rewards(r, shrink_alpha)


def token_level_rewards(seq_rewards: Tensor, mask: Tensor, *, kl: Tensor | None = None,
                        kl_coef: float = 0.0, segment_ids: Tensor | None = None) -> Tensor:
    """Per-token rewards: ``r_t = -kl_coef * KL_t``, plus the sequence reward on its last
    valid token.

    Args:
        seq_rewards: ``(S,)`` processed sequence rewards.
        mask: ``(B, T)`` response-token mask.
        kl: ``(B, T)`` per-token KL estimate, or None for no penalty.
        kl_coef: beta.
        segment_ids: ``(B, T)`` sequence index per token for packed rows (see
            :mod:`megarlhf.rl._segments`); None when row b is sequence b.

    Returns:
        ``(B, T)`` fp32, 0 at masked positions. A sequence without valid tokens gets nothing.
    """
    m = mask.bool()
    B, T = m.shape
    out = torch.zeros(B, T, dtype=torch.float32, device=m.device)
    if kl is not None and kl_coef != 0.0:
        out = torch.where(m, -kl_coef * kl.float(), out)
    last = last_token_index(m, segment_ids, seq_rewards.shape[0])  # (S,)
    has = last >= 0
    flat = out.reshape(-1).clone()
    flat.index_add_(0, last[has], seq_rewards.float()[has])
    return flat.view(B, T)


def rewards_with_kl(seq_rewards: Tensor, mask: Tensor, logp: Tensor, logp_ref: Tensor, *,
                    kl_mode: KLMode = "reward", kl_coef: float = 0.0,
                    estimator: KLEstimator = "k1", kl_clamp: float | None = None,
                    segment_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Step 5 of methods.md 2.2: per-token rewards with the KL penalty in the reward or not.

    Args:
        seq_rewards: ``(S,)`` output of :func:`process_rewards`.
        mask: ``(B, T)`` response-token mask.
        logp: ``(B, T)`` log-probs of the sampled tokens under the rollout policy.
        logp_ref: ``(B, T)`` log-probs under the reference.
        kl_mode: ``"reward"``: ``r_t -= kl_coef * KL_t``; ``"loss"``: rewards carry no KL (the
            learner adds ``kl_coef * kl_loss(...)`` on the *current* policy's log-probs);
            ``"none"``: no KL anywhere.
        kl_coef: beta.
        estimator: ``"k1"`` | ``"k2"`` | ``"k3"`` (see :mod:`megarlhf.rl.kl`).
        kl_clamp: optional bound on the log ratio.
        segment_ids: packed rows, see :func:`token_level_rewards`.

    Returns:
        ``(token_rewards, kl)``, both ``(B, T)`` fp32 and 0 at masked positions; ``kl`` is
        returned in every mode for logging ("KL to the reference").
    """
    if kl_mode not in KL_MODES:
        raise ValueError(f"kl_mode must be one of {KL_MODES}, got {kl_mode!r}")
    m = mask.bool()
    kl = torch.where(m, kl_estimate(logp, logp_ref, estimator, clamp=kl_clamp), 0.0)
    token_rewards = token_level_rewards(
        seq_rewards, m, kl=kl if kl_mode == "reward" else None, kl_coef=kl_coef,
        segment_ids=segment_ids)
    return token_rewards, kl


__all__ = [
    "NORMALIZATIONS", "KL_MODES", "clip_rewards", "normalize_rewards", "shrink_negative_rewards",
    "process_rewards", "token_level_rewards", "rewards_with_kl",
]
