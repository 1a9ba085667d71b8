"""The full pre-launch check of a job: config rules, model-aware rules, placement rules.

:func:`validate` is what every command and trainer runs before any process starts. It collects

* the rules the config alone shows (:func:`megarlhf.config.validate.config_errors`);
* the rules that need the model's architecture, read from its HF config (no weights): the
  attention heads and query groups of each role divisible by its ``tp`` (and the rollout's),
  the layers divisible by ``pp * vpp``, experts against ``ep``/``etp`` (mixture-of-experts),
  and a model the rollout engine can run (vLLM installed at the pinned version; on its CPU
  build, a supported head size and no latent attention);
* the placement rules, from the placement planner itself (:func:`plan_placement`): the roles
  fit the cluster with every TP group inside a node, and an asynchronous job's rollout runs on
  GPUs of its own (generation and training overlap in time, so they cannot take turns on
  shared GPUs; only ``cluster.placement: split`` gives the rollout its own pool today);

and raises one :class:`ConfigError` listing every violation, each naming the field and the fix.
"""

from __future__ import annotations

from typing import Any

from megarlhf.agents.env import EnvError, make_env_factory
from megarlhf.agents.openai_server import program_function
from megarlhf.config.base import ConfigError
from megarlhf.config.schema import JobConfig, ModelConfig
from megarlhf.config.validate import (
    active_roles,
    config_errors,
    generates,
    resolved_rollout_engine,
    sequence_tokens,
    vllm_runs_on_cpu,
    trained_roles,
)
from megarlhf.models.arch import ArchError, arch_summary
from megarlhf.planning.placement import PlacementError, plan_placement
from megarlhf.rollout.vllm_engine import (
    PINNED_VLLM_VERSION,
    VLLM_CPU_HEAD_SIZES,
    vllm_distribution_version,
    vllm_install_hint,
)


def validate(job: JobConfig) -> JobConfig:
    """Checks every rule (module docstring); raises one ConfigError listing all violations."""
    errors = config_errors(job) + model_errors(job) + placement_errors(job) + agent_errors(job)
    if errors:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(dict.fromkeys(errors)))
    return job


def model_errors(job: JobConfig) -> list[str]:
    """Layouts against the models' architectures (heads, query groups, layers)."""
    errors: list[str] = []
    arch_of: dict[int, dict[str, Any] | str] = {}

    def arch(model: ModelConfig, where: str) -> dict[str, Any] | None:
        if id(model) not in arch_of:
            try:
                arch_of[id(model)] = arch_summary(model)
            except ArchError as e:
                arch_of[id(model)] = str(e)
                errors.append(f"{where}: {e}")
        got = arch_of[id(model)]
        return got if isinstance(got, dict) else None

    trained = trained_roles(job)
    for name, role in active_roles(job).items():
        p = role.parallel
        model = job.role_model(name) if role.model is None else role.model
        a = arch(model, f"{name}.model")
        if a is None:
            continue
        mp = p.tp * p.pp * p.cp
        dp = p.dp if p.dp is not None else max(1, role.num_gpus // mp)
        _check_experts(name, p, model, a, dp, errors, trained=name in trained)
        heads, groups, layers = a["num_attention_heads"], a["num_query_groups"], a["num_layers"]
        if heads % p.tp:
            errors.append(f"{name}.parallel.tp = {p.tp} does not divide the model's {heads} "
                          f"attention heads; choose tp from {_divisors(heads)}")
        if groups % p.tp:
            errors.append(f"{name}.parallel.tp = {p.tp} does not divide the model's {groups} "
                          f"query groups (key/value heads); choose tp from {_divisors(groups)}")
        if layers % (p.pp * p.vpp):
            errors.append(f"{name}: the model's {layers} layers are not divisible by pp*vpp = "
                          f"{p.pp}*{p.vpp} = {p.pp * p.vpp}; choose pp*vpp from "
                          f"{_divisors(layers)}")
    _check_sequence_length(job, arch, errors)
    if job.kind in ("ppo", "grpo", "dpo", "bon"):
        a = arch(job.actor.model, "actor.model")
        tp = job.rollout.tp
        if a is not None and a["num_attention_heads"] % tp:
            errors.append(f"rollout.tp = {tp} does not divide the model's "
                          f"{a['num_attention_heads']} attention heads")
    if generates(job):
        policy = job.actor.model
        if job.kind == "rm" and job.reward.prm_label_rollouts:
            policy = None  # the labelling policy's directory is checked when it is loaded
        has_model = policy is not None and (policy.arch is not None or policy.hf_dir)
        _check_rollout_engine(job, arch(policy, "actor.model") if has_model else None, errors)
    return errors


def _check_sequence_length(job: JobConfig, arch, errors: list[str]) -> None:
    """No role sees a sequence longer than its model's positions (vLLM refuses such a
    max_model_len when its engine starts; a trained model has never seen those positions)."""
    n, fields = sequence_tokens(job)
    for name, role in active_roles(job).items():
        model = job.role_model(name) if role.model is None else role.model
        a = arch(model, f"{name}.model")
        if a is None or not a.get("max_position_embeddings"):
            continue
        limit = a["max_position_embeddings"]
        if n > limit:
            errors.append(
                f"{fields} = {n} tokens, but the {name}'s model has {limit} positions "
                f"(max_position_embeddings); shorten them to at most {limit} in all, or use a "
                "model with a longer context")
            return  # one message: the roles usually share the model


def _check_rollout_engine(job: JobConfig, arch: dict[str, Any] | None,
                          errors: list[str]) -> None:
    """vLLM's CPU build can run the model (whether vLLM is installed here is a question of the
    machine, not of the config: :func:`vllm_install_errors`, checked by preflight)."""
    if resolved_rollout_engine(job) != "vllm":
        return
    if arch is None or not vllm_runs_on_cpu(job):
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


def _check_experts(name: str, p, model: ModelConfig, arch: dict[str, Any], dp: int,
                   errors: list[str], *, trained: bool) -> None:
    """Expert parallelism against the model and the role's ranks (MoE models)."""
    experts = arch["num_experts"]
    etp = p.tp if p.etp is None else p.etp
    if not experts:
        if p.ep > 1 or p.etp is not None:
            errors.append(f"{name}.parallel: ep={p.ep}, etp={p.etp} split experts, but the model "
                          f"({arch['model_type']}) is dense; remove them (ep: 1, etp: null)")
        if model.moe_routing_replay:
            errors.append(f"{name}.model.moe_routing_replay=true needs a mixture-of-experts "
                          f"model; {arch['model_type']} is dense")
        return
    stage_ranks = p.tp * p.cp * dp
    if experts % p.ep:
        errors.append(f"{name}.parallel.ep = {p.ep} does not divide the model's {experts} "
                      f"experts; choose ep from {_divisors(experts)}")
    if stage_ranks % (etp * p.ep):
        errors.append(
            f"{name}.parallel: the experts are laid out on the {stage_ranks} ranks of each "
            f"pipeline stage (tp*cp*dp = {p.tp}*{p.cp}*{dp}) as etp*ep*edp, but etp*ep = "
            f"{etp}*{p.ep} = {etp * p.ep} does not divide {stage_ranks}; choose ep (and etp) so "
            "that it does, or give the role more GPUs")
    groups = arch.get("moe_groups", 1)
    if groups > 1 and experts % p.ep == 0:
        # Grouped routing exists to bound each token's experts to topk_group groups = devices
        # (or nodes): a group must be whole EP ranks, or an EP rank whole groups.
        per_group, per_rank = experts // groups, experts // p.ep
        if per_group % per_rank and per_rank % per_group:
            errors.append(
                f"{name}.parallel.ep = {p.ep}: the model routes in n_group = {groups} groups of "
                f"{per_group} experts (each token picks {arch['moe_group_topk']} groups, to "
                f"bound the devices it reaches), but ep = {p.ep} puts {per_rank} experts on each "
                "rank, so groups straddle ranks; choose ep so that groups are whole ranks or "
                f"ranks whole groups (ep dividing {groups}, or a multiple of it dividing "
                f"{experts})")
    shared = arch.get("moe_shared_ffn_hidden_size", 0)
    if shared and shared % p.tp:
        errors.append(f"{name}.parallel.tp = {p.tp} does not divide the shared experts' width "
                      f"{shared} (n_shared_experts * moe_intermediate_size); choose tp from "
                      f"{_divisors(shared)}")
    if arch["moe_ffn_hidden_size"] % etp:
        errors.append(f"{name}.parallel.etp = {etp} does not divide the experts' width "
                      f"{arch['moe_ffn_hidden_size']}; choose etp from "
                      f"{_divisors(arch['moe_ffn_hidden_size'])}")
    if trained and p.tp > 1 and not p.sequence_parallel:
        errors.append(f"{name}.parallel: a mixture-of-experts model trained with tp = {p.tp} "
                      "needs sequence parallelism (megatron routes each TP rank's share of the "
                      f"sequence); set {name}.parallel.sequence_parallel=true")
    if model.moe_token_dispatcher == "allgather" and p.pp > 1:
        errors.append(f"{name}.model.moe_token_dispatcher=allgather cannot run pipeline "
                      f"parallelism (pp = {p.pp}): micro-batches differ in length and megatron's "
                      "allgather dispatcher needs one; use alltoall (the default, also on CPU)")




def agent_errors(job: JobConfig) -> list[str]:
    """``rollout.agent.env`` names an environment class that takes ``rollout.agent.options``
    (imported on this machine, as the driver will)."""
    a = job.rollout.agent
    if a is None:
        return []
    try:
        if a.program:
            program_function(a.program)
        else:
            make_env_factory(a.env, dict(a.options))
    except EnvError as e:
        return [str(e)]
    return []


def placement_errors(job: JobConfig) -> list[str]:
    """The planner's verdict on the job's placement, and the asynchronous placement rule."""
    try:
        plan = plan_placement(job)
    except PlacementError as e:
        return [str(e)]
    errors: list[str] = []
    if job.asynchronous.enabled and "rollout" in plan.roles:
        shared = plan.colocated_with("rollout")
        if shared:
            errors.append(
                f"asynchronous.enabled runs generation and training at the same time, but "
                f"cluster.placement={job.cluster.placement} puts the rollout on the GPUs of "
                f"{', '.join(shared)}; set cluster.placement=split (the rollout on GPUs of its "
                "own)")
    return errors


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def vllm_install_errors(job: JobConfig) -> list[str]:
    """The pinned vLLM is installed on this machine when the job's rollout needs it (``train``
    and ``validate`` refuse without it; ``plan``, often run elsewhere than the job, notes it)."""
    import importlib.util

    if not generates(job) or resolved_rollout_engine(job) != "vllm":
        return []
    if importlib.util.find_spec("vllm") is None:
        return [f"rollout.engine=vllm: {vllm_install_hint()}"]
    installed = vllm_distribution_version()
    if installed is not None and installed != PINNED_VLLM_VERSION:
        return [f"rollout.engine=vllm: vLLM {installed} is installed, but megarlhf follows "
                f"vLLM {PINNED_VLLM_VERSION}'s API exactly; {vllm_install_hint()}"]
    return []
