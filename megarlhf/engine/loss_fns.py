"""RL losses as engine loss functions, described by small picklable specs.

The driver computes advantages, returns and reference log-probs (``megarlhf.rl``), puts them in
the batch's fields, and sends the engine (in-process or a Ray worker) a *spec*: which loss, its
hyper-parameters and the *global* normalisers it computed once for the whole batch.
:func:`make_loss_fn` turns a spec into ``loss_fn(outputs, micro_batch) -> (loss, metrics)``.

Every metric is made additive: a per-micro-batch mean over ``n`` items is reported as
``mean * n / N_global``, so the engine's sum over micro-batches and data-parallel ranks is the
global mean. (Maxima are not additive and are not reported here.)

Batch fields each loss reads (per token ``(B, S)`` aligned with the tokens, per sequence ``(B,)``):

============  ===============================================================================
policy        response_mask, advantages, logp_old; logp_ref (kl_coef > 0); is_weights
              (use_is_weights: the off-policy weights the driver computed, detached)
value         response_mask, values_old, returns
dpo           response_mask, ref_logp_sum (per seq); rows in (chosen, rejected) pairs
sft           loss_mask
orm           last_index (per seq: the token whose score counts), kind (per seq), label
prm           step_mask, step_labels; plus the orm fields for preference rows (optional)
============  ===============================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from megarlhf.engine.batch import MicroBatch
from megarlhf.rl import losses as L
from megarlhf.rl import rm_losses as R

AggMode = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
                  "seq_mean_token_sum_norm", "token_sum"]
PolicyLossType = Literal["ppo", "gspo", "gspo_token", "cispo"]


@dataclass(frozen=True)
class PolicyLossSpec:
    """The policy-gradient loss (PPO clip, GSPO, GSPO-token or CISPO; rl.losses), + optional
    entropy bonus, KL loss, and off-policy weights computed by the driver."""

    normalizer: float  # global count for agg_mode (tokens, or sequences for seq_* modes)
    num_tokens: float  # global number of response tokens (metrics)
    loss_type: PolicyLossType = "ppo"
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: float | None = None
    agg_mode: AggMode = "token_mean"
    length_constant: float | None = None  # seq_mean_token_sum_norm (Dr.GRPO)
    entropy_coef: float = 0.0
    kl_coef: float = 0.0  # KL to the reference as a loss term (when not in the reward)
    kl_estimator: Literal["k1", "k2", "k3", "k1+", "k3+"] = "k3"
    kl_clamp: float | None = None  # bound on |logp - logp_ref| before the estimator
    use_is_weights: bool = False  # multiply the per-token loss by the batch field is_weights
    temperature: float = 1.0


@dataclass(frozen=True)
class ValueLossSpec:
    normalizer: float
    num_tokens: float
    clip_eps: float | None = 0.2
    coef: float = 1.0
    agg_mode: AggMode = "token_mean"
    length_constant: float | None = None


@dataclass(frozen=True)
class DPOLossSpec:
    num_pairs: float  # global
    beta: float = 0.1
    temperature: float = 1.0


@dataclass(frozen=True)
class SFTLossSpec:
    normalizer: float  # global number of loss tokens (token_mean) or sequences
    num_tokens: float
    agg_mode: AggMode = "token_mean"


@dataclass(frozen=True)
class ORMLossSpec:
    """Multi-task ORM: ``L_bin + L_pref`` (rl.rm_losses.orm_multitask_loss)."""

    num_pairs: float  # global number of (chosen, rejected) pairs
    num_binary: float  # global number of binary-labelled rows


@dataclass(frozen=True)
class PRMLossSpec:
    """PRM: per-step BCE (rl.rm_losses.prm_step_loss) + the pairs' Bradley-Terry loss."""

    num_steps: float  # global number of step positions (step_mask.sum())
    num_pairs: float = 0.0  # global number of preference pairs (0: none in the batch)
    label_type: Literal["soft", "hard"] = "soft"


LossSpec = PolicyLossSpec | ValueLossSpec | DPOLossSpec | SFTLossSpec | ORMLossSpec | PRMLossSpec


def _scaled(metrics: dict[str, Tensor], local: float, total: float,
            keys: tuple[str, ...]) -> dict[str, Tensor]:
    w = local / max(total, 1.0)
    return {k: metrics[k].detach().float() * w for k in keys if k in metrics}


def _policy_terms(spec: PolicyLossSpec, logp: Tensor, f: dict[str, Tensor], mask: Tensor,
                  mb: MicroBatch, is_w: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
    """The policy-gradient term of ``spec.loss_type`` and its metrics."""
    common = dict(is_weights=is_w, agg_mode=spec.agg_mode, normalizer=spec.normalizer,
                  segment_ids=mb.segment_ids, length_constant=spec.length_constant)
    if spec.loss_type == "ppo":
        return L.policy_loss(logp, f["logp_old"], f["advantages"], mask, eps_low=spec.eps_low,
                             eps_high=spec.eps_high, dual_clip=spec.dual_clip, **common)
    if spec.loss_type in ("gspo", "gspo_token"):
        return L.gspo_loss(logp, f["logp_old"], f["advantages"], mask, eps_low=spec.eps_low,
                           eps_high=spec.eps_high, dual_clip=spec.dual_clip,
                           token_level=spec.loss_type == "gspo_token", **common)
    if spec.loss_type == "cispo":
        return L.cispo_loss(logp, f["logp_old"], f["advantages"], mask, eps_low=spec.eps_low,
                            eps_high=spec.eps_high, **common)
    raise ValueError(f"unknown policy loss {spec.loss_type!r}")


def _policy(spec: PolicyLossSpec):
    def fn(out: dict[str, Tensor], mb: MicroBatch):
        f = mb.fields
        mask = f["response_mask"].bool()
        logp = out["logp"]
        n_local = float(mask.sum())
        is_w = f["is_weights"] if spec.use_is_weights else None
        loss, m = _policy_terms(spec, logp, f, mask, mb, is_w)
        metrics = _scaled(m, n_local, spec.num_tokens,
                          ("clip_frac", "clip_frac_low", "clip_frac_high", "dual_clip_frac",
                           "approx_kl", "ratio_mean"))
        metrics["pg_loss"] = loss.detach()
        total = loss
        if "entropy" in out:
            ent = L.aggregate(out["entropy"], mask, spec.agg_mode, spec.normalizer,
                              segment_ids=mb.segment_ids, length_constant=spec.length_constant)
            metrics["entropy"] = (torch.where(mask, out["entropy"].detach(), 0.0).sum()
                                  / max(spec.num_tokens, 1.0))
            if spec.entropy_coef:
                total = total - spec.entropy_coef * ent
        if spec.kl_coef:
            kl_term = L.kl_loss(logp, f["logp_ref"], mask, estimator=spec.kl_estimator,
                                clamp=spec.kl_clamp, agg_mode=spec.agg_mode,
                                normalizer=spec.normalizer, segment_ids=mb.segment_ids,
                                length_constant=spec.length_constant)
            metrics["kl_loss"] = kl_term.detach()
            total = total + spec.kl_coef * kl_term
        metrics["loss"] = total.detach()
        return total, metrics

    return fn


def _value(spec: ValueLossSpec):
    def fn(out: dict[str, Tensor], mb: MicroBatch):
        f = mb.fields
        mask = f["response_mask"].bool()
        loss, m = L.value_loss(out["values"], f["values_old"], f["returns"], mask,
                               clip_eps=spec.clip_eps, agg_mode=spec.agg_mode,
                               normalizer=spec.normalizer, segment_ids=mb.segment_ids,
                               length_constant=spec.length_constant)
        metrics = _scaled(m, float(mask.sum()), spec.num_tokens,
                          tuple(k for k in m if k not in ("num_tokens",)
                                and m[k].dim() == 0 and not k.endswith("_max")))
        metrics["value_loss"] = loss.detach()
        metrics["loss"] = (spec.coef * loss).detach()
        return spec.coef * loss, metrics

    return fn


def _seq_logp(out: dict[str, Tensor], mb: MicroBatch, mask: Tensor) -> Tensor:
    """Per-sequence sum of log-probs over ``mask``, in placement order (n_seq,)."""
    return L.sequence_logprobs(out["logp"], mask, segment_ids=mb.segment_ids)


def _dpo(spec: DPOLossSpec):
    def fn(out: dict[str, Tensor], mb: MicroBatch):
        f = mb.fields
        mask = f["response_mask"].bool()
        seq = _seq_logp(out, mb, mask)  # (n_seq,)
        ref = f["ref_logp_sum"].float()
        loss, m = L.dpo_loss(seq[0::2], seq[1::2], ref[0::2], ref[1::2], beta=spec.beta,
                             normalizer=spec.num_pairs)
        n = float(seq[0::2].numel())
        metrics = _scaled(m, n, spec.num_pairs,
                          ("reward_accuracy", "reward_margin", "chosen_reward",
                           "rejected_reward"))
        metrics["loss"] = loss.detach()
        return loss, metrics

    return fn


def _sft(spec: SFTLossSpec):
    def fn(out: dict[str, Tensor], mb: MicroBatch):
        mask = mb.fields["loss_mask"].bool()
        nll = -out["logp"]
        loss = L.aggregate(nll, mask, spec.agg_mode, spec.normalizer,
                           segment_ids=mb.segment_ids)
        metrics = {"loss": loss.detach(),
                   "nll_token_mean": torch.where(mask, nll.detach(), 0.0).sum()
                   / max(spec.num_tokens, 1.0)}
        return loss, metrics

    return fn


def _orm(spec: ORMLossSpec):
    def fn(out: dict[str, Tensor], mb: MicroBatch):
        f = mb.fields
        scores = mb.seq_values(out["values"], f["last_index"])  # (n_seq,)
        loss, m = R.orm_multitask_loss(scores, f["kind"], f.get("label"),
                                       pair_normalizer=spec.num_pairs,
                                       binary_normalizer=spec.num_binary)
        n_p, n_b = float(m["num_pairs"]), float(m["num_binary"])
        metrics = {"loss": loss.detach(), "loss_pref": m["loss_pref"], "loss_bin": m["loss_bin"]}
        metrics.update(_scaled(m, n_p, spec.num_pairs,
                               ("pair_accuracy", "chosen_reward", "rejected_reward")))
        metrics.update(_scaled(m, n_b, spec.num_binary, ("binary_accuracy",)))
        return loss, metrics

    return fn


def _prm(spec: PRMLossSpec):
    """Per-step BCE on labelled rows + the outcome (Bradley-Terry) loss on preference pairs.

    Labelled rows are trained through their steps only (their final step, read at the last
    token, carries the outcome label), so their ``kind`` (KIND_BINARY) does not add an outcome
    BCE here; pairs (KIND_CHOSEN / KIND_REJECTED, no step positions) keep the loss of 1.1.
    """

    def fn(out: dict[str, Tensor], mb: MicroBatch):
        f = mb.fields
        loss, m = R.prm_step_loss(out["values"], f["step_mask"], f["step_labels"],
                                  label_type=spec.label_type, normalizer=spec.num_steps)
        metrics = {"loss_step": loss.detach()}
        metrics.update(_scaled(m, float(m["num_steps"]), spec.num_steps,
                               ("step_accuracy", "step_score")))
        total = loss
        if spec.num_pairs:
            if "kind" not in f or "last_index" not in f:
                raise ValueError("PRMLossSpec with num_pairs > 0 needs the per-sequence fields "
                                 "'kind' and 'last_index' (preference rows)")
            scores = mb.seq_values(out["values"], f["last_index"])  # (n_seq,)
            kinds = torch.where(f["kind"] == R.KIND_BINARY, R.KIND_IGNORE, f["kind"])
            lp, mp = R.orm_multitask_loss(scores, kinds, None, pair_normalizer=spec.num_pairs,
                                          binary_normalizer=1)
            total = total + lp
            metrics["loss_pref"] = lp.detach()
            metrics.update(_scaled(mp, float(mp["num_pairs"]), spec.num_pairs,
                                   ("pair_accuracy", "chosen_reward", "rejected_reward")))
        metrics["loss"] = total.detach()
        return total, metrics

    return fn


def make_loss_fn(spec: LossSpec):
    """The engine loss function for ``spec``."""
    if isinstance(spec, PolicyLossSpec):
        return _policy(spec)
    if isinstance(spec, ValueLossSpec):
        return _value(spec)
    if isinstance(spec, DPOLossSpec):
        return _dpo(spec)
    if isinstance(spec, SFTLossSpec):
        return _sft(spec)
    if isinstance(spec, ORMLossSpec):
        return _orm(spec)
    if isinstance(spec, PRMLossSpec):
        return _prm(spec)
    raise TypeError(f"unknown loss spec {type(spec).__name__}")


def loss_needs(spec: LossSpec) -> dict:
    """What a spec needs from the engine: entropy, temperature and sequence grouping."""
    if isinstance(spec, PolicyLossSpec):
        return {"entropy": True, "temperature": spec.temperature, "group_size": 1}
    if isinstance(spec, DPOLossSpec):
        return {"entropy": False, "temperature": spec.temperature, "group_size": 2}
    if isinstance(spec, (ORMLossSpec, PRMLossSpec)):
        return {"entropy": False, "temperature": 1.0, "group_size": 2
                if getattr(spec, "num_pairs", 0) else 1}
    return {"entropy": False, "temperature": 1.0, "group_size": 1}
