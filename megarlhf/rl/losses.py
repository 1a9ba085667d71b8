"""Policy, value, entropy, KL and DPO losses, truncated importance weights, and the one
aggregation function every token loss goes through (methods.md 2.4 and 3).

Token losses take ``(B, T)`` tensors and a response ``mask`` (padded rows, or packed rows with
``segment_ids``, see :mod:`megarlhf.rl._segments`), compute per-token terms in fp32, and reduce
them with :func:`aggregate`. They return ``(loss, metrics)``: ``loss`` a 0-dim fp32 tensor with
the graph, ``metrics`` a dict of detached 0-dim fp32 tensors, each a mean over the *local*
valid tokens (or pairs) plus ``num_tokens``/``num_pairs`` so a logger can weight them.

Masked positions never produce NaN or gradient: their inputs are replaced by neutral values
*before* any exp/log, so an all-masked micro-batch gives loss 0 and zero gradients.

The aggregation contract (the training engine relies on it)
------------------------------------------------------------
A step's global batch is split into micro-batches spread over data-parallel ranks. Let
``N = sum over all micro-batches and ranks of aggregate_normalizer(mask_i, mode)`` — computed
once by the driver (an all-reduce of local counts). Then::

    sum_i aggregate(values_i, mask_i, mode, normalizer=N) == aggregate(values, mask, mode)

where the right side is the aggregate over the whole global batch in one piece. Each call
returns ``(its share of the numerator) / N``, so per-micro-batch losses (and their gradients)
*add up* to the exact global aggregate, whatever the micro-batch sizes or lengths. The engine
must therefore sum micro-batch losses and sum gradients over DP ranks, not average them: with
megatron's defaults (loss divided by the number of micro-batches, gradients averaged over DP)
multiply back by ``num_microbatches * dp``. For the ``seq_*`` modes a sequence must not be
split across micro-batches. With ``normalizer=None`` the call normalizes locally (exact when
the micro-batch is the whole batch).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from megarlhf.rl._segments import per_sequence_sum
from megarlhf.rl.kl import KLEstimator, kl_estimate

AggMode = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
                  "seq_mean_token_sum_norm"]
AGG_MODES: tuple[str, ...] = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
                              "seq_mean_token_sum_norm")
Metrics = dict[str, Tensor]


def _check_mode(mode: str) -> None:
    if mode not in AGG_MODES:
        raise ValueError(f"aggregation mode must be one of {AGG_MODES}, got {mode!r}")


def aggregate_normalizer(mask: Tensor, mode: AggMode = "token_mean", *,
                         segment_ids: Tensor | None = None) -> Tensor:
    """The local count :func:`aggregate` divides by; sum it over micro-batches and ranks.

    Args:
        mask: ``(B, T)`` valid tokens.
        mode: aggregation mode.
        segment_ids: packed rows.

    Returns:
        0-dim int64: the number of valid tokens (``token_mean``) or of sequences with at least
        one valid token (``seq_*`` modes; empty sequences never count).
    """
    _check_mode(mode)
    m = mask.bool()
    if mode == "token_mean":
        return m.sum()
    _, counts = per_sequence_sum(m.float(), m, segment_ids)
    return (counts > 0).sum()


def aggregate(values: Tensor, mask: Tensor, mode: AggMode = "token_mean",
              normalizer: Tensor | float | None = None, *,
              segment_ids: Tensor | None = None,
              length_constant: float | None = None) -> Tensor:
    """Reduces per-token values to the scalar loss; the one aggregation of every token loss.

    With ``n_s`` the valid tokens of sequence s, ``v_{s,t}`` its values and ``S`` the
    sequences with ``n_s > 0``:

    * ``token_mean``:              ``sum_{s,t} v_{s,t} / sum_s n_s``
    * ``seq_mean_token_mean``:     ``sum_s (sum_t v_{s,t} / n_s) / S``
    * ``seq_mean_token_sum``:      ``sum_s (sum_t v_{s,t}) / S``
    * ``seq_mean_token_sum_norm``: ``sum_s (sum_t v_{s,t} / L) / S`` with the constant
      ``L = length_constant`` (Dr.GRPO: e.g. the maximum response length)

    Args:
        values: ``(B, T)`` per-token values (any float dtype; reduced in fp32).
        mask: ``(B, T)`` valid tokens; masked values (even NaN/inf) are ignored.
        mode: one of :data:`AGG_MODES`.
        normalizer: the *global* denominator (``sum_s n_s`` or ``S`` over every micro-batch
            and data-parallel rank, see :func:`aggregate_normalizer` and the module
            docstring): the result is then ``local numerator / normalizer`` and the results of
            all micro-batches and ranks *sum* to the global aggregate. None: the local count.
            Values below 1 are treated as 1 (an all-masked batch gives 0, not NaN).
        segment_ids: packed rows (sequence index per token).
        length_constant: ``L`` for ``seq_mean_token_sum_norm`` (required there; a constant of
            the run, not of the batch, or micro-batches would disagree).

    Returns:
        0-dim fp32 tensor, differentiable in ``values``.
    """
    _check_mode(mode)
    m = mask.bool()
    v = torch.where(m, values.float(), 0.0)  # (B, T); blocks NaN/inf at masked positions
    if mode == "token_mean":
        numerator = v.sum()
        count = m.sum()
    else:
        sums, counts = per_sequence_sum(v, m, segment_ids)  # (S,), (S,)
        if mode == "seq_mean_token_mean":
            per_seq = sums / counts.clamp(min=1.0)
        elif mode == "seq_mean_token_sum":
            per_seq = sums
        else:
            if length_constant is None or length_constant <= 0:
                raise ValueError("aggregation mode 'seq_mean_token_sum_norm' needs a positive "
                                 "length_constant (e.g. the maximum response length)")
            per_seq = sums / float(length_constant)
        numerator = per_seq.sum()
        count = (counts > 0).sum()
    denom = count if normalizer is None else normalizer
    denom = torch.as_tensor(denom, dtype=torch.float32, device=v.device).clamp(min=1.0)
    return numerator / denom


def _masked_mean(x: Tensor, m: Tensor) -> Tensor:
    """Detached fp32 mean of ``x`` over ``m`` (0 if empty) — for metrics."""
    x = torch.where(m, x.detach().float(), 0.0)
    return x.sum() / m.sum().clamp(min=1)


def policy_loss(logp: Tensor, logp_old: Tensor, advantages: Tensor, mask: Tensor, *,
                eps_low: float = 0.2, eps_high: float | None = None,
                dual_clip: float | None = None, is_weights: Tensor | None = None,
                log_ratio_clamp: float = 20.0, agg_mode: AggMode = "token_mean",
                normalizer: Tensor | float | None = None, segment_ids: Tensor | None = None,
                length_constant: float | None = None) -> tuple[Tensor, Metrics]:
    """PPO clipped surrogate with asymmetric clip range and optional dual clip.

    Per token, with ``rho = exp(logp - logp_old)``::

        l_t = -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A)
        dual clip (A < 0 only):  l_t = min(l_t, -c * A)      (caps the loss at c * |A|)
        l_t *= w_t                                          (truncated IS weights, if given)

    then ``aggregate(l, mask, agg_mode, normalizer)``. Off-policy, ``logp_old`` is the
    behaviour policy's log-probs (recorded by the generator), see methods.md 3.

    Args:
        logp: ``(B, T)`` current policy log-probs of the sampled tokens (with grad).
        logp_old: ``(B, T)`` log-probs under the policy that sampled / the proximal policy.
        advantages: ``(B, T)``.
        mask: ``(B, T)``.
        eps_low: lower clip, ``rho >= 1 - eps_low``.
        eps_high: upper clip, ``rho <= 1 + eps_high``; defaults to ``eps_low``.
        dual_clip: ``c > 1`` enables dual clip; None disables it.
        is_weights: ``(B, T)`` per-token weights (e.g. :func:`truncated_is_weights`), detached.
        log_ratio_clamp: ``|logp - logp_old|`` is clamped to this before ``exp`` so that an
            extreme ratio cannot overflow into inf/NaN gradients.
        agg_mode, normalizer, segment_ids, length_constant: see :func:`aggregate`.

    Returns:
        ``(loss, metrics)`` with metrics ``clip_frac`` (tokens where the clipped term is the
        active one), ``clip_frac_low``/``clip_frac_high``, ``dual_clip_frac``, ``approx_kl``
        (``KL(old || new)`` by the k3 estimator, ``(rho - 1) - log rho``), ``ratio_mean``,
        ``ratio_max``, ``num_tokens``.
    """
    eps_high = eps_low if eps_high is None else eps_high
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"clip ranges must be >= 0, got eps_low={eps_low}, eps_high={eps_high}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")
    m = mask.bool()
    log_ratio = torch.where(m, logp.float() - logp_old.float(), 0.0)  # (B, T)
    log_ratio = log_ratio.clamp(-log_ratio_clamp, log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    adv = torch.where(m, advantages.float(), 0.0)
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    per_token = torch.maximum(loss_unclipped, loss_clipped)
    clipped = loss_clipped > loss_unclipped
    dual_active = torch.zeros_like(m)
    if dual_clip is not None:
        cap = -dual_clip * adv
        dual_active = (adv < 0) & (cap < per_token)
        per_token = torch.where(dual_active, cap, per_token)
    if is_weights is not None:
        per_token = per_token * is_weights.detach().float()
    loss = aggregate(per_token, m, agg_mode, normalizer, segment_ids=segment_ids,
                     length_constant=length_constant)
    with torch.no_grad():
        metrics = {
            "clip_frac": _masked_mean(clipped.float(), m),
            "clip_frac_low": _masked_mean((clipped & (adv < 0)).float(), m),
            "clip_frac_high": _masked_mean((clipped & (adv > 0)).float(), m),
            "dual_clip_frac": _masked_mean(dual_active.float(), m),
            "approx_kl": _masked_mean(torch.expm1(log_ratio) - log_ratio, m),
            "ratio_mean": _masked_mean(ratio, m),
            "ratio_max": torch.where(m, ratio, 0.0).max() if m.any() else ratio.new_zeros(()),
            "num_tokens": m.sum().float(),
        }
    return loss, metrics


def value_loss(values: Tensor, values_old: Tensor, returns: Tensor, mask: Tensor, *,
               clip_eps: float | None = 0.2, agg_mode: AggMode = "token_mean",
               normalizer: Tensor | float | None = None, segment_ids: Tensor | None = None,
               length_constant: float | None = None) -> tuple[Tensor, Metrics]:
    """Clipped value loss (methods.md 2.4)::

        l_t = max((V - R)^2, (clip(V, V_old - eps_v, V_old + eps_v) - R)^2)

    (no factor 1/2; scale by the value-loss coefficient). ``clip_eps=None`` gives ``(V - R)^2``.

    Args:
        values: ``(B, T)`` current critic values (with grad).
        values_old: ``(B, T)`` values at rollout time.
        returns: ``(B, T)`` targets (e.g. from :func:`~megarlhf.rl.advantages.gae_advantages`).
        mask: ``(B, T)``.
        clip_eps: ``eps_v`` or None.
        agg_mode, normalizer, segment_ids, length_constant: see :func:`aggregate`.

    Returns:
        ``(loss, metrics)``: ``value_clip_frac`` (tokens where the clipped term is larger, so
        no gradient flows), ``value_mean``, ``value_error`` (mean (V - R)^2), ``num_tokens``.
    """
    m = mask.bool()
    v = torch.where(m, values.float(), 0.0)
    v_old = torch.where(m, values_old.float(), 0.0)
    ret = torch.where(m, returns.float(), 0.0)
    unclipped = (v - ret).square()
    if clip_eps is None:
        per_token = unclipped
        clipped = torch.zeros_like(m)
    else:
        v_clip = v_old + (v - v_old).clamp(-clip_eps, clip_eps)
        clipped_loss = (v_clip - ret).square()
        per_token = torch.maximum(unclipped, clipped_loss)
        clipped = clipped_loss > unclipped
    loss = aggregate(per_token, m, agg_mode, normalizer, segment_ids=segment_ids,
                     length_constant=length_constant)
    with torch.no_grad():
        metrics = {
            "value_clip_frac": _masked_mean(clipped.float(), m),
            "value_mean": _masked_mean(v, m),
            "value_error": _masked_mean(unclipped, m),
            "num_tokens": m.sum().float(),
        }
    return loss, metrics


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """``1 - Var(R - V) / Var(R)`` over the valid tokens (population variances).

    Returns:
        0-dim fp32, detached; 0 when ``Var(R) = 0`` (undefined) or nothing is valid.
    """
    m = mask.bool()
    if not bool(m.any()):
        return torch.zeros((), dtype=torch.float32, device=m.device)
    r = returns.detach().float()[m]
    d = r - values.detach().float()[m]
    var_r = r.var(unbiased=False)
    if float(var_r) == 0.0:
        return torch.zeros((), dtype=torch.float32, device=m.device)
    return 1.0 - d.var(unbiased=False) / var_r


def entropy_loss(entropy: Tensor, mask: Tensor, *, agg_mode: AggMode = "token_mean",
                 normalizer: Tensor | float | None = None, segment_ids: Tensor | None = None,
                 length_constant: float | None = None) -> Tensor:
    """``-aggregate(H)``: add ``coef * entropy_loss(...)`` to the loss for an entropy bonus.

    Args:
        entropy: ``(B, T)`` per-token entropy of the policy (with grad).
        mask, agg_mode, normalizer, segment_ids, length_constant: see :func:`aggregate`.

    Returns:
        0-dim fp32.
    """
    return -aggregate(entropy, mask, agg_mode, normalizer, segment_ids=segment_ids,
                      length_constant=length_constant)


def kl_loss(logp: Tensor, logp_ref: Tensor, mask: Tensor, *, estimator: KLEstimator = "k3",
            clamp: float | None = None, agg_mode: AggMode = "token_mean",
            normalizer: Tensor | float | None = None, segment_ids: Tensor | None = None,
            length_constant: float | None = None) -> Tensor:
    """KL to the reference as a loss term (methods.md 2.2 step 5, "in the loss")::

        aggregate(k(logp - logp_ref), mask)     with k one of k1, k2, k3

    Scale by beta. Masked positions are neutralized before the estimator (no inf/NaN).

    Args:
        logp: ``(B, T)`` current policy log-probs (with grad).
        logp_ref: ``(B, T)`` reference log-probs.
        mask: ``(B, T)``.
        estimator: ``"k1"`` | ``"k2"`` | ``"k3"``.
        clamp: optional bound on the log ratio.
        agg_mode, normalizer, segment_ids, length_constant: see :func:`aggregate`.

    Returns:
        0-dim fp32.
    """
    m = mask.bool()
    lp = torch.where(m, logp.float(), 0.0)
    lr = torch.where(m, logp_ref.float(), 0.0)
    return aggregate(kl_estimate(lp, lr, estimator, clamp=clamp), m, agg_mode, normalizer,
                     segment_ids=segment_ids, length_constant=length_constant)


def truncated_is_weights(logp_learner: Tensor, logp_behaviour: Tensor, mask: Tensor, *,
                         cap: float = 2.0) -> tuple[Tensor, Metrics]:
    """Truncated importance-sampling weights between the generator and the learner::

        w_t = min(pi_learner(y_t) / pi_behaviour(y_t), cap)     (detached)

    The correction for off-policy data of methods.md 3 when the generator's log-probs differ
    from the learner's (staleness, or numerics of the rollout engine). Multiply per-token
    losses by ``w`` (``policy_loss(..., is_weights=w)``).

    Args:
        logp_learner: ``(B, T)`` learner log-probs of the sampled tokens (e.g. recomputed
            old-policy log-probs).
        logp_behaviour: ``(B, T)`` log-probs recorded by the generator.
        mask: ``(B, T)``.
        cap: truncation ``C > 0``.

    Returns:
        ``(weights, metrics)``: weights ``(B, T)`` fp32, detached, 0 at masked positions;
        metrics ``is_weight_mean`` (after truncation), ``is_truncated_frac``.
    """
    if cap <= 0:
        raise ValueError(f"importance-weight cap must be > 0, got {cap}")
    m = mask.bool()
    with torch.no_grad():
        log_w = torch.where(m, logp_learner.float() - logp_behaviour.float(), 0.0)
        truncated = log_w > math.log(cap)
        w = torch.exp(log_w.clamp(max=math.log(cap)))
        w = torch.where(m, w, 0.0)
        metrics = {"is_weight_mean": _masked_mean(w, m),
                   "is_truncated_frac": _masked_mean(truncated.float(), m)}
    return w, metrics


def sequence_logprobs(token_logp: Tensor, mask: Tensor, *, segment_ids: Tensor | None = None,
                      num_sequences: int | None = None) -> Tensor:
    """``log pi(y | x) = sum_t log pi(y_t | ...)`` over the valid tokens of each sequence.

    Args:
        token_logp: ``(B, T)``.
        mask: ``(B, T)``.
        segment_ids: packed rows.
        num_sequences: S for packed rows (inferred otherwise).

    Returns:
        ``(S,)`` fp32, differentiable.
    """
    m = mask.bool()
    sums, _ = per_sequence_sum(torch.where(m, token_logp.float(), 0.0), m, segment_ids,
                               num_sequences)
    return sums


def dpo_loss(policy_chosen_logp: Tensor, policy_rejected_logp: Tensor,
             ref_chosen_logp: Tensor, ref_rejected_logp: Tensor, *, beta: float = 0.1,
             normalizer: Tensor | float | None = None) -> tuple[Tensor, Metrics]:
    """DPO loss against the reference (online DPO, methods.md 3)::

        z = beta * [(logp(y_w) - logp_ref(y_w)) - (logp(y_l) - logp_ref(y_l))]
        L = -log sigmoid(z), averaged over pairs

    Args:
        policy_chosen_logp: ``(P,)`` sequence log-probs of the preferred responses under the
            policy (with grad), e.g. :func:`sequence_logprobs`.
        policy_rejected_logp: ``(P,)`` same for the dispreferred responses.
        ref_chosen_logp: ``(P,)`` under the reference.
        ref_rejected_logp: ``(P,)``.
        beta: inverse temperature of the implicit reward.
        normalizer: global number of pairs (sum over micro-batches and ranks) — the results
            then add up like :func:`aggregate`'s; None: the local count.

    Returns:
        ``(loss, metrics)``: ``reward_accuracy`` (chosen implicit reward > rejected),
        ``reward_margin``, ``chosen_reward``, ``rejected_reward`` (means of
        ``beta * (logp - logp_ref)``), ``num_pairs``.
    """
    chosen = beta * (policy_chosen_logp.float() - ref_chosen_logp.float())  # (P,)
    rejected = beta * (policy_rejected_logp.float() - ref_rejected_logp.float())
    losses = -F.logsigmoid(chosen - rejected)
    n = chosen.numel()
    denom = torch.as_tensor(n if normalizer is None else normalizer, dtype=torch.float32,
                            device=chosen.device).clamp(min=1.0)
    loss = losses.sum() / denom
    with torch.no_grad():
        k = max(n, 1)
        metrics = {
            "reward_accuracy": (chosen > rejected).float().sum() / k,
            "reward_margin": (chosen - rejected).sum() / k,
            "chosen_reward": chosen.sum() / k,
            "rejected_reward": rejected.sum() / k,
            "num_pairs": torch.tensor(float(n)),
        }
    return loss, metrics


def select_dpo_pairs(seq_rewards: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Online DPO pairs: the best and the worst response of each prompt by reward.

    Args:
        seq_rewards: ``(S,)`` rewards, ``S = P * group_size``, groups consecutive.
        group_size: N >= 2.

    Returns:
        ``(chosen, rejected, valid)``, each ``(P,)``: global indices into the S responses of
        the highest- and lowest-rewarded response (first one on ties) and whether the pair
        carries a preference (``max > min``; a group with equal rewards gives none — drop it).
    """
    if group_size < 2:
        raise ValueError(f"DPO pairs need group_size >= 2 responses per prompt, got {group_size}")
    r = seq_rewards.float()
    if r.numel() % group_size:
        raise ValueError(f"{r.numel()} rewards are not a whole number of groups of "
                         f"group_size={group_size}")
    g = r.view(-1, group_size)  # (P, N)
    offset = torch.arange(g.shape[0], device=r.device) * group_size
    best = g.argmax(-1) + offset
    worst = g.argmin(-1) + offset
    valid = g.amax(-1) > g.amin(-1)
    return best, worst, valid


__all__ = [
    "AGG_MODES", "aggregate", "aggregate_normalizer", "policy_loss", "value_loss",
    "explained_variance", "entropy_loss", "kl_loss", "truncated_is_weights",
    "sequence_logprobs", "dpo_loss", "select_dpo_pairs",
]
