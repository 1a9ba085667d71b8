"""Reward sources: verifiers (math answers, code in a sandbox) and their weighted mixtures.

Every source is a :class:`~megarlhf.rewards.base.RewardFn`: a batched callable
``(prompts, responses, metadata) -> list[float]``. The reward-model scorer (a Megatron model)
lives with the models and follows the same protocol.
"""

from megarlhf.rewards.base import RewardFn, batched, check_rewards
from megarlhf.rewards.mixture import RewardMixture

__all__ = ["RewardFn", "RewardMixture", "batched", "check_rewards"]
