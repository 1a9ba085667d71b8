"""Turning rollouts into training batches: sequences, rewards, advantages (driver side).

Pure data plumbing around :mod:`megarlhf.rl`. The batch holds ``B = P * N`` sequences (prompt +
response), the N samples of a prompt consecutive, right-padded; every per-token field is aligned
with the tokens and masked by ``response_mask``. The rl functions skip masked tokens in their
recursions, so GAE and returns run directly on these (B, S) tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from megarlhf import rl
from megarlhf.config.schema import AlgorithmConfig
from megarlhf.data.job_data import PromptItem
from megarlhf.engine.batch import TokenBatch


@dataclass
class Rollout:
    """One rollout phase: P prompts, their ``B = P * N`` samples as a batch, the response texts.

    Attributes:
        prompts: the P prompts.
        batch: the sequences (prompt + response), the N samples of a prompt consecutive.
            Fields: ``response_mask`` (B, S); ``logp_behaviour`` (B, S), the rollout engine's
            log-probs at response positions - present only when the engine returned them, never
            zeros standing in; per sequence ``prompt_index``, ``response_length``, ``truncated``.
        responses: the B decoded response texts (what the rewards see).
    """

    prompts: list[PromptItem]
    batch: TokenBatch
    responses: list[str]

    @property
    def sample_prompts(self) -> list[PromptItem]:
        """The prompt of each of the B samples."""
        return [self.prompts[i] for i in self.batch.fields["prompt_index"].tolist()]

    @property
    def behaviour_logprobs(self) -> Tensor | None:
        """``(B, S)`` the behaviour policy's log-probs, or None when the engine gave none."""
        return self.batch.fields.get("logp_behaviour")


def build_rollout(prompts: list[PromptItem], outputs: list, tokenizer, pad_id: int = 0
                  ) -> Rollout:
    """The :class:`Rollout` of P prompts from the engine's P ``RolloutOutput`` (N samples each:
    token_ids, logprobs or None, finish_reason); responses decoded with ``tokenizer``.

    Raises:
        ValueError: some samples carry log-probs and others not (an engine bug).
    """
    seqs, resp_mask, logp_b = [], [], []
    prompt_index, resp_len, truncated, responses = [], [], [], []
    samples = [s for out in outputs for s in out.samples]
    with_lp = sum(s.logprobs is not None for s in samples)
    if 0 < with_lp < len(samples):
        raise ValueError(f"the rollout engine returned log-probs for {with_lp} of "
                         f"{len(samples)} samples")
    for p, (item, out) in enumerate(zip(prompts, outputs, strict=True)):
        for s in out.samples:
            seqs.append(list(item.ids) + list(s.token_ids))
            resp_mask.append([0.0] * len(item.ids) + [1.0] * len(s.token_ids))
            if with_lp:
                logp_b.append([0.0] * len(item.ids) + list(s.logprobs))
            prompt_index.append(p)
            resp_len.append(len(s.token_ids))
            truncated.append(s.finish_reason == "length")
            responses.append(tokenizer.decode(s.token_ids))
    fields = {"response_mask": resp_mask, "prompt_index": prompt_index,
              "response_length": resp_len, "truncated": truncated}
    if with_lp:
        fields["logp_behaviour"] = logp_b
    batch = TokenBatch.from_sequences(seqs, pad_id=pad_id, fields=fields)
    for k in ("response_mask", "logp_behaviour"):
        if k in batch.fields:
            batch.fields[k] = batch.fields[k].float()
    return Rollout(list(prompts), batch, responses)


def minibatches(batch_size: int, minibatch_size: int, epochs: int = 1) -> list[list[int]]:
    """The rows of each optimizer step over a rollout batch: ``epochs`` passes of consecutive
    slices ``[k * m, (k + 1) * m)``. With ``m = train_prompts * N`` each slice holds whole
    prompt groups (the N samples of a prompt are consecutive).

    Raises:
        ValueError: ``batch_size`` is not a multiple of ``minibatch_size``.
    """
    if minibatch_size < 1 or batch_size % minibatch_size:
        raise ValueError(f"a batch of {batch_size} rows does not split into mini-batches of "
                         f"{minibatch_size}")
    steps = batch_size // minibatch_size
    return [list(range(k * minibatch_size, (k + 1) * minibatch_size))
            for _ in range(epochs) for k in range(steps)]


def chunks(rows: list[int], size: int) -> list[list[int]]:
    """``rows`` cut into consecutive pieces of ``size`` (the last may be shorter)."""
    return [rows[k:k + size] for k in range(0, len(rows), size)]


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
