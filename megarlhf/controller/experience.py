"""Turning rollouts into training batches: sequences, rewards, advantages (driver side).

Pure data plumbing around :mod:`megarlhf.rl`. The batch holds ``B = P * N`` sequences (prompt +
response), the N samples of a prompt consecutive, right-padded; every per-token field is aligned
with the tokens and masked by ``response_mask``. The rl functions skip masked tokens in their
recursions, so GAE and returns run directly on these (B, S) tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    outputs: list | None = None  # the engine's P RolloutOutput (to regroup prompts)
    metrics: dict = field(default_factory=dict)  # the generation's own (agent/* of trajectories)

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
            pids = list(item.ids) if s.prompt_ids is None else list(s.prompt_ids)
            seqs.append(pids + list(s.token_ids))
            gen = [1.0] * len(s.token_ids) if s.loss_mask is None else \
                [float(v) for v in s.loss_mask]  # an agent's observation tokens: 0
            resp_mask.append([0.0] * len(pids) + gen)
            if with_lp:
                logp_b.append([0.0] * len(pids) + list(s.logprobs))
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
    return Rollout(list(prompts), batch, responses, list(outputs))


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


def group_minibatches(group_ids, prompts_per_step: int, epochs: int = 1) -> list[list[int]]:
    """The rows of each optimizer step when groups may differ in size: ``epochs`` passes of
    ``prompts_per_step`` consecutive whole groups each (groups in order of first appearance).
    With N consecutive samples per prompt this is ``minibatches(B, prompts_per_step * N)``.

    Raises:
        ValueError: the number of groups is not a multiple of ``prompts_per_step``.
    """
    ids = [int(g) for g in group_ids]
    rows_of: dict[int, list[int]] = {}
    for row, g in enumerate(ids):
        rows_of.setdefault(g, []).append(row)
    groups = list(rows_of.values())
    if prompts_per_step < 1 or len(groups) % prompts_per_step:
        raise ValueError(f"{len(groups)} prompt groups do not split into mini-batches of "
                         f"{prompts_per_step} prompts")
    steps = [[r for grp in groups[k:k + prompts_per_step] for r in grp]
             for k in range(0, len(groups), prompts_per_step)]
    return [rows for _ in range(epochs) for rows in steps]


def compute_advantages(batch: TokenBatch, raw_rewards: Tensor, algo: AlgorithmConfig,
                       estimator: str, group_size: int, *, values: Tensor | None = None,
                       logp: Tensor | None = None, logp_ref: Tensor | None = None,
                       kl_coef: float | None = None
                       ) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Reward processing (methods.md 2.2, in order) and advantages (2.3).

    Groups: the batch's ``prompt_index`` field when present (groups of any size, e.g. a prompt
    that kept only some of its samples), else ``group_size`` consecutive samples per prompt.

    Args:
        batch: the rollout batch (``response_mask``, optional ``prompt_index``).
        raw_rewards: ``(B,)`` raw sequence rewards (RM, verifier or their mix, after any length
            shaping).
        algo: reward processing and advantage settings.
        estimator: gae | grpo | dr_grpo | rloo | reinforce_pp | reinforce_pp_baseline.
        group_size: N samples per prompt (consecutive in the batch).
        values: ``(B, S)`` critic values (gae).
        logp, logp_ref: ``(B, S)`` actor (old) and reference log-probs (KL), optional.
        kl_coef: the KL coefficient of this step (the adaptive controller's); default
            ``algo.kl_coef``.

    Returns:
        ``(fields, metrics)``: fields ``advantages``, ``returns`` (B, S) and
        ``processed_reward`` (B,); metrics of the reward and KL.
    """
    mask = batch.fields["response_mask"].bool()
    groups = batch.fields.get("prompt_index")
    coef = algo.kl_coef if kl_coef is None else kl_coef
    raw = raw_rewards.float()
    kl = None
    if logp is not None and logp_ref is not None:
        kl = rl.kl_estimate(logp, logp_ref, algo.kl_estimator, clamp=algo.kl_clamp) * mask
    if estimator == "rloo":
        seq = rl.clip_rewards(raw, algo.reward_clip)
        seq = rl.rloo_baseline_advantages(seq, group_size, group_ids=groups)
        seq = rl.shrink_negative_rewards(seq, algo.negative_reward_scale)
    else:
        # Dr.GRPO and REINFORCE++-baseline center without dividing by the std.
        seq = rl.process_rewards(raw, group_size, clip=algo.reward_clip,
                                 normalization=algo.reward_norm,
                                 scale_by_std=estimator not in ("dr_grpo",
                                                                "reinforce_pp_baseline"),
                                 unbiased_std=algo.unbiased_std, eps=algo.reward_norm_eps,
                                 shrink_alpha=algo.negative_reward_scale, group_ids=groups)
    kl_in_reward = kl is not None and algo.kl_in_reward and coef > 0
    if estimator == "gae":
        if values is None:
            raise ValueError("advantage_estimator=gae needs the critic's values (kind=ppo)")
        tok = rl.token_level_rewards(seq, mask, kl=kl if kl_in_reward else None, kl_coef=coef)
        adv, ret = rl.gae_advantages(tok, values, mask, gamma=algo.gamma, lam=algo.lam,
                                     whiten_advantages=algo.whiten_advantages)
    elif estimator in ("reinforce_pp", "reinforce_pp_baseline"):
        tok = rl.token_level_rewards(seq, mask, kl=kl if kl_in_reward else None, kl_coef=coef)
        adv, ret = rl.reinforce_pp_advantages(tok, mask, gamma=algo.gamma)
    elif estimator in ("grpo", "dr_grpo", "rloo"):
        adv = rl.grpo_advantages(seq, mask)
        if kl_in_reward:
            # The KL penalty per token, as a return-to-go added to the broadcast advantage.
            adv = adv + rl.discounted_returns(-coef * kl, mask, gamma=1.0)
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
