"""The full pre-launch check of a job: config rules, model-aware rules, placement rules.

:func:`validate` is what every command and trainer runs before any process starts. It collects

* the rules the config alone shows (:func:`megarlhf.config.validate.config_errors`);
* the rules that need the model's architecture, read from its HF config (no weights): the
  attention heads and query groups of each role divisible by its ``tp`` (and the rollout's),
  the layers divisible by ``pp * vpp``;
* the placement rules, from the placement planner itself (:func:`plan_placement`): the roles
  fit the cluster with every TP group inside a node, and an asynchronous job's rollout runs on
  GPUs of its own (generation and training overlap in time, so they cannot take turns on
  shared GPUs; only ``cluster.placement: split`` gives the rollout its own pool today);

and raises one :class:`ConfigError` listing every violation, each naming the field and the fix.
"""

from __future__ import annotations

from typing import Any

from megarlhf.config.base import ConfigError
from megarlhf.config.schema import JobConfig, ModelConfig
from megarlhf.config.validate import active_roles, config_errors
from megarlhf.models.arch import ArchError, arch_summary
from megarlhf.planning.placement import PlacementError, plan_placement


def validate(job: JobConfig) -> JobConfig:
    """Checks every rule (module docstring); raises one ConfigError listing all violations."""
    errors = config_errors(job) + model_errors(job) + placement_errors(job)
    if errors:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(dict.fromkeys(errors)))
    return job


def model_errors(job: JobConfig) -> list[str]:
    """Layouts against the models' architectures (heads, query groups, layers)."""
    errors: list[str] = []
    arch_of: dict[int, dict[str, Any] | str] = {}

    def arch(model: ModelConfig) -> dict[str, Any] | None:
        if id(model) not in arch_of:
            try:
                arch_of[id(model)] = arch_summary(model)
            except ArchError as e:
                arch_of[id(model)] = str(e)
                errors.append(str(e))
        got = arch_of[id(model)]
        return got if isinstance(got, dict) else None

    for name, role in active_roles(job).items():
        p = role.parallel
        a = arch(job.role_model(name) if role.model is None else role.model)
        if a is None:
            continue
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
    if job.kind in ("ppo", "grpo", "dpo", "bon"):
        a = arch(job.actor.model)
        tp = job.rollout.tp
        if a is not None and a["num_attention_heads"] % tp:
            errors.append(f"rollout.tp = {tp} does not divide the model's "
                          f"{a['num_attention_heads']} attention heads")
    return errors


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
