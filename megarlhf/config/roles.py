"""Which model roles a job starts and trains (read by the config rules and the trainers)."""

from __future__ import annotations

from megarlhf.config.schema import JobConfig, RoleConfig


def active_roles(job: JobConfig) -> dict[str, RoleConfig]:
    """The model roles this job runs, by name (actor first)."""
    roles: dict[str, RoleConfig] = {"actor": job.actor}
    if job.kind == "ppo":
        if job.critic is not None:
            roles["critic"] = job.critic
    if job.kind in ("ppo", "grpo", "dpo") and (
        job.kind == "dpo" or job.algorithm.kl_coef > 0 or job.algorithm.track_kl
    ):
        # Without a `reference:` section the reference runs like the actor (same layout and
        # micro-batching, frozen).
        roles["reference"] = job.reference or RoleConfig(
            parallel=job.actor.parallel, num_gpus=job.actor.num_gpus,
            micro_batch_size_per_rank=job.actor.micro_batch_size_per_rank,
            max_tokens_per_micro_batch=job.actor.max_tokens_per_micro_batch,
        )
    if job.kind in ("ppo", "grpo", "dpo", "bon") and "rm" in job.reward.sources:
        if job.reward_model is not None:
            roles["reward_model"] = job.reward_model
    return roles


def trained_roles(job: JobConfig) -> list[str]:
    if job.kind in ("sft", "rm"):
        return ["actor"]
    if job.kind == "ppo":
        return ["actor", "critic"]
    if job.kind in ("grpo", "dpo"):
        return ["actor"]
    return []
