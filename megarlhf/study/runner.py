"""The study runner: every job instance of the sweep, in dependency order, skipping the
complete ones; then aggregation, plot, table and verdict.

One runner, two launchers:

* :class:`LocalLauncher` runs one job at a time on this machine, each in its own process
  (``python -m megarlhf.study.job``, the CLI's own entry), its output in ``logs/<job>.log``;
  a job that crashes (or is killed) loses nothing but itself. The job processes die with
  the runner (a ``kill -9`` of the runner stops them too, PR_SET_PDEATHSIG on Linux).
* :class:`RayJobLauncher` submits each job to a Ray cluster (``ray.job_submission``) with at
  most ``max_concurrent`` at once; the same entry point runs there (the cluster needs the
  study's output_dir on a shared filesystem, as every multi-node job does).

Resume: a job counts as done only when its directory has ``COMPLETE.json`` (written by the job
process after its final outputs). Running the study again skips those and starts the rest: a
training job that was killed continues from its last checkpoint (``--resume``: from step 0
when it had none), an evaluation or builtin starts again. A completed job whose command
differs from the study's current one (the study file changed) is refused, never overwritten.

Layout of the study's ``output_dir``::

    study.yaml          the study file as run (overrides applied)
    plan.json           every run, its job instances and their command lines
    jobs/<job>/<point>  each job instance's own output_dir (COMPLETE.json when done)
    logs/<job>__<point>.log
    results/            runs.json, table.md, <study>.png, verdict.json, report.md
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from megarlhf.checkpoint.atomic import (
    read_complete,
    read_marker,
    write_file_atomic,
    write_json_atomic,
    write_marker,
)
from megarlhf.checkpoint.outputs import OutputError, claim_dir
from megarlhf.study.errors import StudyError
from megarlhf.study.report import write_report
from megarlhf.study.sweep import JobInstance, StudyPlan

STUDY_OUTPUTS = ("study.yaml", "plan.json", "jobs", "logs", "results", ".lock")


# ------------------------------------------------------------------------------ launchers
def job_entry(inst: JobInstance, inputs: dict[str, Any] | None = None) -> list[str]:
    """The arguments of ``python -m megarlhf.study.job`` for ``inst``; ``inputs``
    (:func:`job_inputs`) is recorded in its ``COMPLETE.json``."""
    extra = ["--inputs", json.dumps(inputs, sort_keys=True)] if inputs is not None else []
    if inst.job.builtin is not None:
        return ["--out", inst.out_dir, "--builtin", inst.job.builtin,
                "--params", json.dumps(inst.params)] + extra
    return ["--out", inst.out_dir] + extra + ["--"] + inst.argv()


def job_inputs(plan: StudyPlan, inst: JobInstance) -> dict[str, Any]:
    """What a job's result depends on besides its command line, recorded when it completes
    and compared when the study runs again: a builtin's parameters, the bytes of a command's
    config file (sha256), and when each job it reads from completed (a rerun upstream job
    makes its readers stale)."""
    rec: dict[str, Any] = {}
    if inst.job.builtin is not None:
        rec["params"] = json.loads(json.dumps(inst.params, sort_keys=True))
    elif inst.job.config:
        try:
            with open(inst.job.config, "rb") as f:
                rec["config_sha256"] = hashlib.sha256(f.read()).hexdigest()
        except OSError:
            rec["config_sha256"] = None  # validate_plan has refused a missing config
    rec["deps"] = {d: _record_digest(read_complete(plan.instances[d].out_dir))
                   for d in inst.deps}
    return rec


def _record_digest(info: dict[str, Any] | None) -> str | None:
    """A job's completion record in 16 hex digits (it changes whenever the job runs again)."""
    if info is None:
        return None
    return hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:16]


class Launcher(Protocol):
    concurrency: int

    def start(self, inst: JobInstance, entry: list[str], log_path: str) -> Any: ...

    def poll(self, handle: Any) -> int | None: ...

    def stop(self, handle: Any) -> None: ...


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    os.setpgrp()  # its own process group: the runner's Ctrl-C reaches it only through us


class LocalLauncher:
    """One job at a time, each ``python -m megarlhf.study.job`` in its own process."""

    concurrency = 1

    def __init__(self, python: str | None = None):
        self.python = python or sys.executable

    def start(self, inst: JobInstance, entry: list[str], log_path: str) -> Any:
        import subprocess

        log = open(log_path, "ab")
        log.write(f"\n$ megarlhf {shlex.join(inst.argv()) if inst.job.command else ''}"
                  f"\n$ {shlex.join(['python', '-m', 'megarlhf.study.job'] + entry)}\n"
                  .encode())
        log.flush()
        proc = subprocess.Popen([self.python, "-m", "megarlhf.study.job"] + entry,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=_die_with_parent if os.name == "posix" else None)
        return proc, log

    def poll(self, handle: Any) -> int | None:
        proc, log = handle
        rc = proc.poll()
        if rc is not None:
            log.close()
        return rc

    def stop(self, handle: Any) -> None:
        import subprocess

        proc, log = handle
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # a training job saves a checkpoint and exits
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


class RayJobLauncher:
    """Each job a Ray job (``JobSubmissionClient.submit_job``), at most ``max_concurrent``.

    Args:
        address: the Ray dashboard address (``http://HEAD:8265``) or ``auto``.
        max_concurrent: jobs submitted at once.
        runtime_env: Ray's runtime environment for every job (``working_dir``, ``env_vars``).
        client: a ``JobSubmissionClient`` (tests pass a fake one).
        python: the interpreter on the cluster.
    """

    TERMINAL = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 1}

    def __init__(self, address: str | None, *, max_concurrent: int = 4,
                 runtime_env: dict[str, Any] | None = None, client: Any = None,
                 python: str = "python"):
        if client is None:
            from ray.job_submission import JobSubmissionClient

            client = JobSubmissionClient(address)
        self.client = client
        self.concurrency = max(1, int(max_concurrent))
        self.runtime_env = runtime_env
        self.python = python

    def start(self, inst: JobInstance, entry: list[str], log_path: str) -> Any:
        entrypoint = shlex.join([self.python, "-m", "megarlhf.study.job"] + entry)
        sid = self.client.submit_job(entrypoint=entrypoint, runtime_env=self.runtime_env,
                                     metadata={"megarlhf_study_job": inst.key})
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(f"\n$ ray job {sid}: {entrypoint}\n")
        return sid, log_path

    def poll(self, handle: Any) -> int | None:
        sid, log_path = handle
        status = self.client.get_job_status(sid)
        status = str(getattr(status, "value", status)).split(".")[-1]
        if status not in self.TERMINAL:
            return None
        with contextlib.suppress(Exception), open(log_path, "a", encoding="utf-8") as f:
            f.write(self.client.get_job_logs(sid))
        return self.TERMINAL[status]

    def stop(self, handle: Any) -> None:
        with contextlib.suppress(Exception):
            self.client.stop_job(handle[0])


# ------------------------------------------------------------------------------ runner
@dataclass
class StudyOutcome:
    """What :func:`run_study` did."""

    output_dir: str
    done: list[str] = field(default_factory=list)  # complete job instances (before + now)
    ran: list[str] = field(default_factory=list)  # run now
    skipped: list[str] = field(default_factory=list)  # complete before this invocation
    failed: dict[str, str] = field(default_factory=dict)  # key -> why (incl. blocked)
    results: dict[str, Any] | None = None  # the report (results/verdict.json)


def log_path(plan: StudyPlan, inst: JobInstance) -> str:
    return os.path.join(plan.spec.output_dir, "logs", inst.key.replace("/", "__") + ".log")


def _inputs_mismatch(plan: StudyPlan, inst: JobInstance, info: dict[str, Any]) -> str | None:
    got, want = info.get("inputs"), job_inputs(plan, inst)
    if not isinstance(got, dict):
        return (f"{inst.out_dir} completed without a record of its inputs (an older megarlhf), "
                "so a change of its config or parameters cannot be seen")
    if got.get("params") != want.get("params"):
        return (f"{inst.out_dir} completed with params {json.dumps(got.get('params'))}; the "
                f"study now gives {json.dumps(want.get('params'))}")
    if got.get("config_sha256") != want.get("config_sha256"):
        return (f"{inst.out_dir} completed with another version of its config "
                f"{inst.job.config} (the file changed since)")
    stale = [d for d, t in want["deps"].items() if (got.get("deps") or {}).get(d) != t]
    if stale:
        return (f"{inst.out_dir} read {', '.join(stale)}, which ran again (or is not complete) "
                "since")
    return None


def _recorded_mismatch(inst: JobInstance, info: dict[str, Any],
                       plan: StudyPlan | None = None) -> str | None:
    want = ["builtin", inst.job.builtin] if inst.job.builtin else inst.argv()
    got = info.get("command")
    if got is not None and got != want:
        got = [str(g) for g in got]
        was = [g for g in got if g not in want]
        now = [w for w in want if w not in got]
        if not was and not now:
            return f"{inst.out_dir} completed with the same arguments in another order"
        return (f"{inst.out_dir} completed with {shlex.join(was) if was else '-'}; the "
                f"study now gives {shlex.join(now) if now else '-'} instead")
    return _inputs_mismatch(plan, inst, info) if plan is not None else None


def completed(plan: StudyPlan) -> tuple[set[str], list[str]]:
    """The complete job instances, and problems: completed with another command."""
    done, problems = set(), []
    for key, inst in plan.instances.items():
        info = read_complete(inst.out_dir)
        if info is None:
            continue
        why = _recorded_mismatch(inst, info, plan)
        if why:
            problems.append(why)
        else:
            done.add(key)
    return done, problems


def claim_study_dir(plan: StudyPlan) -> None:
    """The study's output_dir is new, empty, or this study's own (never anything else)."""
    spec = plan.spec
    writer = f"study {spec.study}"
    info = read_marker(spec.output_dir) if os.path.isdir(spec.output_dir) else None
    if info is not None and info.get("writer") != writer:
        raise StudyError(f"output_dir = {spec.output_dir} holds the output of "
                         f"`{info.get('writer')}`, not of study {spec.study}; choose another "
                         "output_dir")
    try:
        claim_dir(spec.output_dir, writer=writer, what="output_dir", own=STUDY_OUTPUTS,
                  resume=True, resume_flag=None)
    except OutputError as e:
        raise StudyError(str(e)) from None
    write_marker(spec.output_dir, writer)
    for sub in ("jobs", "logs", "results"):
        os.makedirs(os.path.join(spec.output_dir, sub), exist_ok=True)


@contextlib.contextmanager
def _study_lock(out_dir: str):
    """One runner per study directory at a time (released by the OS if the runner dies)."""
    import fcntl

    f = open(os.path.join(out_dir, ".lock"), "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise StudyError(f"output_dir = {out_dir} is in use by another `megarlhf study` "
                         "process; wait for it to finish (or stop it) first") from None
    try:
        f.write(str(os.getpid()))
        f.flush()
        yield
    finally:
        f.close()


def write_plan(plan: StudyPlan) -> None:
    import yaml

    spec = plan.spec
    write_file_atomic(os.path.join(spec.output_dir, "study.yaml"),
                      yaml.safe_dump(spec.raw, sort_keys=False))
    write_json_atomic(os.path.join(spec.output_dir, "plan.json"), {
        "study": spec.study, "source": spec.path,
        "runs": [{"index": r.index, "point": r.point, "seed": r.seed, "jobs": r.jobs}
                 for r in plan.runs],
        "jobs": {k: {"out_dir": i.out_dir, "deps": i.deps,
                     "command": (["builtin", i.job.builtin, json.dumps(i.params)]
                                 if i.job.builtin else ["megarlhf"] + i.argv())}
                 for k, i in plan.instances.items()}})


def run_study(plan: StudyPlan, launcher: Launcher, *, progress: bool = True,
              poll_s: float = 1.0, echo: Callable[[str], None] | None = None,
              report: bool = True) -> StudyOutcome:
    """Runs every job instance of ``plan`` that is not complete, then writes the report.

    ``plan`` must have passed :func:`~megarlhf.study.sweep.validate_plan`.

    Raises:
        StudyError: the output_dir is not this study's, another runner holds it, or a
            complete job was run with another command.
    """
    spec = plan.spec
    claim_study_dir(plan)
    out = StudyOutcome(spec.output_dir)
    with _study_lock(spec.output_dir):
        done, problems = completed(plan)
        if problems:
            raise StudyError("the study's output_dir holds jobs run with other settings; "
                             "choose another output_dir (or move those job directories "
                             "away):\n  - " + "\n  - ".join(problems))
        write_plan(plan)
        out.skipped = [k for k in plan.instances if k in done]
        bar = _bar(len(plan.instances), len(done), spec.study, progress)
        say = echo or (bar.write if bar is not None else lambda s: print(s, flush=True))
        if done:
            say(f"megarlhf study: {len(done)} of {len(plan.instances)} jobs already complete "
                f"in {spec.output_dir}; running the other {len(plan.instances) - len(done)}")
        try:
            _schedule(plan, launcher, done, out, bar, say, poll_s)
        finally:
            if bar is not None:
                bar.close()
        out.done = [k for k in plan.instances if k in done]
        if report:
            out.results = write_report(plan, failed=out.failed)
    return out


def _bar(total: int, initial: int, name: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=f"study {name}", unit="job",
                file=sys.stdout, dynamic_ncols=True)


def _schedule(plan: StudyPlan, launcher: Launcher, done: set[str], out: StudyOutcome, bar,
              say: Callable[[str], None], poll_s: float) -> None:
    pending = [k for k in plan.instances if k not in done]
    running: dict[str, Any] = {}
    old = signal.getsignal(signal.SIGTERM)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    with contextlib.suppress(ValueError):  # not the main thread
        signal.signal(signal.SIGTERM, on_term)
    try:
        while pending or running:
            progressed = False
            for key in list(pending):
                inst = plan.instances[key]
                blocked = [d for d in inst.deps if d in out.failed]
                if blocked:
                    pending.remove(key)
                    out.failed[key] = f"not run: {blocked[0]} failed"
                    progressed = True
                    continue
                if len(running) >= launcher.concurrency:
                    continue
                if all(d in done for d in inst.deps):
                    if bar is not None:
                        bar.set_postfix_str(key, refresh=True)
                    running[key] = launcher.start(inst, job_entry(inst, job_inputs(plan, inst)),
                                                  log_path(plan, inst))
                    pending.remove(key)
                    progressed = True
            for key, handle in list(running.items()):
                rc = launcher.poll(handle)
                if rc is None:
                    continue
                del running[key]
                progressed = True
                inst = plan.instances[key]
                if rc == 0 and read_complete(inst.out_dir) is not None:
                    done.add(key)
                    out.ran.append(key)
                    if bar is not None:
                        bar.update(1)
                else:
                    why = f"exit code {rc}; see {log_path(plan, inst)}"
                    out.failed[key] = why
                    say(f"megarlhf study: job {key} failed ({why})")
            if not progressed:
                if not running and pending and not any(
                        all(d in done for d in plan.instances[k].deps) for k in pending):
                    for k in pending:  # nothing can start: waiting on failed jobs only
                        out.failed.setdefault(k, "not run: an upstream job failed")
                    break
                time.sleep(poll_s)
    except KeyboardInterrupt:
        for key, handle in running.items():
            say(f"megarlhf study: stopping {key} (it resumes when the study runs again)")
            launcher.stop(handle)
        raise
    finally:
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGTERM, old)
