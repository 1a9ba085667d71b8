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


def sequence_tokens(job: JobConfig) -> tuple[int, str]:
    """The longest sequence (tokens) the job trains on or generates, and the fields that set
    it: the prompt plus a response (``rollout.max_new_tokens``) or an agent's whole trajectory
    (``rollout.agent.max_tokens``) for jobs that generate, ``train.max_seq_len`` for sft / rm.
    The one definition the rules, the planner and the rollout engine's context use."""
    d, r = job.data, job.rollout
    if job.kind in ("ppo", "grpo", "dpo") and r.agent is not None:
        return (d.max_prompt_len + r.agent.max_tokens,
                "data.max_prompt_len + rollout.agent.max_tokens = "
                f"{d.max_prompt_len} + {r.agent.max_tokens}")
    if job.kind in ("ppo", "grpo", "dpo", "bon"):
        return (d.max_prompt_len + r.max_new_tokens,
                f"data.max_prompt_len + rollout.max_new_tokens = {d.max_prompt_len} + "
                f"{r.max_new_tokens}")
    return job.train.max_seq_len, "train.max_seq_len"
