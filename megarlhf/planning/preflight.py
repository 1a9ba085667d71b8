"""The checks of a job that read files or look at this machine, run before anything starts.

:func:`megarlhf.planning.validate` checks the config, the models' architectures and the
placement; this module checks what the config points at, so that ``megarlhf validate`` and
``megarlhf plan`` refuse everything ``megarlhf train`` would refuse (and ``train`` refuses it
before Ray or any worker starts):

* inputs: model directories (config.json and the safetensors headers: a truncated file is
  found here, not in a worker), checkpoints, tokenizers, data files (every row read and
  tokenized by the trainers' own loaders), and the tokenizer's vocabulary against the model's;
* this machine: FP8 and ``transformer_impl=transformer_engine`` need Transformer Engine; a vLLM
  rollout needs the pinned vLLM (``plan`` notes its absence: the planning machine is often not
  the one that runs the job);
* outputs: ``output_dir`` (ownership, a previous run, overlap with the inputs) and the resume
  pointer and saved layouts (:mod:`megarlhf.checkpoint.outputs`).

:func:`missing_input_errors` lists the inputs a job needs but the config leaves unset (``plan``
reports them as notes: the shipped configs are planning templates without data).
"""

from __future__ import annotations

import os
from typing import Any

from megarlhf.agents.trajectory import TemplateError, assembler_for, check_template
from megarlhf.checkpoint.outputs import resume_data_errors, run_dir_errors
from megarlhf.config.base import ConfigError
from megarlhf.config.roles import active_roles
from megarlhf.config.schema import JobConfig, ModelConfig
from megarlhf.data.datasets import DatasetError
from megarlhf.data.job_data import load_prompt_items, load_sft_samples
from megarlhf.data.rm_datasets import batch_composition, load_rm_data
from megarlhf.data.tokenizer import load_tokenizer
from megarlhf.models.arch import ArchError, arch_summary
from megarlhf.models.builder import ModelBuildError, check_fp8, use_transformer_engine
from megarlhf.planning.checks import vllm_install_errors
from megarlhf.weights.validate import HFValidationError, inspect_hf_dir

RL_KINDS = ("ppo", "grpo", "dpo")


def _role_models(job: JobConfig) -> list[tuple[str, ModelConfig, str]]:
    """``(role, model, head)`` for every role the job starts (the reference and critic fall
    back to the actor's model)."""
    out = []
    for role, rc in active_roles(job).items():
        model = job.role_model(role) if rc.model is None else rc.model
        head = "scalar" if role in ("critic", "reward_model") or job.kind == "rm" else "lm"
        out.append((role, model, head))
    return out


def _where(job: JobConfig, role: str) -> str:
    """The config section that gives ``role``'s model (the actor's when the role has none)."""
    rc = getattr(job, role)
    return f"{role}.model" if rc is not None and rc.model is not None else "actor.model"


def missing_input_errors(job: JobConfig) -> list[str]:
    """Inputs the job needs that the config does not set (``train`` refuses each)."""
    errors = []
    for role, model, _ in _role_models(job):
        if model.tokenizer is None and model.hf_dir is None and role in ("actor", "reward_model"):
            where = _where(job, role)
            errors.append(f"{where}.tokenizer: not set; a model given as {where}.arch needs a "
                          "tokenizer (a sentencepiece .model file or an HF tokenizer directory)")
    if job.kind in ("sft",) + RL_KINDS and not job.data.train_path:
        what = "prompt + response rows" if job.kind == "sft" else "prompts (with answers)"
        errors.append(f"data.train_path: not set; kind={job.kind} trains on {what} from a "
                      ".jsonl or .parquet file")
    return errors


def _exists(path: str, setting: str, errors: list[str], *, kind: str = "any") -> bool:
    if not os.path.lexists(path):
        errors.append(f"{setting} = {path}: no such file or directory")
        return False
    if kind == "dir" and not os.path.isdir(path):
        errors.append(f"{setting} = {path} is a file; give a directory")
        return False
    if kind == "file" and os.path.isdir(path):
        errors.append(f"{setting} = {path} is a directory; give a .jsonl or .parquet file")
        return False
    return True


def _model_errors(job: JobConfig, errors: list[str]) -> None:
    """Model directories (config + safetensors headers) and FP8 / TE support on this machine."""
    seen: set[tuple[str, str]] = set()
    for role, model, head in _role_models(job):
        where = _where(job, role)
        if model.hf_dir is not None and (model.hf_dir, head) not in seen:
            seen.add((model.hf_dir, head))
            if _exists(model.hf_dir, f"{where}.hf_dir", errors, kind="dir"):
                try:
                    inspect_hf_dir(model.hf_dir, head)
                except HFValidationError as e:
                    errors.append(f"{where}.hf_dir: {e}")
        if model.tokenizer is not None:
            _exists(model.tokenizer, f"{where}.tokenizer", errors)
        try:
            use_transformer_engine(model)
            check_fp8(model)
        except ModelBuildError as e:
            errors.append(f"{where}: {e}")
    policy = job.reward.prm_label_policy
    if policy and job.kind == "rm" and job.reward.prm_label_rollouts:
        if _exists(policy, "reward.prm_label_policy", errors, kind="dir"):
            try:
                inspect_hf_dir(policy, "lm")
            except HFValidationError as e:
                errors.append(f"reward.prm_label_policy: {e}")


def _tokenizer(job: JobConfig, role: str, model: ModelConfig, errors: list[str]):
    """The role's tokenizer (None when unset or unusable; the problem is in ``errors``)."""
    path = model.tokenizer or model.hf_dir
    if path is None or not os.path.exists(path):
        return None
    where = _where(job, role)
    setting = f"{where}.tokenizer" if model.tokenizer else f"{where}.hf_dir"
    try:
        return load_tokenizer(path)
    except Exception as e:  # noqa: BLE001 - sentencepiece / transformers raise many types
        errors.append(f"{setting} = {path}: not a usable tokenizer ({type(e).__name__}: {e})")
        return None


def _vocab_errors(job: JobConfig, errors: list[str]) -> dict[str, Any]:
    """The model's vocabulary must hold every id of its tokenizer; returns the tokenizers."""
    toks: dict[str, Any] = {}
    loaded: dict[str, Any] = {}
    for role, model, _ in _role_models(job):
        # The reward model reads text through its own tokenizer; every other role embeds the
        # actor's token ids (controller/data.py load_job_tokenizer).
        src_role = "reward_model" if role == "reward_model" else "actor"
        src = model if role == "reward_model" else job.actor.model
        if src_role not in loaded:
            loaded[src_role] = _tokenizer(job, src_role, src, errors)
        tok = loaded[src_role]
        if tok is None:
            continue
        toks[role] = tok
        try:
            vocab = arch_summary(model)["vocab_size"]
        except ArchError:
            continue  # the config check names the architecture problem
        ids = [tok.vocab_size - 1, tok.eos_id, tok.pad_id] + \
            ([tok.bos_id] if tok.bos_id is not None else [])
        need = max(i for i in ids if i is not None) + 1
        if vocab < need:
            where = _where(job, role)
            field = f"{where}.arch.vocab_size" if model.arch is not None else \
                f"vocab_size in {model.hf_dir}/config.json"
            errors.append(f"{field} = {vocab} is below the tokenizer's {need} ids "
                          f"({src.tokenizer or src.hf_dir}): token ids {vocab}..{need - 1} "
                          f"could not be embedded; set {field.split(' in ')[0]} >= {need} or use "
                          "the model's own tokenizer")
    return toks


def _agent_template_errors(job: JobConfig, toks: dict[str, Any], errors: list[str]) -> None:
    """An agent's trajectories need a chat template that only appends (prefix-stable)."""
    tok = toks.get("actor")
    if job.rollout.agent is None or tok is None or job.kind not in RL_KINDS:
        return
    try:
        check_template(assembler_for(tok, [tok.eos_id]))
    except TemplateError as e:
        errors.append(f"rollout.agent: the tokenizer's chat template cannot lay out "
                      f"trajectories token-exactly: {e}")


def _data_errors(job: JobConfig, toks: dict[str, Any], errors: list[str], *,
                 rows: bool = True) -> dict[str, int]:
    """Every data file the job reads, through the trainers' own loaders (with ``rows``: every
    row validated and tokenized); returns the sampler sizes a resume is checked against."""
    d = job.data
    ok = True
    for f in ("train_path", "eval_path", "preference_path", "labelled_path",
              "eval_preference_path", "eval_labelled_path"):
        p = getattr(d, f)
        if p and not _exists(p, f"data.{f}", errors, kind="file"):
            ok = False
    tok = toks.get("actor")
    if tok is None or not ok or not rows:
        return {}
    counts: dict[str, int] = {}
    try:
        if job.kind == "sft" and d.train_path:
            counts["sampler"] = len(load_sft_samples(job, tok))
        elif job.kind in RL_KINDS or job.kind == "bon":
            if d.train_path and job.kind != "bon":
                counts["sampler"] = len(load_prompt_items(job, tok))
            if d.eval_path:
                load_prompt_items(job, tok, what="eval_path")
        elif job.kind == "rm":
            prm = job.reward.rm_type == "prm"

            def no_labels(examples):  # automatic step labels need rollouts: train makes them
                return [()] * len(examples)

            if d.preference_path or d.labelled_path:
                data = load_rm_data(job, tok, d.preference_path, d.labelled_path, prm=prm,
                                    step_labeller=no_labels if job.reward.prm_label_rollouts
                                    else None)
                batch_composition(job.train.global_batch_size, len(data.pairs),
                                  len(data.labelled), d.preference_fraction)
                counts["pair_sampler"] = max(1, len(data.pairs))
                counts["labelled_sampler"] = max(1, len(data.labelled))
            if d.eval_preference_path or d.eval_labelled_path:
                load_rm_data(job, tok, d.eval_preference_path, d.eval_labelled_path, prm=prm,
                             train=False)
    except (DatasetError, ConfigError) as e:
        errors.append(str(e))
    return counts


def preflight_errors(job: JobConfig, *, data: bool = True, outputs: bool = True) -> list[str]:
    """Every problem with what ``job`` reads (models, tokenizers, data) and writes.

    Args:
        data: read and tokenize the data files (``train`` skips it: its trainer does exactly
            this before any worker starts).
        outputs: check ``output_dir`` and a resume (:func:`~megarlhf.checkpoint.outputs.
            run_dir_errors`).
    """
    errors: list[str] = []
    _model_errors(job, errors)
    toks = _vocab_errors(job, errors)
    _agent_template_errors(job, toks, errors)
    counts = _data_errors(job, toks, errors, rows=data)
    if outputs:
        errors += run_dir_errors(job)
        if counts and not errors:
            errors += resume_data_errors(job, counts)
    return errors


def preflight(job: JobConfig, *, data: bool = True, outputs: bool = True,
              require_inputs: bool = True) -> list[str]:
    """Raises one :class:`ConfigError` listing :func:`preflight_errors` (and, with
    ``require_inputs``, :func:`missing_input_errors`); returns the missing inputs otherwise
    (notes for ``plan``)."""
    missing = missing_input_errors(job) + vllm_install_errors(job)
    errors = (missing if require_inputs else []) + preflight_errors(job, data=data,
                                                                     outputs=outputs)
    if errors:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))
    return [] if require_inputs else missing
