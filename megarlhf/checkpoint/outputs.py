"""What megarlhf may write where: output ownership, inputs vs outputs, resume pointers.

Every writer (``train``, ``eval``, ``convert``, ``score --output``, the demo) goes through this
module before it writes anything, so that bad input never destroys a user's files:

* **Ownership.** A directory megarlhf writes is marked with :data:`MARKER` (a small JSON file;
  model checkpoints carry their own ``megarlhf_checkpoint.json``). A writer accepts a target
  that does not exist or is empty; a target that holds megarlhf's own output only with
  ``resume`` (training runs) or ``overwrite``, and ``overwrite`` replaces megarlhf's own
  entries only; a target holding anything else is refused whatever the flags say.
* **Inputs vs outputs.** A target equal to, inside or containing one of the job's inputs (a
  model directory, a tokenizer, a data file, a checkpoint) is refused: the run would overwrite
  what it reads (``convert --out`` = ``--hf-dir``; a GRPO job whose ``actor.model.hf_dir`` is
  ``<output_dir>/hf`` of the same ``output_dir``; ``score --output`` = ``--input``).
* **Resume.** ``checkpoints/latest`` must name a complete checkpoint that holds every role of
  the job at the layout it runs, and the data must be the one the sampler state was saved for;
  all of it is checked before Ray or any worker starts.

Functions named ``*_errors`` return messages (one per problem); ``check_*`` / ``claim_*`` raise
:class:`OutputError` with all of them.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from megarlhf.checkpoint.atomic import (
    MARKER,
    MARKER_FORMAT,
    read_marker,
    relative_files,
    write_marker,
)
from megarlhf.checkpoint.model import FORMAT as CKPT_FORMAT
from megarlhf.checkpoint.model import MARKER as CKPT_MARKER
from megarlhf.checkpoint.model import CheckpointError, read_checkpoint_meta
from megarlhf.config.base import ConfigError
from megarlhf.config.roles import active_roles
from megarlhf.config.schema import ModelConfig
from megarlhf.models.arch import ArchError, arch_summary
from megarlhf.parallel.layout import ParallelLayout

__all__ = ["MARKER", "MARKER_FORMAT", "read_marker", "write_marker"]  # re-exported

# What a training or evaluation run writes into its output_dir (controller/session.py and the
# trainers): only these are replaced by ``overwrite``. ``prm_step_labels.json`` (automatic PRM
# step labels) is a cache keyed on its inputs and settings that a new run in the same directory
# reuses on purpose; it is neither a previous run nor replaced.
RUN_OUTPUTS = ("config.yaml", "tensorboard", "checkpoints", "hf", "rm_eval.json", "bon.json",
               "bon_samples.jsonl", "prm_step_labels.json.tmp", "logs")
# A checkpoint root (checkpoint.dir): step directories and the pointer.
CHECKPOINT_OUTPUTS = ("latest", "step_*", ".latest.tmp-*")
# What the demo writes into its --output-dir.
DEMO_OUTPUTS = ("data", "sft", "rm", "rm_data", "grpo", "summary.json")


def run_files(ck: str = "checkpoints", prefix: str = "") -> tuple[str, ...]:
    """The files a run writes inside its own entries (fnmatch patterns relative to its output
    directory, ``*`` spanning directories), ``ck`` its checkpoint directory's name: what an
    ``--overwrite`` may delete. Inside a directory whose marker records its files (every model
    megarlhf publishes: ``hf/``, a checkpoint's model) that record is used instead; the
    patterns cover what is written file by file (and exports of older megarlhf versions)."""
    pats = ("config.yaml", "rm_eval.json", "bon.json", "bon_samples.jsonl",
            "prm_step_labels.json.tmp", "tensorboard/events.out.tfevents.*",
            "tensorboard/metrics.jsonl", "logs/*.log", f"{ck}/latest", f"{ck}/.latest.tmp-*",
            f"{ck}/step_*/COMPLETE", f"{ck}/step_*/driver_state.json",
            f"{ck}/step_*/*/rank_*.pt", f"{ck}/step_*/*/model/*", "hf/*")
    return tuple(prefix + p for p in pats)


DEMO_FILES = ("summary.json", "data/*.jsonl", "data/tokenizer.model", "data/tokenizer.vocab",
              "data/tokenizer_dir/*",  # the agent demo's tokenizer, saved with its template
              "rm_data/*.jsonl", "rm_data/summary.json") + run_files(prefix="sft/") + \
    run_files(prefix="rm/") + run_files(prefix="grpo/")


def foreign_files(path: str, own: Sequence[str], files: Sequence[str]) -> list[str]:
    """Files inside ``path``'s own entries (``own``) that megarlhf did not write: under a
    directory whose marker records its files, those not recorded; elsewhere those no pattern of
    ``files`` matches (relative paths, sorted)."""
    import fnmatch

    out = []
    for top in _entries(path):
        if top == MARKER or not _matches(top, own):
            continue
        start = os.path.join(path, top)
        if not os.path.isdir(start) or os.path.islink(start):
            if not any(fnmatch.fnmatchcase(top, p) for p in files) and top not in own:
                out.append(top)
            continue
        for root, dirs, names in os.walk(start):
            rel_root = os.path.relpath(root, path)
            info = read_marker(root)
            if info is not None and isinstance(info.get("files"), list):
                recorded = set(info["files"])
                out += [os.path.normpath(os.path.join(rel_root, f))
                        for f in relative_files(root) if f not in recorded]
                dirs[:] = []
                continue
            for n in names:
                rel = os.path.normpath(os.path.join(rel_root, n))
                if n != MARKER and not any(fnmatch.fnmatchcase(rel, p) for p in files):
                    out.append(rel)
    return sorted(out)


class OutputError(ValueError):
    """A target would destroy files megarlhf did not write, or a resume cannot work; the
    message names the path and what to change."""


def _is_model_checkpoint(directory: str) -> bool:
    try:
        with open(os.path.join(directory, CKPT_MARKER), encoding="utf-8") as f:
            return json.load(f).get("format") == CKPT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _is_legacy_run_dir(directory: str) -> bool:
    """A run directory written before markers existed: its config.yaml is a megarlhf config."""
    path = os.path.join(directory, "config.yaml")
    if not os.path.isfile(path):
        return False
    try:
        import yaml

        with open(path, encoding="utf-8") as f:
            cfg = yaml.safe_load(f)
    except Exception:  # noqa: BLE001 - unreadable: not ours
        return False
    return isinstance(cfg, dict) and {"kind", "actor", "output_dir"} <= set(cfg)


def _is_checkpoint_root(directory: str) -> bool:
    """A training checkpoint root: a ``latest`` pointer and ``step_*`` directories only."""
    names = _entries(directory)
    return "latest" in names and all(_matches(n, CHECKPOINT_OUTPUTS) for n in names)


def is_run_dir(directory: str) -> bool:
    """``directory`` holds a whole run (training, evaluation, the demo) or a checkpoint root,
    as opposed to one model (a checkpoint or an HF export)."""
    info = read_marker(directory)
    writer = str(info.get("writer", "")) if info else ""
    return (writer.split(" ")[0] in ("train", "eval", "demo") or _is_legacy_run_dir(directory)
            or _is_checkpoint_root(directory))


def is_megarlhf_output(directory: str) -> bool:
    """``directory`` was written by megarlhf (marked, a model checkpoint, a training run or a
    checkpoint root of an older megarlhf)."""
    return (read_marker(directory) is not None or _is_model_checkpoint(directory)
            or _is_legacy_run_dir(directory) or _is_checkpoint_root(directory))


# ------------------------------------------------------------------------------ paths
def real(path: str) -> str:
    """The absolute, symlink-resolved form of ``path`` (comparisons go through it)."""
    return os.path.realpath(os.path.abspath(os.path.expanduser(path)))


def relation(a: str, b: str) -> str | None:
    """How path ``a`` relates to path ``b``: "equal", "inside", "contains" or None."""
    ra, rb = real(a), real(b)
    if ra == rb:
        return "equal"
    if ra.startswith(rb.rstrip(os.sep) + os.sep):
        return "inside"
    if rb.startswith(ra.rstrip(os.sep) + os.sep):
        return "contains"
    return None


def overlap_errors(outputs: Mapping[str, str], inputs: Mapping[str, str]) -> list[str]:
    """An output equal to, inside or containing an input: the writer would overwrite (or
    replace) what it reads. Keys are the names the user knows (``--out``, ``output_dir``)."""
    errors = []
    for oname, out in outputs.items():
        for iname, inp in inputs.items():
            rel = relation(out, inp)
            if rel is None:
                continue
            how = {"equal": "is", "inside": "is inside", "contains": "contains"}[rel]
            errors.append(f"{oname} = {out} {how} {iname} = {inp}: megarlhf would write over "
                          f"what it reads; choose an {oname} apart from its inputs")
    return errors


def _entries(directory: str) -> list[str]:
    try:
        return sorted(os.listdir(directory))
    except OSError:
        return []


def _matches(name: str, patterns: Sequence[str]) -> bool:
    import fnmatch

    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _listing(names: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(names[:n])
    return shown + (f" ... (+{len(names) - n} more)" if len(names) > n else "")


# ------------------------------------------------------------------------------ directories
def dir_errors(path: str, *, what: str, own: Sequence[str], resume: bool = False,
               overwrite: bool = False, resume_flag: str | None = "--resume",
               overwrite_flag: str = "--overwrite",
               legacy: Callable[[str], bool] | None = None,
               files: Sequence[str] | None = None) -> list[str]:
    """Whether ``path`` may be written as a directory megarlhf fills entry by entry.

    Args:
        path: the target directory.
        what: its name for the user (``output_dir``, ``--output-dir``).
        own: the entries (names or glob patterns) megarlhf writes there.
        resume: continuing a previous run here is intended.
        overwrite: replacing megarlhf's own entries is intended.
        resume_flag, overwrite_flag: how the user asks for either (None: no resume).
        legacy: recognises an unmarked directory of an older megarlhf as its own.
        files: the files megarlhf writes inside its own entries (:func:`foreign_files`); with
            ``overwrite``, a file among them that megarlhf did not write is refused, not deleted.
    """
    if not os.path.lexists(path):
        return []
    if not os.path.isdir(path):
        return [f"{what} = {path} is a file, not a directory; choose a directory"]
    names = [n for n in _entries(path) if n != MARKER]
    if not names:
        return []
    ours = read_marker(path) is not None or (legacy is not None and legacy(path))
    if not ours:
        return [f"{what} = {path} holds files megarlhf did not write ({_listing(names)}); "
                f"megarlhf writes only into a new or empty directory or its own earlier "
                f"output, and {overwrite_flag} replaces only that; choose another {what}"]
    previous = [n for n in names if _matches(n, own)]
    if previous and not (resume or overwrite):
        ask = (f"pass {resume_flag} to continue it, " if resume_flag else "pass ") + \
            f"{overwrite_flag} to replace it (megarlhf's own files only), or choose another {what}"
        return [f"{what} = {path} holds a previous run ({_listing(previous)}); {ask}"]
    if previous and overwrite and not resume and files is not None:
        foreign = foreign_files(path, own, files)
        if foreign:
            return [f"{what} = {path}: {overwrite_flag} would delete files megarlhf did not "
                    f"write inside its earlier output ({_listing(foreign)}); move them, or "
                    f"choose another {what}"]
    return []


def clear_own_entries(path: str, own: Sequence[str]) -> list[str]:
    """Removes the entries of ``path`` that match ``own`` (an ``overwrite``); returns them."""
    removed = []
    for n in _entries(path):
        if n == MARKER or not _matches(n, own):
            continue
        p = os.path.join(path, n)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        else:
            os.remove(p)
        removed.append(n)
    return removed


def claim_dir(path: str, *, writer: str, what: str, own: Sequence[str], resume: bool = False,
              overwrite: bool = False, inputs: Mapping[str, str] | None = None,
              resume_flag: str | None = "--resume", overwrite_flag: str = "--overwrite",
              legacy: Callable[[str], bool] | None = None,
              files: Sequence[str] | None = None) -> None:
    """Checks ``path`` (:func:`dir_errors`, :func:`overlap_errors`), then creates and marks it;
    with ``overwrite`` megarlhf's own entries of a previous run are removed first.

    Raises:
        OutputError: listing every problem; nothing was written.
    """
    errors = overlap_errors({what: path}, inputs or {}) + dir_errors(
        path, what=what, own=own, resume=resume, overwrite=overwrite, resume_flag=resume_flag,
        overwrite_flag=overwrite_flag, legacy=legacy, files=files)
    if errors:
        raise OutputError(_joined(errors))
    os.makedirs(path, exist_ok=True)
    if overwrite and not resume:
        clear_own_entries(path, own)
    write_marker(path, writer)


def _joined(errors: Sequence[str]) -> str:
    return errors[0] if len(errors) == 1 else "\n  - " + "\n  - ".join(errors)


def target_errors(path: str, *, what: str, inputs: Mapping[str, str], overwrite: bool,
                  overwrite_flag: str = "--overwrite") -> list[str]:
    """Whether ``path`` may be replaced as a whole by a new directory (``convert --out``).

    Allowed: a path that does not exist, an empty directory, and - with ``overwrite`` - a
    directory megarlhf wrote (:func:`is_megarlhf_output`).
    """
    errors = overlap_errors({what: path}, inputs)
    if errors or not os.path.lexists(path):
        return errors
    if not os.path.isdir(path) or os.path.islink(path):
        return [f"{what} = {path} exists and is not a directory megarlhf wrote; choose another "
                f"{what}"]
    names = [n for n in _entries(path) if n != MARKER]
    if not names:
        return []
    if not is_megarlhf_output(path):
        return [f"{what} = {path} holds files megarlhf did not write ({_listing(names)}); "
                f"{overwrite_flag} replaces only megarlhf's own output; choose another {what}"]
    if is_run_dir(path):
        return [f"{what} = {path} is the directory of a megarlhf run (checkpoints, logs, "
                f"exports), not a single model megarlhf wrote; {overwrite_flag} never replaces "
                f"a run: choose another {what}"]
    if not overwrite:
        return [f"{what} = {path} exists (megarlhf output); choose another {what} or pass "
                f"{overwrite_flag} to replace it"]
    info = read_marker(path)
    recorded = info.get("files") if info else None
    if not isinstance(recorded, list):
        return [f"{what} = {path} was written by a megarlhf that did not record its files, so "
                f"{overwrite_flag} cannot tell them from files added since; delete it yourself "
                f"or choose another {what}"]
    foreign = sorted(set(relative_files(path)) - set(recorded))
    if foreign:
        return [f"{what} = {path} holds files megarlhf did not write ({_listing(foreign)}); "
                f"{overwrite_flag} replaces only megarlhf's own output: move them, or choose "
                f"another {what}"]
    return []


def check_target(path: str, *, what: str, inputs: Mapping[str, str], overwrite: bool,
                 overwrite_flag: str = "--overwrite") -> bool:
    """Raises :class:`OutputError` where :func:`target_errors` finds a problem; returns True
    when an existing ``path`` (empty, or megarlhf's own) is to be replaced."""
    errors = target_errors(path, what=what, inputs=inputs, overwrite=overwrite,
                           overwrite_flag=overwrite_flag)
    if errors:
        raise OutputError(_joined(errors))
    return os.path.lexists(path)


def file_target_errors(path: str, *, what: str, inputs: Mapping[str, str], overwrite: bool,
                       ours: Callable[[str], bool],
                       overwrite_flag: str = "--overwrite") -> list[str]:
    """Whether file ``path`` may be written: new, or (with ``overwrite``) a file ``ours``
    recognises as megarlhf's own output; never one of the inputs or inside an input dir."""
    errors = overlap_errors({what: path}, inputs)
    if errors or not os.path.lexists(path):
        return errors
    if os.path.isdir(path):
        return [f"{what} = {path} is a directory; give a file path"]
    if not ours(path):
        return [f"{what} = {path} exists and is not a megarlhf output; {overwrite_flag} "
                f"replaces only megarlhf's own output; choose another {what}"]
    if not overwrite:
        return [f"{what} = {path} exists (an earlier megarlhf output); choose another {what} "
                f"or pass {overwrite_flag} to replace it"]
    return []


# ------------------------------------------------------------------------------ jobs
def job_inputs(job) -> dict[str, str]:
    """The paths a job reads, by their config names."""
    out: dict[str, str] = {}
    for role in ("actor", "critic", "reference", "reward_model"):
        r = getattr(job, role)
        m = r.model if r is not None else None
        if m is None:
            continue
        for f in ("hf_dir", "checkpoint", "tokenizer"):
            v = getattr(m, f)
            if v:
                out[f"{role}.model.{f}"] = v
    d = job.data
    for f in ("train_path", "eval_path", "preference_path", "labelled_path",
              "eval_preference_path", "eval_labelled_path"):
        v = getattr(d, f)
        if v:
            out[f"data.{f}"] = v
    if job.reward.prm_label_policy:
        out["reward.prm_label_policy"] = job.reward.prm_label_policy
    return out


def checkpoint_root(job) -> str:
    return os.path.abspath(job.checkpoint.dir or os.path.join(job.output_dir, "checkpoints"))


def _own_run_entries(job) -> tuple[str, ...]:
    own = list(RUN_OUTPUTS)
    ck = checkpoint_root(job)
    if relation(ck, job.output_dir) == "inside":
        own.append(os.path.relpath(real(ck), real(job.output_dir)).split(os.sep)[0])
    return tuple(own)


def _flags(job) -> tuple[str | None, str]:
    if job.kind == "bon":
        return None, "--overwrite (checkpoint.overwrite=true)"
    return "--resume (checkpoint.resume=true)", "--overwrite (checkpoint.overwrite=true)"


def run_dir_errors(job) -> list[str]:
    """Everything :func:`claim_run_dir` would refuse, without writing anything."""
    resume_flag, overwrite_flag = _flags(job)
    resume, overwrite = job.checkpoint.resume, job.checkpoint.overwrite
    outputs = {"output_dir": job.output_dir}
    ck = checkpoint_root(job)
    ck_outside = job.checkpoint.dir and relation(ck, job.output_dir) is None
    if ck_outside:
        outputs["checkpoint.dir"] = ck
    errors = overlap_errors(outputs, job_inputs(job))
    own = _own_run_entries(job)
    ck_name = own[-1] if len(own) > len(RUN_OUTPUTS) else "checkpoints"
    errors += dir_errors(job.output_dir, what="output_dir", own=own,
                         resume=resume, overwrite=overwrite, resume_flag=resume_flag,
                         overwrite_flag=overwrite_flag, legacy=_is_legacy_run_dir,
                         files=run_files(ck_name))
    if ck_outside:
        errors += dir_errors(ck, what="checkpoint.dir", own=CHECKPOINT_OUTPUTS, resume=resume,
                             overwrite=overwrite, resume_flag=resume_flag,
                             overwrite_flag=overwrite_flag, legacy=_is_checkpoint_root,
                             files=tuple(p.split("/", 1)[1] for p in run_files("c")
                                         if p.startswith("c/")))
    if resume and not errors:
        errors += resume_errors(job)
    return errors


def claim_run_dir(job, writer: str | None = None) -> str:
    """Makes ``job.output_dir`` (and a separate ``checkpoint.dir``) the run's own: refuses what
    :func:`run_dir_errors` finds, clears megarlhf's own entries with ``checkpoint.overwrite``,
    creates and marks the directories. Returns the absolute output_dir.

    Raises:
        OutputError: listing every problem; nothing was written.
    """
    errors = run_dir_errors(job)
    if errors:
        raise OutputError(_joined(errors))
    out = os.path.abspath(job.output_dir)
    writer = writer or ("eval" if job.kind == "bon" else "train") + f" {job.kind}"
    os.makedirs(out, exist_ok=True)
    overwrite = job.checkpoint.overwrite and not job.checkpoint.resume
    if overwrite:
        clear_own_entries(out, _own_run_entries(job))
    write_marker(out, writer)
    ck = checkpoint_root(job)
    if job.checkpoint.dir and relation(ck, out) is None:
        os.makedirs(ck, exist_ok=True)
        if overwrite:
            clear_own_entries(ck, CHECKPOINT_OUTPUTS)
        write_marker(ck, writer)
    return out


# ------------------------------------------------------------------------------ resume
def checkpoint_roles(job) -> list[str]:
    """The roles a training checkpoint of ``job`` holds (what a resume loads)."""
    if job.kind in ("sft", "rm"):
        return ["actor"]
    if job.kind == "bon":
        return []
    return list(active_roles(job))


def latest_checkpoint(root: str) -> str | None:
    """The step directory ``<root>/latest`` names, or None when there is no pointer.

    Raises:
        OutputError: the pointer names a step that is missing or incomplete.
    """
    p = os.path.join(root, "latest")
    if not os.path.isfile(p):
        return None
    try:
        with open(p, encoding="utf-8") as f:
            name = f.read().strip()
    except OSError as e:
        raise OutputError(f"{p}: unreadable ({e})") from None
    d = os.path.join(root, name)
    if not name or os.sep in name or not os.path.isfile(os.path.join(d, "COMPLETE")):
        done = sorted(n for n in _entries(root) if n.startswith("step_")
                      and os.path.isfile(os.path.join(root, n, "COMPLETE")))
        fix = (f"write the name of a complete one into it (complete: {_listing(done[::-1])})"
               if done else "remove the pointer to start from scratch")
        raise OutputError(f"{p} names {name!r}, which is not a complete checkpoint (no "
                          f"{os.path.join(name or '?', 'COMPLETE')}); {fix}")
    return d


def resume_errors(job) -> list[str]:
    """A resume of ``job`` would fail: bad pointer, a role missing from the checkpoint, a role
    saved at another layout or for another model, an unreadable driver state."""
    root = checkpoint_root(job)
    try:
        d = latest_checkpoint(root)
    except OutputError as e:
        return [str(e)]
    if d is None:
        if not is_run_dir(job.output_dir) and not os.path.isdir(root):
            return [f"checkpoint.resume: output_dir = {job.output_dir} never held a megarlhf "
                    "run (no checkpoint to continue from, no run marker); drop --resume "
                    "(checkpoint.resume=true) to start a new run there, or point output_dir at "
                    "the run to continue"]
        return []  # the run stopped before its first checkpoint: it starts again from step 0
    errors = []
    try:
        with open(os.path.join(d, "driver_state.json"), encoding="utf-8") as f:
            state = json.load(f)
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError("no step")
    except (OSError, ValueError) as e:
        errors.append(f"{d}/driver_state.json is missing or corrupt ({e}); resume from another "
                      "checkpoint (edit checkpoints/latest) or start a new run")
    roles = active_roles(job)
    for role in checkpoint_roles(job):
        model_dir = os.path.join(d, role, "model")
        if not os.path.isdir(os.path.join(d, role)):
            saved_roles = [n for n in _entries(d) if os.path.isdir(os.path.join(d, n))]
            errors.append(f"checkpoint.resume: {d} holds no {role} (it holds "
                          f"{_listing(saved_roles) or 'no role'}); this job starts a {role} the "
                          "saved run did not have: resume with the config it was saved with, or "
                          "start a new run")
            continue
        try:
            meta = read_checkpoint_meta(model_dir, verify_files=False)
        except CheckpointError as e:
            errors.append(f"checkpoint.resume: {role}: {e}")
            continue
        here = roles[role].layout()  # the config check has validated this job's layout
        try:
            saved = ParallelLayout(**meta.layout)
        except (TypeError, ValueError) as e:
            errors.append(f"checkpoint.resume: {role}: the layout saved in {model_dir} "
                          f"({meta.layout!r}) is not one megarlhf reads ({e}); the checkpoint "
                          "was written by another version: start a new run from its weights")
            continue
        if saved.describe() != here.describe():
            want = (f"tp: {saved.tp}, pp: {saved.pp}, vpp: {saved.vpp}, dp: {saved.dp}, "
                    f"sequence_parallel: {str(saved.sequence_parallel).lower()}")
            errors.append(
                f"checkpoint.resume: {role} was saved at {saved.describe()} ({d}), this job runs "
                f"it at {here.describe()}; its optimizer and RNG state resume only at the saved "
                f"layout: set {role}.parallel to {{{want}}} and {role}.num_gpus="
                f"{saved.tp * saved.pp * saved.cp * saved.dp}, or start a new run from its "
                f"weights (`megarlhf convert megatron-to-hf --ckpt {model_dir} --out D`, then "
                f"{role}.model.hf_dir=D)")
        errors += _arch_mismatch(job, role, meta.hf_config, d)
    return errors


def _arch_mismatch(job, role: str, saved_cfg: dict[str, Any], step_dir: str) -> list[str]:
    try:
        saved = arch_summary(ModelConfig(arch=dict(saved_cfg)))
    except (ArchError, ConfigError, ValueError, TypeError) as e:
        return [f"checkpoint.resume: the {role} saved in {step_dir} records a model config "
                f"megarlhf cannot read ({e}); resume is not possible: start a new run"]
    try:
        mine = arch_summary(job.role_model(role))
    except (ArchError, ConfigError, ValueError, TypeError):
        return []  # this job's own model: validate's model check reports it, with the fix
    diff = [f"{k}: saved {saved[k]}, config {mine[k]}" for k in
            ("model_type", "num_layers", "hidden_size", "num_attention_heads",
             "num_query_groups", "vocab_size") if saved[k] != mine[k]]
    if not diff:
        return []
    return [f"checkpoint.resume: the {role} saved in {step_dir} is another model ("
            + "; ".join(diff) + f"); resume with the model it was trained from ({role}.model)"]


def resume_data_errors(job, counts: Mapping[str, int]) -> list[str]:
    """The resumed samplers were saved for datasets of other sizes (changed data files).

    Args:
        counts: the sampler's name in the driver state (``sampler``, ``pair_sampler``,
            ``labelled_sampler``) -> the number of rows it draws from now.
    """
    if not job.checkpoint.resume:
        return []
    try:
        d = latest_checkpoint(checkpoint_root(job))
    except OutputError as e:
        return [str(e)]
    if d is None:
        return []
    try:
        with open(os.path.join(d, "driver_state.json"), encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError):
        return []  # resume_errors names it
    errors = []
    for name, n in counts.items():
        saved = (state.get(name) or {}).get("num_samples") if isinstance(state, dict) else None
        if saved is not None and saved != n:
            errors.append(f"checkpoint.resume: {d} was saved for a dataset of {saved} rows "
                          f"({name}), the data now has {n}; resume with the same data files "
                          "(data.*_path) or start a new run")
    return errors


def check_resume_data(job, counts: Mapping[str, int]) -> None:
    """Raises :class:`OutputError` with :func:`resume_data_errors` (trainers call it after
    reading their data, before any worker starts)."""
    errors = resume_data_errors(job, counts)
    if errors:
        raise OutputError(_joined(errors))
