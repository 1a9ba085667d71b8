"""Sequence rewards for a rollout: verifiers, sandboxed code tests, a reward model, or a mix.

``reward.sources`` weights the sources (methods.md 2.2 step 1: "raw reward r from the RM, or a
verifier, or a weighted mix"). Every source sees the decoded response text: the verifiers check
it, and the reward model scores ``prompt + response + EOS`` re-encoded in its own tokenizer
(:mod:`megarlhf.rewards.reward_model`, the same inputs and read positions as in RM training and
best-of-N).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from megarlhf.config import JobConfig
from megarlhf.data.job_data import PromptItem
from megarlhf.rewards.code_sandbox import CodeSandboxReward, SandboxLimits
from megarlhf.rewards.math_verify import MathVerifier
from megarlhf.rewards.reward_model import RewardModelScorer


class RewardComputer:
    """Raw rewards ``(B,)`` of responses and their per-source means.

    Args:
        job: ``reward.sources`` (weights) and the sources' settings.
        reward_model: the scorer of the ``rm`` source (None when the job has none).
    """

    def __init__(self, job: JobConfig, reward_model: RewardModelScorer | None = None):
        self.job = job
        self.reward_model = reward_model
        self.text_sources: dict[str, Any] = {}
        for name in job.reward.sources:
            if name == "math":
                self.text_sources[name] = MathVerifier(answer_key="answer")
            elif name == "code":
                self.text_sources[name] = CodeSandboxReward(
                    SandboxLimits(timeout_s=job.reward.code_timeout_s))
            elif name == "rm" and reward_model is None:
                raise ValueError("reward.sources uses 'rm' but no reward model scorer was given "
                                 "(no reward_model group was started)")

    def __call__(self, prompts: Sequence[PromptItem], responses: Sequence[str],
                 env_rewards: Sequence[float] | None = None) -> tuple[Tensor, dict[str, float]]:
        """Rewards of ``responses[i]``, a response to ``prompts[i]`` (``env_rewards[i]``: the
        environment's reward of an agent's trajectory, the ``env`` source).

        Returns:
            ``(raw, metrics)``: the weighted sum over the sources ``(B,)`` fp32, and
            ``reward/<source>_mean`` (plus ``reward/accuracy`` for the math verifier).
        """
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
        total = torch.zeros(len(responses))
        metrics: dict[str, float] = {}
        for name, w in self.job.reward.sources.items():
            if name == "env":
                if env_rewards is None or len(env_rewards) != len(responses):
                    raise ValueError("reward.sources uses 'env' but the samples carry no "
                                     "environment rewards (rollout.agent is not set)")
                r = torch.tensor([float(x) for x in env_rewards], dtype=torch.float32)
            else:
                r = self.source_rewards(name, prompts, responses)
            metrics[f"reward/{name}_mean"] = float(r.mean())
            if name == "math":
                metrics["reward/accuracy"] = float((r > 0.5).float().mean())
            total += w * r
        return total, metrics

    def source_rewards(self, name: str, prompts: Sequence[PromptItem],
                       responses: Sequence[str]) -> Tensor:
        """``(B,)`` fp32 rewards of one source."""
        if name == "rm":
            return self.reward_model([p.prompt for p in prompts], responses).float()
        meta = [dict(p.metadata, answer=p.answer) for p in prompts]
        scores = self.text_sources[name]([p.text for p in prompts], list(responses), meta)
        return torch.tensor(scores, dtype=torch.float32)
