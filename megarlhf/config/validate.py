"""Rules that relate several config components, checked before any process starts.

:func:`validate` collects every violation and raises one :class:`ConfigError` listing them all,
each naming the field and the change that fixes it.
"""

from __future__ import annotations

from typing import Any

from megarlhf.config.base import ConfigError
from megarlhf.config.rules import extra_rule_errors
from megarlhf.config.schema import JobConfig, ModelConfig, RoleConfig


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


def global_batch_sequences(job: JobConfig) -> int:
    """Sequences per optimizer step for the trained roles."""
    if job.kind in ("sft", "rm"):
        return job.train.global_batch_size
    if job.kind == "dpo":
        # Online DPO trains on one (chosen, rejected) pair per prompt.
        return job.batch.train_prompts_global * 2
    return job.batch.train_samples_global


def _arch_numbers(model: ModelConfig) -> dict[str, Any] | None:
    """Heads, query groups and layers of a model, read from its HF config (cheap, no weights)."""
    from megarlhf.models.arch import ArchError, arch_summary

    try:
        return arch_summary(model)
    except ArchError as e:
        raise ConfigError(str(e)) from None


def _check_role(name: str, role: RoleConfig, model: ModelConfig, errors: list[str],
                batch_sequences: int | None) -> None:
    p = role.parallel
    if p.cp > 1:
        errors.append(
            f"{name}.parallel.cp = {p.cp}: context parallelism is not supported by megarlhf's "
            "engine yet (splitting sequences over CP ranks is not implemented); set "
            f"{name}.parallel.cp=1 and use tensor/pipeline parallelism for long sequences")
        return
    mp = p.tp * p.pp * p.cp
    if p.dp is not None:
        if mp * p.dp != role.num_gpus:
            errors.append(
                f"{name}.parallel: tp*pp*cp*dp = {p.tp}*{p.pp}*{p.cp}*{p.dp} = {mp * p.dp} but "
                f"{name}.num_gpus = {role.num_gpus}; they must be equal (set {name}.parallel.dp="
                f"{role.num_gpus // mp if role.num_gpus % mp == 0 else 'null'} or change "
                f"{name}.num_gpus)"
            )
            return
    elif role.num_gpus % mp:
        errors.append(
            f"{name}.num_gpus = {role.num_gpus} is not divisible by tp*pp*cp = {p.tp}*{p.pp}*{p.cp}"
            f" = {mp}; give the role a multiple of {mp} GPUs or shrink its tp/pp/cp"
        )
        return
    dp = p.dp if p.dp is not None else role.num_gpus // mp

    arch = _arch_numbers(model)
    if arch is not None:
        heads, groups, layers = arch["num_attention_heads"], arch["num_query_groups"], \
            arch["num_layers"]
        if heads % p.tp:
            errors.append(
                f"{name}.parallel.tp = {p.tp} does not divide the model's {heads} attention heads;"
                f" choose tp from {_divisors(heads)}"
            )
        if groups % p.tp:
            errors.append(
                f"{name}.parallel.tp = {p.tp} does not divide the model's {groups} query groups "
                f"(key/value heads); choose tp from {_divisors(groups)}"
            )
        if layers % (p.pp * p.vpp):
            errors.append(
                f"{name}: the model's {layers} layers are not divisible by pp*vpp = "
                f"{p.pp}*{p.vpp} = {p.pp * p.vpp}; choose pp*vpp from {_divisors(layers)}"
            )
    if batch_sequences is not None:
        per_step = dp * role.micro_batch_size_per_rank
        if role.max_tokens_per_micro_batch is None and batch_sequences % per_step:
            errors.append(
                f"{name}: the global batch of {batch_sequences} sequences is not divisible by "
                f"dp*micro_batch_size_per_rank = {dp}*{role.micro_batch_size_per_rank} = "
                f"{per_step}; change {name}.micro_batch_size_per_rank or the batch size"
            )
        elif batch_sequences % dp:
            errors.append(
                f"{name}: the global batch of {batch_sequences} sequences is not divisible by "
                f"the data-parallel size {dp}"
            )


def generates(job: JobConfig) -> bool:
    """The job runs a rollout engine (RL, best-of-N, or automatic PRM step labels)."""
    return job.kind in ("ppo", "grpo", "dpo", "bon") or (
        job.kind == "rm" and job.reward.prm_label_rollouts > 0)


def resolved_rollout_engine(job: JobConfig) -> str:
    """What ``rollout.engine`` means on this machine: "vllm" or "hf" ("auto": vLLM wherever it
    is installed, its CPU build included)."""
    import importlib.util

    if job.rollout.engine != "auto":
        return job.rollout.engine
    return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"


def _vllm_runs_on_cpu(job: JobConfig) -> bool:
    """vLLM will run on CPU: the cluster says so, or the installed vLLM is the CPU build."""
    from importlib.metadata import PackageNotFoundError, version

    if job.cluster.device == "cpu":
        return True
    if job.cluster.device == "cuda":
        return False
    try:
        version("vllm-cpu")
    except PackageNotFoundError:
        return False
    return True


def _check_rollout_engine(job: JobConfig, arch: dict[str, Any] | None,
                          errors: list[str]) -> None:
    """vLLM is installed when asked for, and its CPU build can run the model."""
    import importlib.util

    from megarlhf.rollout.vllm_engine import (
        PINNED_VLLM_VERSION,
        VLLM_CPU_HEAD_SIZES,
        vllm_distribution_version,
        vllm_install_hint,
    )

    if resolved_rollout_engine(job) != "vllm":
        return
    if importlib.util.find_spec("vllm") is None:
        errors.append(f"rollout.engine=vllm: {vllm_install_hint()}")
        return
    installed = vllm_distribution_version()
    if installed is not None and installed != PINNED_VLLM_VERSION:
        errors.append(f"rollout.engine=vllm: vLLM {installed} is installed, but megarlhf follows "
                      f"vLLM {PINNED_VLLM_VERSION}'s API exactly; {vllm_install_hint()}")
    if arch is None or not _vllm_runs_on_cpu(job):
        return
    if arch["mla"]:
        errors.append("rollout.engine: vLLM's CPU backend does not run multi-head latent "
                      "attention (this model has kv_lora_rank); run it on GPUs or set "
                      "rollout.engine=hf")
    if arch["head_dim"] not in VLLM_CPU_HEAD_SIZES:
        errors.append(
            f"rollout.engine: vLLM's CPU attention runs head sizes {list(VLLM_CPU_HEAD_SIZES)}, "
            f"but this model's head_dim is {arch['head_dim']} (hidden_size "
            f"{arch['hidden_size']} / {arch['num_attention_heads']} heads); change the model "
            "(e.g. fewer heads: actor.model.arch.num_attention_heads) or set rollout.engine=hf "
            "(the transformers engine)")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def validate(job: JobConfig) -> JobConfig:
    """Checks every cross-component rule; raises one ConfigError listing all violations."""
    errors: list[str] = []
    trained = trained_roles(job)
    batch_seqs = global_batch_sequences(job)

    if job.kind == "ppo" and job.critic is None:
        errors.append("kind=ppo needs a critic: add a `critic:` section (e.g. critic: "
                      "{num_gpus: 1}); its model defaults to the actor's")
    if "rm" in job.reward.sources and job.kind in ("ppo", "grpo", "dpo", "bon") \
            and job.reward_model is None:
        errors.append("reward.sources uses 'rm' but there is no `reward_model:` section; add one "
                      "(reward_model.model.hf_dir or .checkpoint) or drop 'rm' from the sources")
    if job.kind == "rm" and job.reward.rm_type not in ("orm", "prm"):
        errors.append("kind=rm needs reward.rm_type orm or prm")

    roles = active_roles(job)
    for name, role in roles.items():
        model = job.role_model(name) if role.model is None else role.model
        _check_role(name, role, model, errors, batch_seqs if name in trained else None)

    if job.kind in ("ppo", "grpo", "dpo", "bon"):
        r = job.rollout
        if r.num_gpus % r.tp:
            errors.append(f"rollout.num_gpus = {r.num_gpus} is not divisible by rollout.tp = "
                          f"{r.tp}; each replica needs rollout.tp GPUs")
        arch = _arch_numbers(job.actor.model)
        if arch is not None and arch["num_attention_heads"] % r.tp:
            errors.append(f"rollout.tp = {r.tp} does not divide the model's "
                          f"{arch['num_attention_heads']} attention heads")
        if job.kind in ("ppo", "grpo", "dpo") and r.temperature == 0:
            errors.append("rollout.temperature = 0 (greedy) gives identical samples; RL needs "
                          "sampling: set rollout.temperature > 0 (e.g. 1.0)")
        if job.kind == "dpo" and job.batch.n_samples_per_prompt < 2:
            errors.append("kind=dpo ranks several samples per prompt: set "
                          "batch.n_samples_per_prompt >= 2")
    if generates(job):
        policy = job.actor.model
        if job.kind == "rm" and job.reward.prm_label_rollouts:
            policy = None  # the labelling policy's directory is checked when it is loaded
        _check_rollout_engine(job, _arch_numbers(policy) if policy is not None and (
            policy.arch is not None or policy.hf_dir) else None, errors)

    # GPU budget by placement.
    c = job.cluster
    rl = job.kind in ("ppo", "grpo", "dpo", "bon")
    sizes = {n: r.num_gpus for n, r in roles.items()}
    if rl:
        sizes["rollout"] = job.rollout.num_gpus
    if c.placement == "colocate_all":
        need = max(sizes.values())
    elif c.placement == "split":
        need = sum(sizes.values())
    else:
        first = max(sizes.get(n, 0) for n in ("actor", "reference", "rollout"))
        second = max([sizes.get(n, 0) for n in ("critic", "reward_model")] + [0])
        need = first + second
    if need > c.total_gpus:
        errors.append(
            f"placement {c.placement} needs {need} GPUs ({sizes}) but the cluster has "
            f"num_nodes*gpus_per_node = {c.num_nodes}*{c.gpus_per_node} = {c.total_gpus}; "
            "add nodes, shrink the roles' num_gpus, or colocate roles"
        )

    if job.asynchronous.enabled:
        if job.kind not in ("ppo", "grpo", "dpo"):
            errors.append("asynchronous.enabled applies to ppo, grpo and dpo jobs only")
        if c.placement == "colocate_all":
            errors.append("asynchronous.enabled overlaps generation and training on separate "
                          "GPUs: set cluster.placement=split (or colocate_pairs)")
        if not job.algorithm.use_behaviour_logprobs:
            errors.append("asynchronous.enabled needs algorithm.use_behaviour_logprobs=true "
                          "(PPO ratios must use the generator's log-probs off-policy)")

    _check_reward_model_jobs(job, errors)
    errors[:0] = extra_rule_errors(job)  # issue 15: arch typos, unused roles, fp8, batch sizes

    if errors:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))
    return job


def _check_reward_model_jobs(job: JobConfig, errors: list[str]) -> None:
    """Rules of reward-model training (kind=rm) and best-of-N evaluation (kind=bon)."""
    d, r = job.data, job.reward
    if job.kind == "rm":
        if not d.preference_path and not d.labelled_path:
            errors.append("kind=rm needs training data: set data.preference_path (prompt, chosen, "
                          "rejected rows) and/or data.labelled_path (prompt, response, label rows)")
        if r.rm_type == "prm" and not d.labelled_path:
            errors.append("reward.rm_type=prm trains per-step scores on labelled responses: set "
                          "data.labelled_path (rows with step_labels, or set "
                          "reward.prm_label_rollouts to label the steps automatically)")
        if r.prm_label_rollouts and r.rm_type != "prm":
            errors.append(f"reward.prm_label_rollouts={r.prm_label_rollouts} labels PRM steps but "
                          "reward.rm_type=orm; set reward.rm_type=prm or "
                          "reward.prm_label_rollouts=0")
        if r.prm_label_rollouts and not (r.prm_label_policy or job.actor.model.hf_dir):
            errors.append("reward.prm_label_rollouts needs a policy to roll out: set "
                          "reward.prm_label_policy (an HF model directory, e.g. the SFT model) or "
                          "start the reward model from one (actor.model.hf_dir)")
        if job.train.eval_every and not (d.eval_preference_path or d.eval_labelled_path):
            errors.append(f"train.eval_every={job.train.eval_every} evaluates the reward model on "
                          "held-out data: set data.eval_preference_path and/or "
                          "data.eval_labelled_path, or train.eval_every=0")
        if d.preference_path:
            # (chosen, rejected) rows are adjacent and must stay in one micro-batch and shard.
            a = job.actor
            dp = a.parallel.dp or max(1, a.num_gpus // (a.parallel.tp * a.parallel.pp
                                                         * a.parallel.cp))
            gbs = job.train.global_batch_size
            if gbs % (2 * dp):
                errors.append(f"kind=rm with preference pairs: train.global_batch_size={gbs} must "
                              f"be a multiple of 2 * data-parallel size = {2 * dp} (each rank "
                              "trains whole (chosen, rejected) pairs)")
            if a.max_tokens_per_micro_batch is None and a.micro_batch_size_per_rank % 2:
                errors.append(f"kind=rm with preference pairs: actor.micro_batch_size_per_rank="
                              f"{a.micro_batch_size_per_rank} must be even (a pair's two "
                              "sequences share a micro-batch)")
    if job.kind == "bon":
        if job.reward_model is None:
            errors.append("kind=bon scores samples with a reward model: add a `reward_model:` "
                          "section (reward_model.model.hf_dir = an exported reward model)")
        if "rm" not in r.sources:
            errors.append("kind=bon ranks samples by the reward model: reward.sources must "
                          "include rm (e.g. reward.sources={rm: 1.0})")
        if not job.actor.model.hf_dir:
            errors.append("kind=bon samples from a trained policy: set actor.model.hf_dir (an HF "
                          "model directory, e.g. <sft output_dir>/hf)")
        if not d.eval_path:
            errors.append("kind=bon evaluates on test prompts with answers: set data.eval_path")
