"""The run skeleton every trainer shares: session, workers, resume, saves, export, signals.

:meth:`Trainer.run` is written once; SFT, reward-model, RL and asynchronous RL trainers
(:mod:`.sft`, :mod:`.rm`, :mod:`.rl`, :mod:`.async_rl`) supply their step and a few hooks::

    validate(job)                                    every rule, before anything starts
    session = Session(job)                           claims output_dir, config.yaml, TensorBoard
    trainer.prepare()                                read + tokenize the data (no workers yet)
    check_resume_data(trainer.data_sizes())          a resume continues on the same data
    with trainer.open_cluster() as cl:               placement + worker groups (Ray)
        SIGTERM / SIGINT handlers                    (after ray.init, which installs its own)
        start = resume(cl)                           checkpoint.resume: roles + driver state
        trainer.begin(cl, start)                     e.g. weight sync, evaluation at step 0
        for last, metrics in trainer.steps(cl, start):
            log(last, metrics)
            stop (exit 1, no save, no export) on a NaN/inf loss or grad norm
            save(last) when due, when a signal asked to stop, or at the last step: once
            stop after the save if a signal asked
        export hf/ when the run reached train.steps
    return trainer.result(last, metrics)

``trainer.steps`` runs ``trainer.step`` for each step in order; the asynchronous trainer yields
steps as its schedule finishes them. Each step is saved at most once (the SIGTERM path used to
save a step a second time, and that second save removed the directory ``latest`` pointed to).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from megarlhf.checkpoint.atomic import record_added_files, relative_files
from megarlhf.checkpoint.outputs import check_resume_data
from megarlhf.checkpoint.role_state import export_role_hf
from megarlhf.checkpoint.training import (
    driver_rng_state,
    load_training_state,
    save_training_state,
    set_driver_rng_state,
)
from megarlhf.config import JobConfig
from megarlhf.controller.cluster import Cluster
from megarlhf.controller.session import Session
from megarlhf.data.job_data import load_job_tokenizer
from megarlhf.observability.divergence import check_finite
from megarlhf.observability.logs import setup_driver_logging
from megarlhf.planning import validate
from megarlhf.workers import GroupBrokenError, WorkerDiedError, WorkerError, WorkerTimeoutError

# How long a failed call waits for Ray to declare a node dead (its health checks notice a
# stopped raylet within ~15-30 s); only after a failure that looks like a lost peer.
NODE_VERDICT_S = 40.0


def _peer_gone(e: WorkerError) -> bool:
    """A failure that a lost node could explain: a rank died, hung, or saw its peer die."""
    text = str(e)  # a rank's error may carry a peer's death (weight sync: a rollout replica)
    return (isinstance(e, (WorkerDiedError, WorkerTimeoutError, GroupBrokenError))
            or any(k in text for k in ("had not finished", "WorkerDiedError", "ActorDiedError",
                                       "ActorUnavailableError", "RayActorError")))


class Trainer:
    """A training job run by :meth:`run` (module docstring); subclasses supply :meth:`step`.

    Attributes:
        job: the job config (read, never changed).
        tokenizer: the actor's tokenizer.
        session: the run's :class:`Session` (from :meth:`run` on).
        roles: the roles a checkpoint holds (the cluster's trained and frozen roles).
        desc: the progress bar's label.
        progress_keys: metrics the progress bar shows.
    """

    desc = ""
    progress_keys: tuple[str, ...] = ()

    def __init__(self, job: JobConfig):
        self.job = job
        self.tokenizer = load_job_tokenizer(job)
        self.session: Session | None = None
        self.roles: list[str] = ["actor"]

    # ------------------------------------------------------------------ hooks
    def prepare(self) -> None:
        """Reads and checks the data (the session exists, no worker runs yet)."""

    def data_sizes(self) -> dict[str, int] | None:
        """Sizes of the data the samplers draw from, by state key (a resume must find the
        same; :func:`~megarlhf.checkpoint.outputs.check_resume_data`); None until
        :meth:`prepare` has read the data (then asked again)."""
        return {}

    def open_cluster(self) -> Cluster:
        """The job's placement and worker groups (default: the actor alone, no rollout)."""
        return Cluster(self.job, roles=["actor"], rollout=False, pad_id=self.tokenizer.pad_id)

    def begin(self, cl: Cluster, start: int) -> None:
        """After the resume, before step ``start``."""

    def step(self, cl: Cluster, step: int) -> dict[str, float]:
        """Runs step ``step`` (0-based); returns the metrics logged at step ``step + 1``."""
        raise NotImplementedError

    def steps(self, cl: Cluster, start: int) -> Iterator[tuple[int, dict[str, float]]]:
        """``(steps done, metrics)`` after each step from ``start`` on, in order."""
        for step in range(start, self.job.train.steps):
            yield step + 1, self.step(cl, step)

    def state_dict(self) -> dict[str, Any]:
        """The driver's state after the last yielded step (data position, history)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict` (resume)."""

    def result(self, last: int, metrics: dict[str, float], hf_dir: str | None
               ) -> dict[str, Any]:
        """What :meth:`run` returns: by default the last metrics, ``step`` and ``hf_dir``."""
        out: dict[str, Any] = dict(metrics, step=last)
        if hf_dir is not None:
            out["hf_dir"] = hf_dir
        return out

    # ------------------------------------------------------------------ the skeleton
    def run(self) -> dict[str, Any]:
        job = self.job
        validate(job)
        sizes = self.data_sizes()
        if sizes is not None:  # known before the session writes anything into output_dir
            check_resume_data(job, sizes)
        self.session = session = Session(job, total_steps=job.train.steps, desc=self.desc)
        setup_driver_logging(session.output_dir)  # other libraries' output: logs/, not here
        last, metrics, hf_dir = 0, {}, None
        try:
            self.prepare()
            if sizes is None:
                check_resume_data(job, self.data_sizes() or {})  # before any worker starts
            with self.open_cluster() as cl:
                session.install_signal_handlers()  # after ray.init, which installs its own
                session.log_line(f"megarlhf: placement: {cl.describe()}")
                self.roles = [r for r in self.roles if r in cl]
                during = "while resuming"
                try:
                    last = start = self.resume(cl)
                    during = f"before step {start + 1}"
                    self.begin(cl, start)
                    session.start_progress(start, self.progress_keys)
                    during = f"during step {start + 1}"
                    for last, metrics in self.steps(cl, start):
                        session.log(last, metrics)
                        # A NaN/inf loss or grad norm: stop with the last good checkpoint kept.
                        check_finite(metrics, step=last,
                                     checkpoint_root=session.checkpoints.root)
                        if self.save_due(last):
                            during = f"while saving step {last}"
                            self.save(cl, last)
                        during = f"during step {last + 1}"
                        if session.stop_requested:
                            break
                    during = "while exporting hf/"
                    if last == job.train.steps:
                        hf_dir = self.export(cl)
                except WorkerError as e:
                    # A node that left takes ranks of several roles with it: say which, and
                    # where to resume, instead of one role's "rank died".
                    lost = cl.lost_nodes(wait_s=NODE_VERDICT_S if _peer_gone(e) else 0.0)
                    if lost:
                        raise cl.node_lost_error(lost, during=during,
                                                 resume_hint=self.resume_hint()) from e
                    raise
        finally:
            session.close()
        return self.result(last, metrics, hf_dir)

    def resume_hint(self) -> str:
        """Where a restart continues from: the last complete checkpoint, and the command."""
        job, ckpt = self.job, self.session.checkpoints
        try:
            latest = ckpt.latest_step_dir()
        except RuntimeError as e:  # a pointer to an incomplete save (never written that way)
            return f"No usable checkpoint: {e}"
        again = (f"once the Ray cluster has {job.cluster.num_nodes} node(s) with "
                 f"{job.cluster.gpus_per_node} GPUs again (replace the lost node, or change "
                 "cluster.num_nodes and the roles' num_gpus to what is left)")
        if latest is None:
            return (f"No complete checkpoint yet under {ckpt.root} (checkpoint.save_every = "
                    f"{job.checkpoint.save_every}): a restart begins at step 0; restart "
                    f"{again}.")
        step = ckpt.read_driver_state(latest).get("step", "?")
        return (f"The last complete checkpoint is {latest} (step {step}): resume from it with "
                f"`megarlhf train {job.kind} CONFIG --resume` (the same output_dir) {again}.")

    def save_due(self, last: int) -> bool:
        """Step ``last`` is saved: every ``checkpoint.save_every`` steps, when a signal asked
        to stop, and at the last step."""
        every = self.job.checkpoint.save_every
        return bool(every and last % every == 0) or self.session.stop_requested \
            or last == self.job.train.steps

    def save(self, cl: Cluster, last: int) -> str:
        state = {"rng": driver_rng_state(), **self.state_dict()}
        return save_training_state(self.session.checkpoints, cl, last, state, self.roles)

    def resume(self, cl: Cluster) -> int:
        """Loads the newest complete checkpoint when ``checkpoint.resume``; returns the step."""
        if not self.job.checkpoint.resume:
            return 0
        got = load_training_state(self.session.checkpoints, cl, self.roles)
        if got is None:
            self.session.log_line(f"megarlhf: checkpoint.resume=true but "
                                  f"{self.session.checkpoints.root} holds no complete "
                                  "checkpoint; starting from scratch")
            return 0
        d, state = got
        set_driver_rng_state(state["rng"])
        self.load_state_dict(state)
        self.session.log_line(f"megarlhf: resumed from {d} (step {state['step']})")
        return state["step"]

    def export(self, cl: Cluster) -> str:
        """Writes the actor as an HF directory with its tokenizer: ``<output_dir>/hf``."""
        hf_dir = os.path.join(self.session.output_dir, "hf")
        cl["actor"].execute(export_role_hf, hf_dir)  # the weights' own dtype
        if not os.path.isfile(os.path.join(hf_dir, "tokenizer_config.json")):
            before = set(relative_files(hf_dir))
            self.tokenizer.export_hf(hf_dir)
            # megarlhf's own files too: a later --overwrite must not take them for a user's
            record_added_files(hf_dir, sorted(set(relative_files(hf_dir)) - before))
        return hf_dir
