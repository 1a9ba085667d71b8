"""Sequence rewards for a rollout batch: verifiers, sandboxed code tests, a reward model, or a mix.

``reward.sources`` weights the sources (methods.md 2.2 step 1: "raw reward r from the RM, or a
verifier, or a weighted mix"). Text sources (math, code) see the decoded response; the reward
model scores the token sequence itself: its scalar head read at the last token (ORM), or at the
step-delimiter tokens aggregated by ``reward.prm_aggregation`` (PRM).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from megarlhf.config import JobConfig
from megarlhf.data.job_data import PromptItem
from megarlhf.engine.batch import TokenBatch


class RewardComputer:
    """Computes raw rewards (B,) and per-source means for a rollout batch."""

    def __init__(self, job: JobConfig, tokenizer, reward_group=None):
        self.job = job
        self.tokenizer = tokenizer
        self.reward_group = reward_group
        self.text_sources: dict[str, Any] = {}
        for name in job.reward.sources:
            if name == "math":
                from megarlhf.rewards.math_verify import MathVerifier

                self.text_sources[name] = MathVerifier(answer_key="answer")
            elif name == "code":
                from megarlhf.rewards.code_sandbox import CodeSandboxReward, SandboxLimits

                self.text_sources[name] = CodeSandboxReward(
                    SandboxLimits(timeout_s=job.reward.code_timeout_s))
            elif name == "rm" and reward_group is None:
                raise ValueError("reward.sources uses 'rm' but no reward_model group was started")

    def rm_scores(self, batch: TokenBatch) -> Tensor:
        """The reward model's score of each sequence (B,)."""
        values = self.reward_group.forward(batch)["values"]  # (B, S)
        lengths = batch.lengths
        if self.job.reward.rm_type == "orm":
            return values[torch.arange(values.shape[0]), lengths - 1]
        from megarlhf.rl.rm_losses import prm_sequence_score

        step_mask = self.step_mask(batch)
        return prm_sequence_score(values, step_mask, self.job.reward.prm_aggregation)

    def step_mask(self, batch: TokenBatch) -> Tensor:
        """PRM read positions: the last token of every step of each response (B, S)."""
        delim = self.job.reward.prm_step_delimiter
        ids = self.tokenizer.encode(delim)
        delim_id = ids[-1] if ids else None
        resp = batch.fields["response_mask"].bool()
        mask = torch.zeros_like(resp)
        if delim_id is not None:
            mask |= resp & (batch.input_ids == delim_id)
        last = batch.lengths - 1
        mask[torch.arange(mask.shape[0]), last] = True  # the final step ends at the last token
        return mask & batch.attention_mask

    def __call__(self, prompts: list[PromptItem], batch: TokenBatch,
                 responses: list[list[int]]) -> tuple[Tensor, dict[str, float]]:
        idx = batch.fields["prompt_index"].tolist()
        texts = [self.tokenizer.decode(r) for r in responses]
        meta = [dict(prompts[i].metadata, answer=prompts[i].answer) for i in idx]
        ptexts = [prompts[i].text for i in idx]
        total = torch.zeros(len(texts))
        metrics: dict[str, float] = {}
        for name, w in self.job.reward.sources.items():
            if name == "rm":
                r = self.rm_scores(batch).float()
            else:
                r = torch.tensor(self.text_sources[name](ptexts, texts, meta), dtype=torch.float32)
            metrics[f"reward/{name}_mean"] = float(r.mean())
            if name == "math":
                metrics["reward/accuracy"] = float((r > 0.5).float().mean())
            total += w * r
        return total, metrics
