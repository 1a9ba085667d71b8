"""Sweep expansion and the whole study's validation, before anything runs.

:func:`expand` turns a :class:`~megarlhf.study.spec.StudySpec` into runs (factor values x
seeds) and the job *instances* they need. A job instance is one job with everything that
determines it: the factor values that apply to it or to a job it reads from, and the seed
when it (or a job it reads from) is seeded. Runs that need the same instance share it: an
unseeded SFT job that no factor touches runs once for the whole study. Each instance has its
own output directory::

    <study output_dir>/jobs/<job>/<factor>-<value>+...+seed-<s>     (or .../<job>/base)

:func:`validate_plan` checks every instance's config as the command would (the config rules,
the model-aware and placement rules of :func:`megarlhf.planning.validate`, the job kind) and
every builtin's parameters, and raises one :class:`~megarlhf.study.spec.StudyError` listing
what to change. Models that an earlier job of the study will produce do not exist yet: they
are validated with the producing job's architecture instead (as the demo does).
"""

from __future__ import annotations

import itertools
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from megarlhf.checkpoint.outputs import job_inputs, overlap_errors, relation
from megarlhf.config import ConfigError, load_config
from megarlhf.config.loader import declared_kind
from megarlhf.config.base import from_dict
from megarlhf.planning import validate
from megarlhf.study.builtins import BUILTINS
from megarlhf.study.errors import StudyError
from megarlhf.study.spec import Factor, JobSpec, StudySpec

REF = re.compile(r"\$\{([^}]*)\}")


@dataclass
class JobInstance:
    """One job of the study with its factor values and seed fixed (module docstring).

    Attributes:
        job: the job's spec.
        key: unique name, ``<job>/<label>``; also its directory under ``jobs/``.
        out_dir: its output directory.
        point: factor name -> value, for the factors that determine it.
        seed: its seed (None: unseeded).
        deps: keys of the instances it reads from.
        overrides: its overrides with references resolved (without output_dir).
        params: a builtin's parameters with references resolved.
        kind: the job kind (commands; known after :func:`validate_plan`).
        arch: the trained model's architecture (HF config fields), for downstream stand-ins.
    """

    job: JobSpec
    key: str
    out_dir: str
    point: dict[str, Any]
    seed: int | None
    deps: list[str]
    overrides: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    kind: str | None = None
    arch: dict[str, Any] | None = None

    def argv(self) -> list[str]:
        """The ``megarlhf`` command line of this job (commands) - what a user would type.

        Training jobs pass ``--resume``: a job killed before it completed continues from its
        last checkpoint (or from step 0 without one; :mod:`megarlhf.study.job` drops the flag
        on a job's first attempt, before its directory holds a run); evaluations pass ``--overwrite`` and
        start again (they have no checkpoints)."""
        words = self.job.command.split()
        if words == ["train"]:
            words = ["train", self.kind or "?"]
        flag = "--resume" if words[0] == "train" else "--overwrite"
        return words + [self.job.config] + self.overrides + [
            f"output_dir={self.out_dir}", "logging.progress_bar=false", flag]


@dataclass
class Run:
    """One point of the sweep at one seed, and the job instance of each of its jobs."""

    index: int
    point: dict[str, Any]
    seed: int | None
    jobs: dict[str, str]  # job name -> instance key

    def label(self) -> str:
        parts = [f"{k}={v}" for k, v in self.point.items()]
        if self.seed is not None:
            parts.append(f"seed={self.seed}")
        return ", ".join(parts) or "base"


@dataclass
class StudyPlan:
    spec: StudySpec
    runs: list[Run]
    instances: dict[str, JobInstance]  # in an order where every dependency comes first


def _label(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "_"


def _references(text: str) -> list[str]:
    return REF.findall(text)


def _job_refs(job: JobSpec) -> list[str]:
    texts = list(job.overrides) + [json.dumps(job.params)]
    return [r for t in texts for r in _references(t) if r != "study"]


def _check_refs(spec: StudySpec) -> tuple[list[str], dict[str, list[str]]]:
    """The jobs in an order where each comes after the jobs it reads (``${name}``; the
    file's order otherwise), and job name -> the names it reads. Refuses unknown names and
    cycles."""
    names = list(spec.jobs)
    deps: dict[str, list[str]] = {}
    for name, job in spec.jobs.items():
        refs = list(dict.fromkeys(_job_refs(job)))
        for r in refs:
            if r not in spec.jobs:
                raise StudyError(f"jobs.{name}: ${{{r}}} names no job of this study (jobs: "
                                 f"{', '.join(names)}; ${{study}} is the study's output_dir)")
            if r == name:
                raise StudyError(f"jobs.{name}: ${{{name}}} refers to the job itself")
        deps[name] = refs
    order: list[str] = []
    while len(order) < len(names):
        ready = [n for n in names if n not in order and all(d in order for d in deps[n])]
        if not ready:
            left = [n for n in names if n not in order]
            raise StudyError(f"jobs {', '.join(left)} read each other's outputs in a cycle; "
                             "a job can only read jobs that run before it")
        order.append(ready[0])
    return order, {n: sorted(ds, key=order.index) for n, ds in deps.items()}


def _short_names(factors: list[Factor]) -> dict[str, str]:
    shorts = [f.short for f in factors]
    return {f.name: (f.short if shorts.count(f.short) == 1 else f.name.replace(".", "_"))
            for f in factors}


def expand(spec: StudySpec) -> StudyPlan:
    """The runs and job instances of ``spec`` (module docstring)."""
    order, deps = _check_refs(spec)
    shorts = _short_names(spec.factors)
    labels = {f.name: {_label(v): v for v in f.values} for f in spec.factors}
    for f in spec.factors:
        if len(labels[f.name]) != len(f.values):
            raise StudyError(f"sweep.factors.{f.name}: two values give the same directory "
                             f"name ({[_label(v) for v in f.values]}); make them distinct")
    # Which factors (and whether the seed) determine each job, through what it reads.
    affected: dict[str, list[Factor]] = {}
    seeded: dict[str, bool] = {}
    for name in order:
        job = spec.jobs[name]
        fs = [f for f in spec.factors if name in f.jobs]
        for d in deps[name]:
            fs += [f for f in affected[d] if f not in fs]
        affected[name] = [f for f in spec.factors if f in fs]  # sweep order
        seeded[name] = job.seeded or any(seeded[d] for d in deps[name])
    seeds = spec.seeds
    points = list(itertools.product(*[f.values for f in spec.factors]))
    runs: list[Run] = []
    instances: dict[str, JobInstance] = {}
    for point in points:
        values = {f.name: v for f, v in zip(spec.factors, point)}
        for seed in seeds:
            run = Run(index=len(runs), point=dict(values), seed=seed, jobs={})
            for name in order:
                job = spec.jobs[name]
                fs = affected[name]
                s = seed if seeded[name] else None
                parts = [f"{shorts[f.name]}-{_label(values[f.name])}" for f in fs]
                if s is not None:
                    parts.append(f"seed-{s}")
                label = "+".join(parts) or "base"
                key = f"{name}/{label}"
                run.jobs[name] = key
                if key in instances:
                    continue
                out_dir = os.path.join(spec.output_dir, "jobs", name, label)
                dirs = {d: instances[run.jobs[d]].out_dir for d in deps[name]}
                dirs["study"] = spec.output_dir
                inst = JobInstance(job=job, key=key, out_dir=out_dir,
                                   point={f.name: values[f.name] for f in fs}, seed=s,
                                   deps=[run.jobs[d] for d in deps[name]])
                if job.command is not None:
                    over = [_subst(o, dirs) for o in job.overrides]
                    for f in spec.factors:
                        if name in f.jobs:
                            over += f.overrides(values[f.name])
                    if s is not None:
                        over.append(f"{spec.seed_key}={s}")
                    inst.overrides = over
                else:
                    params = json.loads(_subst(json.dumps(job.params), dirs))
                    for f in spec.factors:
                        if name in f.jobs:
                            for o in f.overrides(values[f.name]):
                                k, _, v = o.partition("=")
                                params[k] = json.loads(v)
                    if s is not None:
                        params["seed"] = s
                    inst.params = params
                instances[key] = inst
            runs.append(run)
    return StudyPlan(spec=spec, runs=runs, instances=instances)


def _subst(text: str, dirs: dict[str, str]) -> str:
    return REF.sub(lambda m: dirs[m.group(1)], text)


# ------------------------------------------------------------------------------ validation
def _check_apart(inst: JobInstance, plan: StudyPlan, cfg, tmp: str) -> None:
    """The study's output_dir holds none of what a job reads that the study did not write
    (its config, the study file, models and data given by path): the study would write over
    them (``study.yaml``, ``jobs/``, ``results/``) or a job's ``--overwrite`` would take them.

    Raises:
        StudyError: naming both paths.
    """
    def written_by_study(path: str) -> bool:
        return relation(path, tmp) is not None or any(
            relation(path, u.out_dir) in ("equal", "inside") for u in plan.instances.values())

    inputs = {k: v for k, v in job_inputs(cfg).items() if not written_by_study(v)}
    inputs[f"jobs.{inst.job.name}.config"] = inst.job.config
    inputs["the study file"] = plan.spec.path
    errors = overlap_errors({"output_dir": plan.spec.output_dir}, inputs)
    if errors:
        raise StudyError(errors[0])


def _stand_ins(inst: JobInstance, plan: StudyPlan, tmp: str) -> list[str]:
    """``inst``'s overrides, a model an upstream job has not produced yet replaced by a stand-in
    directory under ``tmp`` holding only that job's architecture (``config.json``): what the
    config, model-aware and placement rules read of a model."""
    out = []
    ups = [plan.instances[d] for d in inst.deps]
    for o in inst.overrides:
        key, _, value = o.partition("=")
        up = next((u for u in ups if value.startswith(u.out_dir + os.sep) or value == u.out_dir),
                  None)
        if key.endswith("hf_dir") and up is not None and not os.path.isdir(value) \
                and up.arch is not None:
            import hashlib

            text = json.dumps(up.arch, sort_keys=True)  # one directory per architecture
            d = os.path.join(tmp, "arch-" + hashlib.sha1(text.encode()).hexdigest()[:12])
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, "config.json"), "w", encoding="utf-8") as f:
                json.dump(up.arch, f)
            out.append(f"{key}={d}")
        else:
            out.append(o)
    return out


def _model_arch(job) -> dict[str, Any] | None:
    """The trained (actor) model's HF config fields, from ``arch`` or the HF directory."""
    m = job.actor.model
    if m.arch is not None:
        return dict(m.arch)
    try:
        with open(os.path.join(m.hf_dir, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError, TypeError):
        return None
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def validate_plan(plan: StudyPlan) -> None:
    """Checks every job instance (module docstring); fills ``kind`` and ``arch``.

    Raises:
        StudyError: every problem, each once, with the job instances it concerns.
    """
    import tempfile

    problems: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="megarlhf-study-") as tmp:
        for inst in plan.instances.values():
            _validate_instance(inst, plan, tmp, problems)
    if problems:
        lines = []
        for msg, keys in problems.items():
            where = keys[0] + (f" and {len(keys) - 1} more" if len(keys) > 1 else "")
            lines.append(f"{msg} (in {where})")
        raise StudyError(f"{plan.spec.path}: the study cannot run; nothing was started:\n  - "
                         + "\n  - ".join(lines))


def _validate_instance(inst: JobInstance, plan: StudyPlan, tmp: str,
                       problems: dict[str, list[str]]) -> None:
    """One instance's checks (:func:`validate_plan`); problems are collected by message."""
    job = inst.job
    try:
        if job.builtin is not None:
            from_dict(BUILTINS[job.builtin].params, inst.params)
            return
        over = _stand_ins(inst, plan, tmp)
        words = job.command.split()
        declared = declared_kind(job.config, over)
        if len(words) == 2 and declared is not None and declared != words[1]:
            raise ConfigError(f"{job.config} says kind: {declared}, but the job's command is "
                              f"`{job.command}`; set command: {words[0]} {declared} (or "
                              f"command: train, which runs the config's kind)")
        cfg = validate(load_config(job.config, over))
        inst.kind = cfg.kind
        if declared is not None and declared != cfg.kind:  # what the CLI compares, as text
            raise ConfigError(f"kind is given as {declared!r}; write it as a plain word "
                              f"(kind: {cfg.kind})")
        if words[0] == "train" and cfg.kind == "bon":
            raise ConfigError("kind: bon is an evaluation: use command: eval bon")
        if words[0] == "eval" and cfg.kind != "bon":
            raise ConfigError(f"kind: {cfg.kind} is trained, not evaluated: use command: "
                              f"train {cfg.kind}")
        inst.arch = _model_arch(cfg)
        _check_apart(inst, plan, cfg, tmp)
    except (ConfigError, StudyError, ValueError) as e:
        msg = str(e).replace("invalid config:\n  - ", "").replace("\n  - ", "; ")
        problems.setdefault(f"jobs.{job.name}: {msg}", []).append(inst.key)
