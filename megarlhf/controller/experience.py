"""Turning rollouts into training batches: sequences, rewards, advantages (driver side).

Pure data plumbing around :mod:`megarlhf.rl`. The batch holds ``B = P * N`` sequences (prompt +
response), the N samples of a prompt consecutive, right-padded; every per-token field is aligned
with the tokens and masked by ``response_mask``. The rl functions skip masked tokens in their
recursions, so GAE and returns run directly on these (B, S) tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from megarlhf.config.schema import AlgorithmConfig
from megarlhf.data.job_data import PromptItem
from megarlhf.engine.batch import TokenBatch
from megarlhf import rl


def build_rollout_batch(prompts: list[PromptItem], outputs: list, pad_id: int = 0
                        ) -> tuple[TokenBatch, dict[str, Any]]:
    """Sequences (prompt + response) of every sample, with the behaviour log-probs.

    Args:
        prompts: P prompts.
        outputs: P ``RolloutOutput`` (each with N samples: token_ids, logprobs, finish_reason).

    Returns:
        ``(batch, info)``. Fields: ``response_mask`` (B, S), ``logp_behaviour`` (B, S) (the
        rollout engine's log-probs at response positions), per sequence ``prompt_index``,
        ``response_length``, ``truncated``. ``info`` holds the response token lists.
    """
    seqs, resp_mask, logp_b = [], [], []
    prompt_index, resp_len, truncated, responses = [], [], [], []
    for p, (item, out) in enumerate(zip(prompts, outputs)):
        for s in out.samples:
            ids = list(item.ids) + list(s.token_ids)
            seqs.append(ids)
            resp_mask.append([0] * len(item.ids) + [1] * len(s.token_ids))
            lp = list(s.logprobs) if s.logprobs is not None else [0.0] * len(s.token_ids)
            logp_b.append([0.0] * len(item.ids) + lp)
            prompt_index.append(p)
            resp_len.append(len(s.token_ids))
            truncated.append(s.finish_reason == "length")
            responses.append(list(s.token_ids))
    batch = TokenBatch.from_sequences(
        seqs, pad_id=pad_id,
        fields={"response_mask": resp_mask, "logp_behaviour": logp_b,
                "prompt_index": prompt_index, "response_length": resp_len,
                "truncated": truncated})
    batch.fields["response_mask"] = batch.fields["response_mask"].float()
    batch.fields["logp_behaviour"] = batch.fields["logp_behaviour"].float()
    return batch, {"responses": responses}


def compute_advantages(batch: TokenBatch, raw_rewards: Tensor, algo: AlgorithmConfig,
                       estimator: str, group_size: int, *, values: Tensor | None = None,
                       logp: Tensor | None = None, logp_ref: Tensor | None = None
                       ) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Reward processing (methods.md 2.2, in order) and advantages (2.3).

    Args:
        batch: the rollout batch (``response_mask``).
        raw_rewards: ``(B,)`` raw sequence rewards (RM, verifier or their mix).
        algo: reward processing and advantage settings.
        estimator: gae | grpo | dr_grpo | rloo | reinforce_pp.
        group_size: N samples per prompt (consecutive in the batch).
        values: ``(B, S)`` critic values (gae).
        logp, logp_ref: ``(B, S)`` actor (old) and reference log-probs (KL), optional.

    Returns:
        ``(fields, metrics)``: fields ``advantages``, ``returns`` (B, S) and
        ``processed_reward`` (B,); metrics of the reward and KL.
    """
    mask = batch.fields["response_mask"].bool()
    raw = raw_rewards.float()
    kl = None
    if logp is not None and logp_ref is not None:
        kl = rl.kl_estimate(logp, logp_ref, algo.kl_estimator) * mask
    if estimator == "rloo":
        seq = rl.clip_rewards(raw, algo.reward_clip)
        seq_adv = rl.rloo_advantages(seq, mask, group_size)  # (B, S), baseline subtracted
        seq = seq_adv.gather(1, _last_index(mask)[:, None])[:, 0]
        seq = rl.shrink_negative_rewards(seq, algo.negative_reward_scale)
    else:
        seq = rl.process_rewards(raw, group_size, clip=algo.reward_clip,
                                 normalization=algo.reward_norm,
                                 scale_by_std=estimator != "dr_grpo",
                                 eps=algo.reward_norm_eps,
                                 shrink_alpha=algo.negative_reward_scale)
    kl_in_reward = kl is not None and algo.kl_in_reward and algo.kl_coef > 0
    if estimator == "gae":
        if values is None:
            raise ValueError("advantage_estimator=gae needs the critic's values (kind=ppo)")
        tok = rl.token_level_rewards(seq, mask, kl=kl if kl_in_reward else None,
                                     kl_coef=algo.kl_coef)
        adv, ret = rl.gae_advantages(tok, values, mask, gamma=algo.gamma, lam=algo.lam,
                                     whiten_advantages=algo.whiten_advantages)
    elif estimator == "reinforce_pp":
        tok = rl.token_level_rewards(seq, mask, kl=kl if kl_in_reward else None,
                                     kl_coef=algo.kl_coef)
        adv, ret = rl.reinforce_pp_advantages(tok, mask, gamma=algo.gamma)
    elif estimator in ("grpo", "dr_grpo", "rloo"):
        adv = rl.grpo_advantages(seq, mask)
        if kl_in_reward:
            # The KL penalty per token, as a return-to-go added to the broadcast advantage.
            adv = adv + rl.discounted_returns(-algo.kl_coef * kl, mask, gamma=1.0)
        if algo.whiten_advantages:
            adv = rl.whiten(adv, mask)
        ret = adv
    else:
        raise ValueError(f"unknown advantage estimator {estimator!r}")
    metrics = {
        "reward/raw_mean": float(raw.mean()),
        "reward/raw_std": float(raw.std(unbiased=False)) if raw.numel() > 1 else 0.0,
        "reward/normalized_mean": float(seq.mean()),
    }
    if kl is not None:
        n = mask.sum().clamp(min=1)
        metrics["policy/kl_ref"] = float(kl.sum() / n)
    return {"advantages": adv * mask, "returns": ret * mask, "processed_reward": seq}, metrics


def _last_index(mask: Tensor) -> Tensor:
    """Index of the last True per row (0 for empty rows)."""
    pos = torch.arange(mask.shape[1]).expand_as(mask)
    return torch.where(mask, pos, torch.zeros_like(pos)).max(dim=1).values


def response_lengths(batch: TokenBatch) -> Tensor:
    return batch.fields["response_mask"].sum(dim=1)
