"""A study file: the jobs of one run, the sweep over them, and the finding they measure.

A study is a *base job* (one or more megarlhf jobs chained by their outputs) plus a *sweep*
(one or two factors x seeds). Example (``examples/studies/responses_per_prompt/mini.yaml``)::

    study: responses_per_prompt        # the finding: its analysis, plot and verdict
    output_dir: outputs/studies/responses_per_prompt_mini
    jobs:                              # ${name} is that job's output directory
      data: {builtin: demo-data}
      sft:
        command: train sft
        config: ../_base/mini_sft.yaml     # relative to the study file
        seeded: false                      # once for the whole study
        overrides:                         # block lists: ${...} is not valid in [a, b]
          - data.train_path=${data}/sft_train.jsonl
      rl:
        command: train grpo
        config: ../_base/mini_grpo.yaml
        overrides:
          - actor.model.hf_dir=${sft}/hf
    sweep:
      factors:                         # <job>.<config key>: values
        rl.batch.n_samples_per_prompt: [1, 2, 4, 8]
      seeds: [1, 2]                    # every seeded job runs once per seed (its `seed`)
    analysis: {job: rl}                # the finding's settings (megarlhf/study/findings.py)

A factor whose values are a mapping is a set of *variants*: each label names overrides of that
job (``rl.method: {ppo: {kind: ppo, critic: {num_gpus: 2}}, grpo: {kind: grpo}}``), for a
setting that needs several keys to change together.

Command-line ``k=v`` overrides of ``megarlhf study``: a key that starts with a job's name is an
override of that job (``rl.train.steps=50``); any other key sets the study file's own field
(``output_dir=...``, ``sweep.seeds=[1,2,3]``).

Everything here is checked when the file is loaded (:class:`StudyError`, one message naming
the setting and the fix); the jobs' configs are checked by :mod:`megarlhf.study.sweep` before
anything runs.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Sequence

from megarlhf.config.base import ConfigError, _coerce
from megarlhf.config.schema import JobConfig
from megarlhf.study.builtins import BUILTINS
from megarlhf.study.errors import StudyError
from megarlhf.study.findings import FINDINGS

STUDY_KEYS = ("study", "title", "description", "output_dir", "jobs", "sweep", "analysis")
JOB_KEYS = ("command", "builtin", "config", "overrides", "params", "seeded")
SWEEP_KEYS = ("factors", "seeds", "seed_key")
COMMANDS = ("train", "train sft", "train rm", "train ppo", "train grpo", "train dpo", "eval bon")
MAX_FACTORS = 2


@dataclass
class JobSpec:
    """One job of a run.

    Attributes:
        name: its name in the study (``${name}`` is its output directory).
        command: ``train`` (the kind is the config's), ``train <kind>`` or ``eval bon``.
        builtin: or a study helper instead of a command (:mod:`megarlhf.study.builtins`).
        config: the job's YAML config (absolute path), for commands.
        overrides: dotted ``key=value`` overrides, ``${job}`` references unresolved.
        params: the builtin's parameters.
        seeded: runs once per seed of the sweep (its ``seed`` set); a job downstream of a
            seeded job is seeded too.
    """

    name: str
    command: str | None = None
    builtin: str | None = None
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    seeded: bool = True


@dataclass
class Factor:
    """One swept setting of one job.

    A factor may set the same key of several jobs (``rm+bon.reward.rm_type``: the reward model
    trained and the evaluation that reads it).

    Attributes:
        job: the (first) job it applies to.
        key: the dotted config key (a list factor) or the factor's name (variants).
        values: the values (list factor) or the variant labels, in sweep order.
        variants: label -> dotted overrides, for a variants factor; None for a list factor.
    """

    job: str
    key: str
    values: list[Any]
    variants: dict[Any, list[str]] | None = None
    also: list[str] = field(default_factory=list)  # further jobs it sets (``a+b.key``)

    @property
    def jobs(self) -> list[str]:
        return [self.job] + list(self.also)

    @property
    def name(self) -> str:
        return f"{'+'.join(self.jobs)}.{self.key}"

    @property
    def short(self) -> str:
        return self.key.split(".")[-1]

    def overrides(self, value: Any) -> list[str]:
        """The job overrides that set this factor to ``value``."""
        if self.variants is not None:
            return list(self.variants[value])
        return [f"{self.key}={format_value(value)}"]


@dataclass
class StudySpec:
    """A loaded, checked study file."""

    path: str
    study: str
    title: str
    output_dir: str
    jobs: dict[str, JobSpec]
    factors: list[Factor]
    seeds: list[int]
    seed_key: str = "seed"
    description: str = ""
    analysis: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)  # the file with the overrides applied


def format_value(value: Any) -> str:
    """A value as the text of a ``key=value`` override: a plain string as itself where YAML
    reads it back unchanged (``kind=ppo``: commands compare the kind as text), anything else
    as JSON (which YAML reads back exactly)."""
    import json

    import yaml

    if isinstance(value, str) and value and value == value.strip():
        try:
            if yaml.safe_load(value) == value:
                return value
        except yaml.YAMLError:
            pass
    return json.dumps(value)


def _near(word: str, choices: Sequence[str]) -> str:
    near = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {near[0]!r}?)" if near else ""


# ------------------------------------------------------------------------------ config keys
def config_key_type(key: str, root: type = JobConfig) -> Any:
    """The type of dotted config ``key`` in the dataclass ``root`` (a job's config).

    Keys under a free-form mapping field (``actor.model.arch.hidden_size``) have type Any.

    Raises:
        StudyError: the key does not exist, naming the nearest valid one.
    """
    tp: Any = root
    walked: list[str] = []
    for part in key.split("."):
        tp = _unwrap_optional(tp)
        origin = typing.get_origin(tp)
        if origin is dict or tp is Any:
            return Any  # a mapping field (model.arch, reward.sources): any key below it
        if not (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
            raise StudyError(f"{'.'.join(walked)} is a {getattr(tp, '__name__', tp)} setting, "
                             f"it has no field {part!r}")
        hints = typing.get_type_hints(tp)
        names = [f.name for f in dataclasses.fields(tp) if f.init]
        if part not in names:
            where = ".".join(walked) or "the job config"
            raise StudyError(f"{where} has no setting {part!r}{_near(part, names)}; valid "
                             f"here: {', '.join(sorted(names))}")
        tp = hints[part]
        walked.append(part)
    return tp


def _unwrap_optional(tp: Any) -> Any:
    import types

    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(members) == 1:
            return members[0]
    return tp


def check_value(key: str, value: Any, root: type = JobConfig) -> None:
    """Raises :class:`StudyError` when ``value`` is not of ``key``'s type."""
    tp = config_key_type(key, root)
    try:
        _coerce(value, tp, key)
    except ConfigError as e:
        raise StudyError(str(e)) from None


# ------------------------------------------------------------------------------ loading
def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for p in parts[:-1]:
        nxt = node.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            node[p] = nxt
        node = nxt
    node[parts[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """The study file's data with the command line's ``k=v`` applied (module docstring)."""
    import copy

    import yaml

    data = copy.deepcopy(raw)
    jobs = data.get("jobs") if isinstance(data.get("jobs"), dict) else {}
    for o in overrides:
        key, eq, value = o.partition("=")
        key = key.strip()
        if not eq or not key or value == "":
            raise StudyError(f"override {o!r} must look like key=value: a job's setting "
                             "(rl.train.steps=50) or the study's (output_dir=..., "
                             "sweep.seeds=[1,2,3]); use key=null to unset")
        head, _, rest = key.partition(".")
        if head in jobs and rest:
            job = jobs[head]
            if not isinstance(job, dict):
                continue  # reported by the loader
            job.setdefault("overrides", [])
            if isinstance(job["overrides"], list):
                job["overrides"].append(f"{rest}={value}")
            continue
        if head not in STUDY_KEYS:
            raise StudyError(f"override {o!r}: {head!r} is neither a job of this study "
                             f"({', '.join(jobs) or 'none'}) nor a study setting "
                             f"({', '.join(STUDY_KEYS)}){_near(head, list(jobs) + list(STUDY_KEYS))}")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise StudyError(f"override {o!r}: not a YAML value ({e})") from None
        _set_dotted(data, key, parsed)
    return data


def load_study(path: str, overrides: Sequence[str] = ()) -> StudySpec:
    """Reads and checks a study file (module docstring).

    Raises:
        StudyError: one message naming the setting and what to change.
    """
    import yaml

    if os.path.isdir(path):
        raise StudyError(f"study file {path} is a directory; give a study YAML file (see "
                         "examples/studies/)")
    if not os.path.isfile(path):
        raise StudyError(f"study file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise StudyError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise StudyError(f"{path}: a study file is a mapping with {', '.join(STUDY_KEYS)}")
    try:
        return _parse(path, apply_overrides(raw, overrides))
    except StudyError as e:
        raise StudyError(f"{path}: {e}") from None


def _parse(path: str, data: dict[str, Any]) -> StudySpec:
    unknown = [k for k in data if k not in STUDY_KEYS]
    if unknown:
        raise StudyError(f"unknown study setting {unknown[0]!r}{_near(unknown[0], STUDY_KEYS)}"
                         f"; valid: {', '.join(STUDY_KEYS)}")
    study = data.get("study")
    if study not in FINDINGS:
        raise StudyError(f"study: {study!r} is not a finding megarlhf measures; choose one of "
                         f"{', '.join(FINDINGS)}{_near(str(study), list(FINDINGS))}")
    out = data.get("output_dir")
    if not isinstance(out, str) or not out:
        raise StudyError("output_dir: give the study's output directory (a path)")
    base = os.path.dirname(os.path.abspath(path))

    jobs_raw = data.get("jobs")
    if not isinstance(jobs_raw, dict) or not jobs_raw:
        raise StudyError("jobs: give the jobs of one run as a mapping name -> {command, "
                         "config, overrides} (see examples/studies/)")
    jobs: dict[str, JobSpec] = {}
    for name, j in jobs_raw.items():
        jobs[str(name)] = _parse_job(str(name), j, base, BUILTINS)

    sweep = data.get("sweep")
    if not isinstance(sweep, dict) or not sweep:
        raise StudyError("sweep: the sweep is empty; give sweep.factors (one or two "
                         "<job>.<key>: [values]) and/or sweep.seeds (e.g. [1, 2, 3])")
    bad = [k for k in sweep if k not in SWEEP_KEYS]
    if bad:
        raise StudyError(f"unknown sweep setting {bad[0]!r}{_near(bad[0], SWEEP_KEYS)}; valid: "
                         f"{', '.join(SWEEP_KEYS)}")
    factors = _parse_factors(sweep.get("factors") or {}, jobs)
    seeds = sweep.get("seeds", [None])
    if seeds is None:
        seeds = [None]
    if not isinstance(seeds, list) or not seeds:
        raise StudyError("sweep.seeds: the sweep is empty; give a non-empty list of integer "
                         "seeds, e.g. [1, 2, 3] (or leave it out for one run per point)")
    if seeds != [None]:
        for s in seeds:
            if isinstance(s, bool) or not isinstance(s, int):
                raise StudyError(f"sweep.seeds: {s!r} is not an integer; give integer seeds, "
                                 "e.g. [1, 2, 3]")
        if len(set(seeds)) != len(seeds):
            raise StudyError(f"sweep.seeds {seeds} lists a seed twice; list each once")
    if not factors and len(seeds) < 2:
        raise StudyError("sweep: the sweep is empty (no factor and at most one seed); give "
                         "sweep.factors and/or two or more sweep.seeds")
    seed_key = sweep.get("seed_key", "seed")
    if not isinstance(seed_key, str):
        raise StudyError("sweep.seed_key must be a config key (default: seed)")
    config_key_type(seed_key)

    analysis = data.get("analysis") or {}
    if not isinstance(analysis, dict):
        raise StudyError("analysis: give a mapping of the finding's settings, or leave it out")
    spec = StudySpec(path=os.path.abspath(path), study=study,
                     title=str(data.get("title") or FINDINGS[study].title),
                     output_dir=os.path.abspath(os.path.join(os.getcwd(), out)),
                     jobs=jobs, factors=factors, seeds=seeds, seed_key=seed_key,
                     description=str(data.get("description") or ""), analysis=analysis,
                     raw=data)
    FINDINGS[study].check(spec)  # the jobs / factors / settings the analysis reads
    return spec


def _parse_job(name: str, j: Any, base: str, builtins: dict[str, Any]) -> JobSpec:
    if not isinstance(j, dict):
        raise StudyError(f"jobs.{name}: give a mapping with command, config and overrides "
                         "(or builtin and params)")
    bad = [k for k in j if k not in JOB_KEYS]
    if bad:
        raise StudyError(f"jobs.{name}: unknown setting {bad[0]!r}{_near(bad[0], JOB_KEYS)}; "
                         f"valid: {', '.join(JOB_KEYS)}")
    if "." in name or "$" in name or "/" in name or not name:
        raise StudyError(f"jobs: the job name {name!r} may not contain '.', '/' or '$'")
    command, builtin = j.get("command"), j.get("builtin")
    if (command is None) == (builtin is None):
        raise StudyError(f"jobs.{name}: give exactly one of command ({', '.join(COMMANDS)}) "
                         f"or builtin ({', '.join(builtins)})")
    overrides = j.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise StudyError(f"jobs.{name}.overrides: give a list of key=value strings")
    seeded = j.get("seeded", command is not None)
    if not isinstance(seeded, bool):
        raise StudyError(f"jobs.{name}.seeded: expected true or false, got {seeded!r}")
    params = j.get("params") or {}
    if not isinstance(params, dict):
        raise StudyError(f"jobs.{name}.params: give a mapping")
    config = j.get("config")
    if command is not None:
        command = " ".join(str(command).split())
        if command not in COMMANDS:
            raise StudyError(f"jobs.{name}.command: {command!r} is not one of "
                             f"{', '.join(COMMANDS)}{_near(command, COMMANDS)}")
        if not isinstance(config, str) or not config:
            raise StudyError(f"jobs.{name}.config: give the job's YAML config (a path "
                             "relative to the study file)")
        config = os.path.normpath(os.path.join(base, config))
        if not os.path.isfile(config):
            raise StudyError(f"jobs.{name}.config: {config} does not exist")
        if params:
            raise StudyError(f"jobs.{name}.params: only builtin jobs take params; give "
                             "settings of a command as overrides")
    else:
        if builtin not in builtins:
            raise StudyError(f"jobs.{name}.builtin: {builtin!r} is not one of "
                             f"{', '.join(builtins)}{_near(str(builtin), list(builtins))}")
        if config is not None or overrides:
            raise StudyError(f"jobs.{name}: a builtin job takes params, not config/overrides")
    return JobSpec(name=name, command=command, builtin=builtin, config=config,
                   overrides=list(overrides), params=dict(params), seeded=seeded)


def _parse_factors(raw: Any, jobs: dict[str, JobSpec]) -> list[Factor]:
    if not isinstance(raw, dict):
        raise StudyError("sweep.factors: give a mapping <job>.<key>: [values]")
    if len(raw) > MAX_FACTORS:
        raise StudyError(f"sweep.factors: {len(raw)} factors; a study sweeps one or two "
                         "(split it into several studies)")
    factors = []
    for name, values in raw.items():
        name = str(name)
        head, _, key = name.partition(".")
        targets = head.split("+")
        for job in targets:
            if job not in jobs or not key:
                raise StudyError(f"sweep.factors.{name}: a factor is <job>.<config key> (or "
                                 f"<job>+<job>.<key>) with jobs of this study "
                                 f"({', '.join(jobs)}){_near(job, list(jobs))}")
        job = targets[0]
        specs = [jobs[t] for t in targets]
        where = f"sweep.factors.{name}"
        if isinstance(values, dict):  # variants: label -> {dotted key: value}
            if not values:
                raise StudyError(f"{where}: the sweep is empty: no variants; give label: "
                                 "{key: value, ...} for each")
            variants: dict[Any, list[str]] = {}
            for label, over in values.items():
                if not isinstance(over, dict) or not over:
                    raise StudyError(f"{where}.{label}: a variant is a non-empty mapping of "
                                     "config keys to values")
                for k, v in over.items():
                    for spec in specs:
                        _check_factor_value(spec, str(k), v, f"{where}.{label}.{k}", BUILTINS)
                variants[label] = [f"{k}={format_value(v)}" for k, v in over.items()]
            factors.append(Factor(job, key, list(values), variants, targets[1:]))
            continue
        if not isinstance(values, list):
            raise StudyError(f"{where}: give a list of values (or a mapping of variants)")
        if not values:
            raise StudyError(f"{where}: the sweep is empty: no values; give at least one, "
                             "e.g. [1, 4, 16]")
        for v in values:
            for spec in specs:
                _check_factor_value(spec, key, v, where, BUILTINS)
        if len({format_value(v) for v in values}) != len(values):
            raise StudyError(f"{where}: {values} lists a value twice; list each once")
        factors.append(Factor(job, key, list(values), also=targets[1:]))
    names = [f.name for f in factors]
    if len(set(names)) != len(names):
        raise StudyError("sweep.factors: a factor is listed twice")
    return factors


def _check_factor_value(spec: JobSpec, key: str, value: Any, where: str,
                        builtins: dict[str, Any]) -> None:
    root = JobConfig if spec.command is not None else builtins[spec.builtin].params
    try:
        check_value(key, value, root)
    except StudyError as e:
        what = "job" if spec.command is not None else f"builtin {spec.builtin}"
        raise StudyError(f"{where}: {e} (the {what} {spec.name!r} has no such setting of "
                         "that type; sweep an existing setting with values of its type)") \
            from None
