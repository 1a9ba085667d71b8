"""The RL math of megarlhf: pure functions on tensors (no torch.distributed, no I/O).

methods.md 2.2 reward processing (:mod:`.rewards`, :mod:`.kl`), 2.3 advantages
(:mod:`.advantages`), 2.4 and 3 losses (:mod:`.losses`), 1.1-1.2 reward-model losses
(:mod:`.rm_losses`). Token tensors are ``(B, T)`` with a response mask; packed rows add
``segment_ids`` (see :mod:`._segments`). All math runs in fp32 whatever the input dtype.
"""

from megarlhf.rl._groups import group_index, group_sizes
from megarlhf.rl._segments import broadcast_to_tokens
from megarlhf.rl.advantages import (
    discounted_returns,
    dr_grpo_advantages,
    gae_advantages,
    grpo_advantages,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
    rloo_baseline_advantages,
    whiten,
)
from megarlhf.rl.kl import KL_ESTIMATORS, adaptive_kl_coef, kl_estimate, kl_k1, kl_k2, kl_k3
from megarlhf.rl.losses import (
    AGG_MODES,
    OFF_POLICY_CORRECTIONS,
    aggregate,
    aggregate_normalizer,
    cispo_loss,
    dpo_loss,
    entropy_loss,
    explained_variance,
    gspo_loss,
    kl_loss,
    off_policy_weights,
    policy_loss,
    select_dpo_pairs,
    sequence_logprobs,
    truncated_is_weights,
    value_loss,
)
from megarlhf.rl.rewards import (
    KL_MODES,
    NORMALIZATIONS,
    clip_rewards,
    informative_groups,
    normalize_rewards,
    overlong_penalty,
    process_rewards,
    rewards_with_kl,
    shrink_negative_rewards,
    token_level_rewards,
)
from megarlhf.rl.rm_losses import (
    KIND_BINARY,
    KIND_CHOSEN,
    KIND_IGNORE,
    KIND_REJECTED,
    binary_accuracy,
    binary_auc,
    binary_ce_loss,
    bradley_terry_loss,
    orm_multitask_loss,
    pairwise_accuracy,
    prm_sequence_score,
    prm_step_loss,
)

__all__ = [
    # rewards and KL (methods.md 2.2)
    "clip_rewards", "normalize_rewards", "shrink_negative_rewards", "process_rewards",
    "token_level_rewards", "rewards_with_kl", "NORMALIZATIONS", "KL_MODES",
    "overlong_penalty", "informative_groups",
    "kl_k1", "kl_k2", "kl_k3", "kl_estimate", "KL_ESTIMATORS", "adaptive_kl_coef",
    # groups (equal or unequal size)
    "group_index", "group_sizes",
    # advantages (2.3)
    "gae_advantages", "discounted_returns", "whiten", "grpo_advantages", "dr_grpo_advantages",
    "rloo_advantages", "rloo_baseline_advantages", "reinforce_pp_advantages",
    "reinforce_pp_baseline_advantages", "broadcast_to_tokens",
    # losses (2.4, 3)
    "aggregate", "aggregate_normalizer", "AGG_MODES", "policy_loss", "gspo_loss", "cispo_loss",
    "value_loss", "explained_variance", "entropy_loss", "kl_loss", "truncated_is_weights",
    "off_policy_weights", "OFF_POLICY_CORRECTIONS", "sequence_logprobs", "dpo_loss",
    "select_dpo_pairs",
    # reward models (1.1, 1.2)
    "KIND_IGNORE", "KIND_BINARY", "KIND_CHOSEN", "KIND_REJECTED", "bradley_terry_loss",
    "binary_ce_loss", "orm_multitask_loss", "prm_step_loss", "prm_sequence_score",
    "pairwise_accuracy", "binary_accuracy", "binary_auc",
]
