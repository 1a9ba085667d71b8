"""Per-token KL estimators between the policy and the reference (methods.md 2.2 step 5).

With the log ratio ``d_t = logp_t - logp_ref_t = log(pi(y_t) / pi_ref(y_t))`` of the sampled
token ``y_t ~ pi``, three estimators of ``KL(pi || pi_ref)`` (Schulman, "Approximating KL
divergence"):

* ``k1 = d``                       unbiased, high variance, can be negative;
* ``k2 = d^2 / 2``                 biased, low variance, >= 0;
* ``k3 = exp(-d) - 1 + d``         unbiased, low variance, >= 0 (``r - 1 - log r`` with
  ``r = pi_ref / pi``).

All are computed in fp32 whatever the input dtype.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

KLEstimator = Literal["k1", "k2", "k3"]
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")


def _log_ratio(logp: Tensor, logp_ref: Tensor, clamp: float | None) -> Tensor:
    d = logp.float() - logp_ref.float()  # (B, T)
    if clamp is not None:
        d = d.clamp(-clamp, clamp)
    return d


def kl_k1(logp: Tensor, logp_ref: Tensor, *, clamp: float | None = None) -> Tensor:
    """``k1 = logp - logp_ref``.

    Args:
        logp: ``(B, T)`` log-probs of the sampled tokens under the policy.
        logp_ref: ``(B, T)`` log-probs of the same tokens under the reference.
        clamp: if set, the log ratio is clamped to ``[-clamp, clamp]`` first.

    Returns:
        ``(B, T)`` fp32.
    """
    return _log_ratio(logp, logp_ref, clamp)


def kl_k2(logp: Tensor, logp_ref: Tensor, *, clamp: float | None = None) -> Tensor:
    """``k2 = 0.5 * (logp - logp_ref)^2``. Shapes as :func:`kl_k1`."""
    return 0.5 * _log_ratio(logp, logp_ref, clamp).square()


def kl_k3(logp: Tensor, logp_ref: Tensor, *, clamp: float | None = None) -> Tensor:
    """``k3 = exp(-d) - 1 + d`` with ``d = logp - logp_ref``. Shapes as :func:`kl_k1`.

    ``exp(-d)`` overflows fp32 for ``d < -88``; pass ``clamp`` (e.g. 20) where the policy can
    put far less mass on a token than the reference does.
    """
    d = _log_ratio(logp, logp_ref, clamp)
    return torch.expm1(-d) + d  # expm1 keeps precision for small |d|


def kl_estimate(logp: Tensor, logp_ref: Tensor, estimator: KLEstimator = "k1", *,
                clamp: float | None = None) -> Tensor:
    """One of :func:`kl_k1`, :func:`kl_k2`, :func:`kl_k3` by name.

    Args:
        logp: ``(B, T)`` policy log-probs of the sampled tokens.
        logp_ref: ``(B, T)`` reference log-probs of the same tokens.
        estimator: ``"k1"``, ``"k2"`` or ``"k3"``.
        clamp: optional bound on ``|logp - logp_ref|`` applied before the estimator.

    Returns:
        ``(B, T)`` fp32 per-token estimate (not masked; mask it where you aggregate).
    """
    if estimator == "k1":
        return kl_k1(logp, logp_ref, clamp=clamp)
    if estimator == "k2":
        return kl_k2(logp, logp_ref, clamp=clamp)
    if estimator == "k3":
        return kl_k3(logp, logp_ref, clamp=clamp)
    raise ValueError(f"KL estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
