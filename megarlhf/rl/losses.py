"""Policy, value, entropy, KL and DPO losses, off-policy importance weights, and the one
aggregation function every token loss goes through (methods.md 2.4 and 3; docs/methods.md).

Policy losses: PPO's clipped surrogate (:func:`policy_loss`), GSPO and GSPO-token
(:func:`gspo_loss`), CISPO (:func:`cispo_loss`). Off-policy weights: token TIS
(:func:`truncated_is_weights`) and the family of :func:`off_policy_weights` (token / sequence
truncated IS, token / sequence masked IS, IcePop).

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

from megarlhf.rl._groups import group_index, group_matrix
from megarlhf.rl._segments import broadcast_to_tokens, per_sequence_sum
from megarlhf.rl.kl import KLEstimator, kl_estimate

AggMode = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
                  "seq_mean_token_sum_norm", "token_sum"]
AGG_MODES: tuple[str, ...] = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
                              "seq_mean_token_sum_norm", "token_sum")
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
        one valid token (``seq_*`` modes; empty sequences never count); 1 for ``token_sum``
        (no denominator: :func:`aggregate` ignores the normalizer there).
    """
    _check_mode(mode)
    m = mask.bool()
    if mode == "token_sum":
        return torch.ones((), dtype=torch.long, device=m.device)
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
    * ``token_sum``:               ``sum_{s,t} v_{s,t}`` (no denominator: the loss grows with
      the batch; the learning rate absorbs the scale. ``normalizer`` is ignored, and the
      micro-batch results add up to the global sum as they are)

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
    if mode == "token_sum":
        return v.sum()
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
    _check_clip(eps_low, eps_high, dual_clip)
    m = mask.bool()
    log_ratio = torch.where(m, logp.float() - logp_old.float(), 0.0)  # (B, T)
    log_ratio = log_ratio.clamp(-log_ratio_clamp, log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    adv = torch.where(m, advantages.float(), 0.0)
    per_token, clipped, dual_active = _ppo_clip_terms(ratio, adv, eps_low, eps_high, dual_clip)
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


def _ppo_clip_terms(ratio: Tensor, adv: Tensor, eps_low: float, eps_high: float,
                    dual_clip: float | None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token ``max(-A rho, -A clip(rho))`` (+ dual clip); the clipped and dual-clip masks."""
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    per_token = torch.maximum(loss_unclipped, loss_clipped)
    clipped = loss_clipped > loss_unclipped
    dual_active = torch.zeros_like(clipped)
    if dual_clip is not None:
        cap = -dual_clip * adv
        dual_active = (adv < 0) & (cap < per_token)
        per_token = torch.where(dual_active, cap, per_token)
    return per_token, clipped, dual_active


def _check_clip(eps_low: float, eps_high: float, dual_clip: float | None) -> None:
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"clip ranges must be >= 0, got eps_low={eps_low}, eps_high={eps_high}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")


def gspo_loss(logp: Tensor, logp_old: Tensor, advantages: Tensor, mask: Tensor, *,
              eps_low: float = 3e-4, eps_high: float = 4e-4, token_level: bool = False,
              dual_clip: float | None = None, is_weights: Tensor | None = None,
              log_ratio_clamp: float = 20.0, agg_mode: AggMode = "seq_mean_token_mean",
              normalizer: Tensor | float | None = None, segment_ids: Tensor | None = None,
              length_constant: float | None = None) -> tuple[Tensor, Metrics]:
    """GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization"): the importance ratio and
    its clipping at the level of whole sequences.

    The length-normalized sequence ratio of response i (|y_i| its valid tokens)::

        s_i = (pi(y_i | x) / pi_old(y_i | x)) ^ (1 / |y_i|) = exp(mean_t (logp - logp_old))

    * GSPO (``token_level=False``): ``l_i = -min(s_i A_i, clip(s_i, 1 - eps_low,
      1 + eps_high) A_i)`` with the sequence advantage ``A_i`` = the mean of the response's
      token advantages (GRPO's advantage itself). ``l_i`` is placed on every token of the
      response, so ``agg_mode="seq_mean_token_mean"`` gives the paper's ``1/G sum_i l_i``
      exactly (a token-level mode would weight responses by length).
    * GSPO-token (``token_level=True``): per token ``s_{i,t} = sg(s_i) * pi(y_t) / sg(pi(y_t))``
      (value ``s_i``, gradient ``s_i grad log pi(y_t)``) with the token advantage ``A_{i,t}``:
      the clipped surrogate per token, then any aggregation. With ``A_{i,t} = A_i`` it equals
      GSPO in value and gradient; it lets per-token advantages (KL in the reward, GAE) through.

    Clip ranges are those of a sequence ratio: the paper used ``eps_low = 3e-4``,
    ``eps_high = 4e-4``. Optional dual clip and per-token weights ``w`` (off-policy correction)
    apply as in :func:`policy_loss`.

    Args:
        logp: ``(B, T)`` current log-probs (with grad).
        logp_old: ``(B, T)`` log-probs of the policy that sampled / the proximal policy.
        advantages: ``(B, T)``.
        mask: ``(B, T)``.
        eps_low, eps_high: clip range of ``s``.
        token_level: GSPO-token instead of GSPO.
        dual_clip: ``c > 1`` or None.
        is_weights: ``(B, T)`` detached per-token weights, or None.
        log_ratio_clamp: bound on ``log s_i`` before ``exp``.
        agg_mode, normalizer, segment_ids, length_constant: see :func:`aggregate`.

    Returns:
        ``(loss, metrics)``: ``clip_frac`` (tokens of clipped sequences), ``clip_frac_low``,
        ``clip_frac_high``, ``dual_clip_frac``, ``approx_kl`` (token-level k3 of
        ``logp_old -> logp``), ``ratio_mean`` (of ``s`` over tokens), ``num_tokens``.
    """
    _check_clip(eps_low, eps_high, dual_clip)
    m = mask.bool()
    tok_log_ratio = torch.where(m, logp.float() - logp_old.float(), 0.0)  # (B, T)
    sums, counts = per_sequence_sum(tok_log_ratio, m, segment_ids)  # (S,), (S,)
    seq_log_ratio = (sums / counts.clamp(min=1.0)).clamp(-log_ratio_clamp, log_ratio_clamp)
    seq_on_tokens = broadcast_to_tokens(seq_log_ratio, m, segment_ids)  # (B, T)
    adv = torch.where(m, advantages.float(), 0.0)
    if token_level:
        lp = torch.where(m, logp.float(), 0.0)
        log_s = seq_on_tokens.detach() + (lp - lp.detach())  # value log s_i, grad of log pi_t
    else:
        log_s = seq_on_tokens  # differentiable through the mean over the response
        adv_sum, _ = per_sequence_sum(adv, m, segment_ids)
        adv = broadcast_to_tokens(adv_sum / counts.clamp(min=1.0), m, segment_ids)
    ratio = torch.exp(log_s)
    per_token, clipped, dual_active = _ppo_clip_terms(ratio, adv, eps_low, eps_high, dual_clip)
    if is_weights is not None:
        per_token = per_token * is_weights.detach().float()
    loss = aggregate(per_token, m, agg_mode, normalizer, segment_ids=segment_ids,
                     length_constant=length_constant)
    with torch.no_grad():
        lr = tok_log_ratio.clamp(-log_ratio_clamp, log_ratio_clamp)
        metrics = {
            "clip_frac": _masked_mean(clipped.float(), m),
            "clip_frac_low": _masked_mean((clipped & (adv < 0)).float(), m),
            "clip_frac_high": _masked_mean((clipped & (adv > 0)).float(), m),
            "dual_clip_frac": _masked_mean(dual_active.float(), m),
            "approx_kl": _masked_mean(torch.expm1(lr) - lr, m),
            "ratio_mean": _masked_mean(ratio, m),
            "num_tokens": m.sum().float(),
        }
    return loss, metrics


def cispo_loss(logp: Tensor, logp_old: Tensor, advantages: Tensor, mask: Tensor, *,
               eps_low: float = 1.0, eps_high: float = 0.28, is_weights: Tensor | None = None,
               log_ratio_clamp: float = 20.0, agg_mode: AggMode = "token_mean",
               normalizer: Tensor | float | None = None, segment_ids: Tensor | None = None,
               length_constant: float | None = None) -> tuple[Tensor, Metrics]:
    """CISPO (MiniMax-M1, 2025): REINFORCE with clipped, stop-gradient importance weights on
    every token::

        J = 1 / sum_i |y_i| * sum_{i,t} sg(r^_{i,t}) * A_{i,t} * log pi(y_{i,t})
        r^ = clip(rho, 1 - eps_low, 1 + eps_high),   rho = pi / pi_old

    Unlike PPO's clip, which drops the gradient of clipped tokens, every token keeps its
    gradient ``r^ A grad log pi``; only its weight is bounded. The paper keeps no lower bound
    (``eps_low >= 1``: ``1 - eps_low <= 0``) and tunes ``eps_high``.

    The per-token value computed is ``-r^ * A * (1 + log pi - sg(log pi))``: its gradient is
    exactly the objective's, and its value ``-r^ A`` is comparable with PPO's loss (the
    objective's own value, ``A log pi``, says nothing useful).

    Args:
        logp: ``(B, T)`` current log-probs (with grad).
        logp_old: ``(B, T)`` log-probs of the policy that sampled / the proximal policy.
        advantages: ``(B, T)``.
        mask: ``(B, T)``.
        eps_low, eps_high: bounds of the weight.
        is_weights: ``(B, T)`` detached off-policy weights multiplied in, or None.
        log_ratio_clamp: bound on ``|logp - logp_old|`` before ``exp``.
        agg_mode, normalizer, segment_ids, length_constant: see :func:`aggregate`.

    Returns:
        ``(loss, metrics)``: ``clip_frac`` (tokens whose weight was bounded),
        ``clip_frac_low``/``clip_frac_high`` (below / above), ``approx_kl``, ``ratio_mean``,
        ``num_tokens``.
    """
    _check_clip(eps_low, eps_high, None)
    m = mask.bool()
    log_ratio = torch.where(m, logp.float() - logp_old.float(), 0.0)
    log_ratio = log_ratio.clamp(-log_ratio_clamp, log_ratio_clamp).detach()
    ratio = torch.exp(log_ratio)
    weight = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) if eps_low < 1.0 \
        else ratio.clamp(max=1.0 + eps_high)
    adv = torch.where(m, advantages.float(), 0.0)
    lp = torch.where(m, logp.float(), 0.0)
    per_token = -weight * adv * (1.0 + lp - lp.detach())
    if is_weights is not None:
        per_token = per_token * is_weights.detach().float()
    loss = aggregate(per_token, m, agg_mode, normalizer, segment_ids=segment_ids,
                     length_constant=length_constant)
    with torch.no_grad():
        low = ratio < 1.0 - eps_low
        high = ratio > 1.0 + eps_high
        metrics = {
            "clip_frac": _masked_mean((low | high).float(), m),
            "clip_frac_low": _masked_mean(low.float(), m),
            "clip_frac_high": _masked_mean(high.float(), m),
            "approx_kl": _masked_mean(torch.expm1(log_ratio) - log_ratio, m),
            "ratio_mean": _masked_mean(ratio, m),
            "num_tokens": m.sum().float(),
        }
    return loss, metrics


OffPolicyCorrection = Literal["token_tis", "seq_tis", "token_mis", "seq_mis", "icepop"]
OFF_POLICY_CORRECTIONS: tuple[str, ...] = ("token_tis", "seq_tis", "token_mis", "seq_mis",
                                           "icepop")


def off_policy_weights(logp_learner: Tensor, logp_behaviour: Tensor, mask: Tensor,
                       correction: OffPolicyCorrection, *, upper: float,
                       lower: float | None = None, segment_ids: Tensor | None = None,
                       log_ratio_clamp: float = 20.0) -> tuple[Tensor, Metrics]:
    """Importance weights that correct from the behaviour policy (the rollout engine) to the
    learner, truncated or masked (methods.md 3 and docs/methods.md)::

        rho_t = pi_learner(y_t) / pi_behaviour(y_t)                   token ratio
        rho_i = prod_t rho_t = exp(sum_t log rho_t)                   sequence ratio

        token_tis  w_t = min(rho_t, U)                   truncated IS (Yao et al. 2025)
        seq_tis    w_t = min(rho_i, U)                   on every token of sequence i
        token_mis  w_t = rho_t * 1[L <= rho_t <= U]      masked IS: reject the token
        seq_mis    w_t = rho_i * 1[L <= rho_i <= U]      reject the whole sequence
        icepop     w_t = rho_t * 1[a <= rho_t <= b]      IcePop (Ling team 2025): token_mis,
                                                         two-sided, defaults a = 0.5, b = 5

    (``L = lower``, no lower bound when None.) Multiply the per-token policy loss by ``w``
    (detached); the loss's normalizer still counts rejected tokens.

    Args:
        logp_learner: ``(B, T)`` learner log-probs of the sampled tokens at the start of the
            update (the proximal policy; not the current, changing one).
        logp_behaviour: ``(B, T)`` the rollout engine's log-probs.
        mask: ``(B, T)``.
        correction: one of :data:`OFF_POLICY_CORRECTIONS`.
        upper: ``U`` > 0 (truncation cap, or upper acceptance bound).
        lower: masked variants' lower acceptance bound in ``[0, U)``, or None.
        segment_ids: packed rows.
        log_ratio_clamp: bound on the (sequence) log ratio before ``exp``.

    Returns:
        ``(weights, metrics)``: weights ``(B, T)`` fp32, detached, 0 at masked positions.
        Metrics over the valid tokens: ``weight_mean``, ``weight_std`` (population),
        ``ratio_min``, ``ratio_max`` (of the token or sequence ratio before truncation or
        masking), ``truncated_frac``, ``masked_frac`` (tokens whose weight a mask set to 0),
        ``mismatch_kl`` (``KL(behaviour || learner)`` by k3: ``rho - 1 - log rho``).
    """
    if correction not in OFF_POLICY_CORRECTIONS:
        raise ValueError(f"off-policy correction must be one of {OFF_POLICY_CORRECTIONS}, got "
                         f"{correction!r}")
    if upper <= 0 or (lower is not None and not 0 <= lower < upper):
        raise ValueError(f"off-policy bounds must satisfy 0 <= lower < upper, got lower={lower}, "
                         f"upper={upper}")
    m = mask.bool()
    with torch.no_grad():
        tok = torch.where(m, logp_learner.float() - logp_behaviour.float(), 0.0)  # (B, T)
        if correction.startswith("seq"):
            sums, _ = per_sequence_sum(tok, m, segment_ids)  # (S,)
            log_rho = broadcast_to_tokens(sums, m, segment_ids)
        else:
            log_rho = tok
        log_rho = log_rho.clamp(-log_ratio_clamp, log_ratio_clamp)
        rho = torch.exp(log_rho)
        truncated = torch.zeros_like(m)
        rejected = torch.zeros_like(m)
        if correction.endswith("tis"):
            truncated = rho > upper
            w = rho.clamp(max=upper)
        else:
            keep = rho <= upper
            if lower is not None:
                keep &= rho >= lower
            rejected = ~keep
            w = torch.where(keep, rho, 0.0)
        w = torch.where(m, w, 0.0)
        mean = _masked_mean(w, m)
        tk = tok.clamp(-log_ratio_clamp, log_ratio_clamp)
        any_valid = bool(m.any())
        metrics = {
            "weight_mean": mean,
            "weight_std": _masked_mean((w - mean).square(), m).sqrt(),
            "ratio_min": rho[m].min() if any_valid else rho.new_zeros(()),
            "ratio_max": rho[m].max() if any_valid else rho.new_zeros(()),
            "truncated_frac": _masked_mean(truncated.float(), m),
            "masked_frac": _masked_mean(rejected.float(), m),
            "mismatch_kl": _masked_mean(torch.expm1(tk) - tk, m),
        }
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


def select_dpo_pairs(seq_rewards: Tensor, group_size: int | None = None, *,
                     group_ids: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Online DPO pairs: the best and the worst response of each prompt by reward.

    Args:
        seq_rewards: ``(S,)`` rewards, ``S = P * group_size``, groups consecutive.
        group_size: N >= 2.
        group_ids: ``(S,)`` group labels instead of ``group_size`` (groups of unequal size;
            a group of one response gives no pair).

    Returns:
        ``(chosen, rejected, valid)``, each ``(G,)`` (one per group, in group order): global
        indices into the S responses of the highest- and lowest-rewarded response (first one on
        ties) and whether the pair carries a preference (``max > min``; a group with equal
        rewards gives none — drop it).
    """
    if group_ids is None and group_size is not None and group_size < 2:
        raise ValueError(f"DPO pairs need group_size >= 2 responses per prompt, got {group_size}")
    r = seq_rewards.float()
    idx, G = group_index(r.numel(), group_size, group_ids, device=r.device)
    hi_m, valid_slots, pos = group_matrix(r, idx, G, fill=float("-inf"))  # (G, n_max)
    lo_m = torch.where(valid_slots, hi_m, float("inf"))
    rows = torch.full_like(valid_slots, -1, dtype=torch.long)
    rows[idx, pos] = torch.arange(r.numel(), device=r.device)
    best = rows.gather(1, hi_m.argmax(-1, keepdim=True))[:, 0]
    worst = rows.gather(1, lo_m.argmin(-1, keepdim=True))[:, 0]
    valid = hi_m.amax(-1) > lo_m.amin(-1)
    return best, worst, valid


__all__ = [
    "AGG_MODES", "aggregate", "aggregate_normalizer", "policy_loss", "value_loss",
    "explained_variance", "entropy_loss", "kl_loss", "truncated_is_weights",
    "sequence_logprobs", "dpo_loss", "select_dpo_pairs", "gspo_loss", "cispo_loss",
    "off_policy_weights", "OFF_POLICY_CORRECTIONS",
]
