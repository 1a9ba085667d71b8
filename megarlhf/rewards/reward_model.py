"""Reward-model inputs and scores: one builder and one scorer for RM training, RL and best-of-N.

A reward model sees a text the same way wherever it scores it::

    ids = prompt_ids + encode(response) + [EOS]        all in the reward model's own tokenizer

* ``prompt_ids``: the prompt through the RM tokenizer's chat template (``data.apply_chat_template``;
  :func:`~megarlhf.data.job_data.prompt_token_ids`), the same as for any model of the job;
* ``encode(response)``: the response *text*. RL decodes the policy's sampled ids first: the
  reward model's tokenizer may differ from the policy's, and policy ids are meaningless to it;
* ``EOS``: always appended, to truncated samples too, so the score is read at the same place
  whatever ended the response.

Read positions (:attr:`~megarlhf.data.rm_datasets.RMInput.read_pos`): an outcome model (ORM) is read at the last token (the
EOS); a process model (PRM) at the last token of every step (where the step's delimiter ends,
:func:`~megarlhf.data.datasets.tokenize_response_steps`) and the final step at the EOS, so a
PRM's last-step score is read where an ORM's is. A PRM's sequence score aggregates its step
probabilities by ``reward.prm_aggregation`` (:func:`megarlhf.rl.rm_losses.prm_sequence_score`).

:func:`~megarlhf.data.rm_datasets.rm_input` is the builder (RM training builds its sequences
with it); :class:`RewardModelScorer` scores (prompt, response text) pairs through a reward-model worker
group, for RL (:class:`~megarlhf.rewards.computer.RewardComputer`) and best-of-N.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from megarlhf.config import ConfigError, JobConfig
from megarlhf.data.datasets import Source
from megarlhf.data.job_data import prompt_token_ids
from megarlhf.data.rm_datasets import RMData, RMInput, rm_input
from megarlhf.engine.batch import TokenBatch
from megarlhf.rl import rm_losses


def score_sequences(group, seqs: Sequence[Sequence[int]], pad_id: int, chunk: int = 512
                    ) -> list[Tensor]:
    """The scalar head's output at every token of each sequence, through the worker group.

    Returns:
        per sequence a ``(len,)`` fp32 tensor (``values[t]`` = the score read at token t).
    """
    out: list[Tensor] = []
    dp = max(1, group.dp_size)
    for lo in range(0, len(seqs), chunk):
        part = [list(s) for s in seqs[lo:lo + chunk]]
        padded = part + [part[-1]] * (-len(part) % dp)  # DP_SPLIT needs B % dp == 0
        batch = TokenBatch.from_sequences(padded, pad_id=pad_id)
        values = group.forward(batch)["values"]  # (B, S)
        out.extend(values[i, :len(s)].float().clone() for i, s in enumerate(part))
    return out


def sequence_scores(values: Sequence[Tensor], inputs: Sequence[RMInput], *, prm: bool,
                    aggregation: str = "last") -> Tensor:
    """``(B,)`` sequence scores from per-token values: an ORM's logit at the EOS; a PRM's
    ``aggregation`` of its step probabilities (in [0, 1])."""
    if not prm:
        return torch.stack([v[x.read_pos[-1]] for v, x in zip(values, inputs)]).float()
    S = max(len(v) for v in values)
    vals = torch.zeros(len(values), S)
    mask = torch.zeros(len(values), S, dtype=torch.bool)
    for i, (v, x) in enumerate(zip(values, inputs)):
        vals[i, :len(v)] = v
        mask[i, list(x.read_pos)] = True
    return rm_losses.prm_sequence_score(vals, mask, aggregation)


class RewardModelScorer:
    """Scores (prompt, response text) pairs with a reward model (module docstring).

    Args:
        job: ``reward.rm_type``, ``reward.prm_step_delimiter``, ``reward.prm_aggregation`` and
            the prompt settings (``data.apply_chat_template``, ``data.max_prompt_len``).
        group: the reward model's worker group (``forward(batch)["values"]``, ``dp_size``).
        tokenizer: the reward model's tokenizer.
    """

    def __init__(self, job: JobConfig, group, tokenizer):
        self.job = job
        self.group = group
        self.tokenizer = tokenizer
        self.prm = job.reward.rm_type == "prm"
        self._prompt_ids: dict[str, list[int]] = {}

    def prompt_ids(self, prompt: Any) -> list[int]:
        """The prompt (text or chat messages) in the reward model's tokenizer (cached)."""
        key = prompt if isinstance(prompt, str) else repr(prompt)
        if key not in self._prompt_ids:
            ids = prompt_token_ids(self.job, self.tokenizer, prompt, Source("<prompt>"))
            if ids is None:
                raise ConfigError("a prompt is over data.max_prompt_len in the reward model's "
                                  "tokenizer; raise data.max_prompt_len")
            self._prompt_ids[key] = ids
        return self._prompt_ids[key]

    def inputs(self, prompts: Sequence[Any], responses: Sequence[str]) -> list[RMInput]:
        """One :class:`RMInput` per (prompt, response) pair."""
        r = self.job.reward
        try:
            return [rm_input(self.tokenizer, self.prompt_ids(p), t, prm=self.prm,
                             delimiter=r.prm_step_delimiter)
                    for p, t in zip(prompts, responses, strict=True)]
        except ValueError as e:
            raise ConfigError(f"reward.prm_step_delimiter: {e}") from None

    def __call__(self, prompts: Sequence[Any], responses: Sequence[str]) -> Tensor:
        """``(B,)`` fp32 scores of ``responses[i]`` to ``prompts[i]``."""
        inputs = self.inputs(prompts, responses)
        values = score_sequences(self.group, [x.ids for x in inputs], self.tokenizer.pad_id)
        return sequence_scores(values, inputs, prm=self.prm,
                               aggregation=self.job.reward.prm_aggregation)


# ------------------------------------------------------------------ held-out evaluation
def evaluate_rm(group, job: JobConfig, data: RMData, pad_id: int) -> dict[str, float]:
    """Scores ``data`` through ``group`` and returns :func:`rm_eval_metrics`."""
    seqs = [s.ids for pr in data.pairs for s in pr] + [s.ids for s in data.labelled]
    return rm_eval_metrics(job, data, score_sequences(group, seqs, pad_id))


def rm_eval_metrics(job: JobConfig, data: RMData, values: list[Tensor]
                    ) -> dict[str, float]:
    """Held-out metrics from the per-token values of ``data``'s sequences (pairs first, in
    order, then labelled rows), computed with :mod:`megarlhf.rl.rm_losses`: pairs compare the
    logits at the EOS (the outcome score); labelled rows use :func:`sequence_scores`."""
    prm = job.reward.rm_type == "prm"
    m: dict[str, float] = {}
    P = len(data.pairs)
    if P:
        chosen = torch.stack([values[2 * i][-1] for i in range(P)])
        rejected = torch.stack([values[2 * i + 1][-1] for i in range(P)])
        m["rm/eval_pair_accuracy"] = float(rm_losses.pairwise_accuracy(chosen, rejected))
        m["rm/eval_chosen_reward"] = float(chosen.mean())
        m["rm/eval_rejected_reward"] = float(rejected.mean())
        m["rm/eval_reward_margin"] = float((chosen - rejected).mean())
        m["rm/eval_loss_pref"] = float(rm_losses.bradley_terry_loss(chosen, rejected))
    lab = values[2 * P:]
    if lab:
        labels = torch.tensor([float(s.label or 0) for s in data.labelled])
        if prm:
            scores = sequence_scores(lab, data.labelled, prm=True,
                                     aggregation=job.reward.prm_aggregation)
            thr = 0.5
            with_steps = [(v, s) for v, s in zip(lab, data.labelled) if s.step_labels]
            if with_steps:
                S = max(len(v) for v, _ in with_steps)
                vals = torch.zeros(len(with_steps), S)
                mask = torch.zeros_like(vals, dtype=torch.bool)
                ys = torch.zeros_like(vals)
                for i, (v, s) in enumerate(with_steps):
                    vals[i, :len(v)] = v
                    for pos, y in zip(s.step_pos, s.step_labels):
                        mask[i, pos], ys[i, pos] = True, y
                loss, sm = rm_losses.prm_step_loss(vals, mask, ys, label_type=job.reward.prm_label_type)
                m["rm/eval_loss_step"] = float(loss)
                m["rm/eval_step_accuracy"] = float(sm["step_accuracy"])
        else:
            scores = sequence_scores(lab, data.labelled, prm=False)
            thr = 0.0
            m["rm/eval_loss_bin"] = float(rm_losses.binary_ce_loss(scores, labels))
        m["rm/eval_binary_accuracy"] = float(rm_losses.binary_accuracy(scores, labels, threshold=thr))
        auc = float(rm_losses.binary_auc(scores, labels))
        if auc == auc:  # NaN when one class is absent
            m["rm/eval_binary_auc"] = auc
        pos, neg = scores[labels >= 0.5], scores[labels < 0.5]
        if pos.numel():
            m["rm/eval_positive_reward"] = float(pos.mean())
        if neg.numel():
            m["rm/eval_negative_reward"] = float(neg.mean())
    return m
