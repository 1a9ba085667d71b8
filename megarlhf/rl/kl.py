"""Per-token KL estimators between the policy and the reference (methods.md 2.2 step 5).

With the log ratio ``d_t = logp_t - logp_ref_t = log(pi(y_t) / pi_ref(y_t))`` of the sampled
token ``y_t ~ pi``, three estimators of ``KL(pi || pi_ref)`` (Schulman, "Approximating KL
divergence"):

* ``k1 = d``                       unbiased, high variance, can be negative;
* ``k2 = d^2 / 2``                 biased, low variance, >= 0;
* ``k3 = exp(-d) - 1 + d``         unbiased, low variance, >= 0 (``r - 1 - log r`` with
  ``r = pi_ref / pi``).

Used as a *loss* (``algorithm.kl_in_reward=false``), what matters is the gradient. On samples
of ``pi``, ``grad KL(pi || pi_ref) = E[d * grad log pi]``, which is exactly the gradient of
``k2``; ``k1``'s gradient has expectation 0 and ``k3``'s, ``(1 - pi_ref/pi) grad log pi``, is
the gradient of the *reverse* KL. The straight-through variants keep an estimator's value and
take ``k2``'s gradient (an unbiased gradient of ``KL(pi || pi_ref)``, on-policy):

* ``k1+`` / ``k3+``: value ``k1`` / ``k3``, gradient ``d * grad log pi``
  (``k2 - sg(k2) + sg(k)``; verl's ``"k3+"``).

In the reward (no gradient) ``k1+`` and ``k3+`` equal ``k1`` and ``k3``.

:func:`adaptive_kl_coef` is the adaptive controller of the KL coefficient (Ziegler et al. 2019).

All are computed in fp32 whatever the input dtype.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

KLEstimator = Literal["k1", "k2", "k3", "k1+", "k3+"]
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3", "k1+", "k3+")


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


def straight_through_k2(value: Tensor, logp: Tensor, logp_ref: Tensor, *,
                        clamp: float | None = None) -> Tensor:
    """``value`` in the forward pass, ``k2``'s gradient in the backward pass::

        k2 - sg(k2) + sg(value)        grad = (logp - logp_ref) * grad logp

    Args:
        value: ``(B, T)`` the estimate to report (e.g. :func:`kl_k3`).
        logp, logp_ref, clamp: as :func:`kl_k1`.

    Returns:
        ``(B, T)`` fp32.
    """
    k2 = kl_k2(logp, logp_ref, clamp=clamp)
    return k2 - k2.detach() + value.detach()


def kl_estimate(logp: Tensor, logp_ref: Tensor, estimator: KLEstimator = "k1", *,
                clamp: float | None = None) -> Tensor:
    """One of :func:`kl_k1`, :func:`kl_k2`, :func:`kl_k3` by name, or their straight-through
    variants ``"k1+"``, ``"k3+"`` (value of k1 / k3, gradient of k2; module docstring).

    Args:
        logp: ``(B, T)`` policy log-probs of the sampled tokens.
        logp_ref: ``(B, T)`` reference log-probs of the same tokens.
        estimator: ``"k1"``, ``"k2"``, ``"k3"``, ``"k1+"`` or ``"k3+"``.
        clamp: optional bound on ``|logp - logp_ref|`` applied before the estimator.

    Returns:
        ``(B, T)`` fp32 per-token estimate (not masked; mask it where you aggregate).
    """
    if estimator in ("k1+", "k3+"):
        value = kl_estimate(logp, logp_ref, estimator[:-1], clamp=clamp)
        return straight_through_k2(value, logp, logp_ref, clamp=clamp)
    if estimator == "k1":
        return kl_k1(logp, logp_ref, clamp=clamp)
    if estimator == "k2":
        return kl_k2(logp, logp_ref, clamp=clamp)
    if estimator == "k3":
        return kl_k3(logp, logp_ref, clamp=clamp)
    raise ValueError(f"KL estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def adaptive_kl_coef(coef: float, kl: float, target: float, horizon: int, n_steps: int) -> float:
    """One update of the adaptive KL controller (Ziegler et al. 2019, "Fine-Tuning Language
    Models from Human Preferences", section 2.2)::

        e      = clip(KL / KL_target - 1, -0.2, 0.2)
        beta  <- beta * (1 + e * n_steps / horizon)

    The coefficient grows while the measured KL is above the target and shrinks below it, by
    at most 20% of ``n_steps / horizon`` per update.

    Args:
        coef: the current beta (> 0; a coefficient of 0 stays 0).
        kl: the KL measured on the last batch (per token, to the reference).
        target: ``KL_target`` > 0.
        horizon: samples over which the error is corrected (>= 1).
        n_steps: samples in the last batch.

    Returns:
        The next beta.
    """
    if target <= 0 or horizon < 1:
        raise ValueError(f"adaptive KL needs target > 0 and horizon >= 1, got {target}, "
                         f"{horizon}")
    err = min(max(kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + err * n_steps / horizon)
