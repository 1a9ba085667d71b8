"""Reward processing, in the order of methods.md 2.2.

1. raw sequence reward ``r`` (RM, verifier or a mix) — the input;
2. optional clipping to ``[-c, c]``: :func:`clip_rewards`;
3. normalization over the N responses of one prompt, or over the batch: :func:`normalize_rewards`;
4. asymmetric shrinking, ``r *= alpha`` where ``r < 0``: :func:`shrink_negative_rewards`;
5. KL to the reference folded into per-token rewards, or kept for the loss:
   :func:`rewards_with_kl`.

Before step 2 the raw reward may be shaped by length (DAPO's soft overlong punishment,
:func:`overlong_penalty`); :func:`informative_groups` is DAPO's dynamic-sampling filter.

:func:`process_rewards` runs steps 2-4; :func:`rewards_with_kl` runs step 5 and places the
sequence reward on the last valid response token.

Layout: a batch of ``B = P * N`` sequence rewards where the N responses of a prompt are
consecutive (``r.view(P, N)``), or any layout with a group label per reward (``group_ids``:
groups of unequal size, see :mod:`megarlhf.rl._groups`). Everything is computed in fp32
whatever the input dtype.

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

from megarlhf.rl._groups import group_index, group_matrix
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


def _standardize_groups(M: Tensor, valid: Tensor, scale_by_std: bool, unbiased_std: bool,
                        eps: float) -> Tensor:
    """Row-wise ``(x - mean) / (std + eps)`` (or ``x - mean``) over the valid slots of a
    ``(G, n)`` group matrix; 0 at padding and in rows whose valid values are all equal."""
    n = valid.sum(-1, keepdim=True)  # (G, 1)
    x = torch.where(valid, M, 0.0)
    mean = x.sum(-1, keepdim=True) / n.clamp(min=1)  # (G, 1)
    centered = torch.where(valid, M - mean, 0.0)
    if scale_by_std:
        ddof = ((n > 1) & unbiased_std).to(M.dtype)
        std = (centered.square().sum(-1, keepdim=True) / (n - ddof).clamp(min=1)).sqrt()
        centered = centered / (std + eps)
    hi = torch.where(valid, M, float("-inf")).amax(-1, keepdim=True)
    lo = torch.where(valid, M, float("inf")).amin(-1, keepdim=True)
    constant = hi == lo  # (G, 1): a group of one, or all rewards equal
    return torch.where(constant | ~valid, torch.zeros_like(centered), centered)


def normalize_rewards(rewards: Tensor, group_size: int | None = None,
                      mode: Normalization = "group", *, scale_by_std: bool = True,
                      unbiased_std: bool = False, eps: float = 1e-6,
                      group_ids: Tensor | None = None) -> Tensor:
    """Group (or batch) normalization, ``r_i = (r_i - mean(r)) / (std(r) + eps)``.

    Args:
        rewards: ``(B,)`` rewards; with ``group_size`` ``B = P * group_size``, the N responses
            of a prompt consecutive.
        group_size: N, responses per prompt (equal groups).
        mode: ``"group"``: mean/std over the responses of each prompt; when every group has
            one response (N = 1, where a group's std is 0) it normalizes over the whole batch
            instead, as methods.md 2.2 asks. ``"batch"``: over all B rewards. ``"none"``:
            unchanged.
        scale_by_std: False only centers (``r - mean``): Dr.GRPO's "no std division".
        unbiased_std: divide the variance by n - 1 instead of n (n the group's size; see the
            module docstring).
        eps: added to the std.
        group_ids: ``(B,)`` group label of each reward instead of ``group_size``: groups of
            unequal size, in any order (:mod:`megarlhf.rl._groups`). A group of one response
            (among larger ones) has no one to compare with and gets 0.

    Returns:
        ``(B,)`` fp32. A group whose rewards are all equal gives exactly 0.
    """
    if mode not in NORMALIZATIONS:
        raise ValueError(f"reward normalization must be one of {NORMALIZATIONS}, got {mode!r}")
    r = rewards.float()
    if r.dim() != 1:
        raise ValueError(f"rewards must be 1-D (B,), got shape {tuple(r.shape)}")
    idx, G = group_index(r.numel(), group_size, group_ids, device=r.device)
    if mode == "none" or r.numel() == 0:
        return r
    if mode == "group" and G < r.numel():  # some group has two or more responses
        M, valid, pos = group_matrix(r, idx, G)  # (G, n_max)
        return _standardize_groups(M, valid, scale_by_std, unbiased_std, eps)[idx, pos]
    full = torch.ones(1, r.numel(), dtype=torch.bool, device=r.device)
    return _standardize_groups(r.view(1, -1), full, scale_by_std, unbiased_std,
                               eps).reshape(-1)


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


def process_rewards(rewards: Tensor, group_size: int | None = None, *,
                    clip: float | None = None, normalization: Normalization = "group",
                    scale_by_std: bool = True, unbiased_std: bool = False, eps: float = 1e-6,
                    shrink_alpha: float = 1.0, group_ids: Tensor | None = None) -> Tensor:
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
        group_ids: ``(B,)`` group labels instead of ``group_size`` (unequal groups).

    Returns:
        ``(B,)`` fp32 processed sequence rewards; for GRPO these are the advantages
        (see :func:`megarlhf.rl.advantages.grpo_advantages`).
    """
    r = clip_rewards(rewards, clip)
    r = normalize_rewards(r, group_size, normalization, scale_by_std=scale_by_std,
                          unbiased_std=unbiased_std, eps=eps, group_ids=group_ids)
    return shrink_negative_rewards(r, shrink_alpha)


def overlong_penalty(lengths: Tensor, max_len: int, buffer: int, *,
                     factor: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), added to the raw reward::

        R_len(y) = 0                                  |y| <= L_max - L_buf
                 = ((L_max - L_buf) - |y|) / L_buf    L_max - L_buf < |y| <= L_max
                 = -1                                 |y| > L_max

    times ``factor``: a linear ramp from 0 to ``-factor`` over the last ``L_buf`` tokens of the
    length budget, so a response that runs into the limit (truncated: ``|y| = L_max``) gets the
    full ``-factor`` and one that ends just inside the buffer a little.

    Args:
        lengths: ``(B,)`` response lengths in tokens.
        max_len: ``L_max``, the generation budget (``rollout.max_new_tokens``).
        buffer: ``L_buf`` in ``[1, L_max]``.
        factor: the penalty at ``|y| >= L_max`` (>= 0).

    Returns:
        ``(B,)`` fp32, in ``[-factor, 0]``.
    """
    if not 1 <= buffer <= max_len:
        raise ValueError(f"overlong buffer must be in [1, max_len={max_len}], got {buffer}")
    if factor < 0:
        raise ValueError(f"overlong penalty factor must be >= 0, got {factor}")
    excess = (lengths.float() - (max_len - buffer)).clamp(min=0.0)  # tokens into the buffer
    return -factor * (excess / buffer).clamp(max=1.0)


def informative_groups(rewards: Tensor, group_size: int | None = None, *,
                       group_ids: Tensor | None = None) -> Tensor:
    """DAPO's dynamic-sampling filter: which prompts' responses did not all get the same reward.

    A group whose rewards are all equal has zero advantage under every group-relative
    estimator (GRPO, Dr.GRPO, RLOO, REINFORCE++-baseline) and gives no policy gradient.

    Args:
        rewards: ``(B,)`` rewards, grouped as :func:`normalize_rewards`.
        group_size, group_ids: the groups (:mod:`megarlhf.rl._groups`).

    Returns:
        ``(B,)`` bool: True on every response of a group with two or more distinct rewards.
    """
    r = rewards.float()
    idx, G = group_index(r.numel(), group_size, group_ids, device=r.device)
    if r.numel() == 0:
        return torch.zeros(0, dtype=torch.bool, device=r.device)
    hi = torch.full((G,), float("-inf"), device=r.device).scatter_reduce(0, idx, r, "amax")
    lo = torch.full((G,), float("inf"), device=r.device).scatter_reduce(0, idx, r, "amin")
    return (hi > lo)[idx]


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
    "process_rewards", "token_level_rewards", "rewards_with_kl", "overlong_penalty",
    "informative_groups",
]
