"""Asynchronous PPO, GRPO and online DPO: generation overlapped with learning (methods.md 3).

``asynchronous.enabled: true`` (:meth:`RLTrainer.steps <megarlhf.controller.rl.RLTrainer.steps>`
runs :class:`AsyncLoop`). The rollout replicas sample batch ``b + 1`` while the learner (actor,
critic, reference, reward model) trains on batch ``b``; the weights a batch is sampled with are
at most ``K = asynchronous.max_staleness`` updates old.

How the pieces fit:

* **Who decides.** :class:`~megarlhf.controller.async_schedule.AsyncSchedule` (pure, property
  tested) says when to generate, train, sync or evaluate; :class:`AsyncLoop` carries its
  decisions out, one small handler per task kind and outcome, with the trainer's own phases
  (generate, learn, sync, evaluate: the synchronous loop's). Batch ``b`` takes its prompts in
  data order (the sampler) and its sampling seed from ``b``, exactly as the synchronous loop
  does, so ``K = 0`` reproduces the synchronous run's metrics step by step.
* **Overlap.** A generation runs in the rollout's Ray actors and a learner step in the trainer
  roles' actors; the driver waits on both from two threads (one per side) and reacts to
  whichever finishes first. Generation and learning need separate resources:
  ``cluster.placement: split`` (the rollout on GPUs / CPU slots of its own).
* **Weight sync.** A sync streams the actor's weights (the resharder, bounded buckets) into the
  replicas. A replica is a Ray actor that runs one call at a time, so a sync sent during a
  generation would queue behind it with the learner stuck in the stream; the schedule syncs
  only when the learner is between steps *and* the rollout between generations, so a sync holds
  the learner exactly as long as the sync takes (``time/weight_sync``).
* **Staleness.** The driver counts versions itself (learner: steps trained; rollout: the version
  last pushed) and checks, before every training step, ``staleness = learner version - version
  the batch was sampled with <= K``; a violation raises
  :class:`~megarlhf.controller.async_schedule.StalenessError`. Each step logs
  ``rollout/staleness``, ``rollout/weight_version``, ``time/learner_wait`` (the learner idle,
  waiting for data) and ``time/rollout_wait`` (the rollout idle, waiting for a sync).
  K is a bound: with a rollout slower than the learner the staleness stays near 1.
  ``asynchronous.fixed_staleness: true`` makes it exactly K (after the first K steps; the
  learner waits for the rollout to take each version it still needs), for studies of
  off-policyness.
* **Off-policy losses.** ``algorithm.use_behaviour_logprobs`` (required; validation refuses
  sampling settings whose engine cannot return the log-probs): PPO/GRPO ratios use the
  rollout engine's log-probs as ``logp_old``. An off-policy correction (``algorithm.tis_cap``,
  or ``algorithm.off_policy_correction``: token / sequence truncated or masked IS, IcePop;
  docs/methods.md) makes ``logp_old`` the learner's log-probs at the start of the step and
  weights each token by the truncated or masked ratio ``pi_old / pi_behaviour``.
  Online DPO (``kind: dpo``) needs no ratio at all and was the most robust to stale data in the
  study: prefer it for large K. The rollout-vs-actor log-prob check runs on batches of staleness
  0 only (a stale batch differs from the learner by design).
* **Evaluation** (``train.eval_every``) is a barrier: the in-flight generation finishes (its
  batch is kept), the rollout is synced to the learner, evaluated, and the pipeline restarts.
* **Checkpoints.** A save at step ``L`` holds the learner at version ``L`` (the weight
  version) and the data position before batch ``L``; batches generated but not trained are
  dropped and regenerated after a resume, with the resumed weights.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from megarlhf.controller.async_schedule import (
    EVAL,
    GENERATE,
    SYNC,
    TRAIN,
    AsyncSchedule,
    StalenessError,
    Task,
)
from megarlhf.controller.cluster import Cluster
from megarlhf.controller.experience import Rollout

now = time.perf_counter


@dataclass
class _Generated:
    """A generated batch waiting for the learner."""

    rollout: Rollout
    version: int  # the rollout's weight version it was sampled with
    seconds: float
    rollout_wait: float  # the rollout's idle time before this generation


@dataclass
class _Idle:
    """One side's idle time: since it last finished work, less the syncs and evaluations that
    held it meanwhile."""

    since: float
    blocked: float = 0.0

    def reset(self) -> None:
        self.since, self.blocked = now(), 0.0

    def waited(self) -> float:
        return max(0.0, now() - self.since - self.blocked)


class AsyncLoop:
    """The steps of an RL trainer run as :class:`AsyncSchedule` says (module docstring).

    ``trainer`` is a :class:`~megarlhf.controller.rl.RLTrainer`: its ``next_prompts``,
    ``generate``, ``learn``, ``sync``, ``evaluate`` and ``step_metrics`` are the phases; before
    it yields a step the loop sets ``trainer.position`` (the data position a save of the step
    records) and ``trainer.async_state``.
    """

    def __init__(self, trainer: Any, cl: Cluster, start: int):
        job = trainer.job
        self.t, self.cl = trainer, cl
        self.K = job.asynchronous.max_staleness
        self.sched = AsyncSchedule(job.train.steps, self.K, start=start,
                                   eval_every=job.train.eval_every,
                                   fixed=job.asynchronous.fixed_staleness)
        self.learner_version = self.rollout_version = start  # counted here, checked
        self.generated: dict[int, _Generated] = {}
        self.position_before: dict[int, dict[str, Any]] = {}  # batch -> data position
        self.running: dict[Future, Task] = {}
        self.learning: dict[int, tuple[_Generated, int, float]] = {}  # batch -> (g, stale, wait)
        self.syncs: list[tuple[float, float]] = []  # (seconds, bytes) since the last step
        self.held: tuple[int, dict[str, float], dict[str, Any]] | None = None  # at an eval
        self.done: list[tuple[int, dict[str, float], dict[str, Any]]] = []  # to yield
        self.learner, self.rollout = _Idle(now()), _Idle(now())
        self.last_end = now()
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="megarlhf-async")

    def steps(self) -> Iterator[tuple[int, dict[str, float]]]:
        """``(steps done, metrics)`` as steps finish (after their evaluation, if one is due)."""
        try:
            while not self.sched.done:
                tasks = self.sched.next_tasks()
                for task in tasks:
                    self.start(task)
                if not tasks:
                    self.wait_for_one()
                while self.done:
                    last, metrics, position = self.done.pop(0)
                    # What a save of step `last` records: the learner at version `last`, the
                    # data position before batch `last`.
                    self.t.position = position
                    self.t.async_state = {"weight_version": last, "max_staleness": self.K}
                    yield last, metrics
                    self.learner.reset()  # logging and saving the step is not idle time
        finally:
            # On a stop, an in-flight generation is abandoned (redone after a resume); its
            # thread ends when the cluster's actors are stopped.
            self.pool.shutdown(wait=False, cancel_futures=True)

    # ---------------------------------------------------------------- starting tasks
    def start(self, task: Task) -> None:
        {SYNC: self.run_sync, EVAL: self.run_eval, GENERATE: self.start_generate,
         TRAIN: self.start_train}[task.kind](task)

    def run_sync(self, task: Task) -> None:
        """Pushes the learner's weights into the rollout (both sides wait for it)."""
        m = self.t.sync(self.cl, task.version)
        dt = m["time/weight_sync"]
        self.syncs.append((dt, m["perf/weight_sync_gb_per_s"] * 1e9 * dt))
        self.rollout_version = task.version
        self.learner.blocked += dt
        self.rollout.blocked += dt
        self.sched.finish(task)

    def run_eval(self, task: Task) -> None:
        """The evaluation barrier: evaluates the held step, then lets it be logged and saved."""
        t0 = now()
        if self.held is None or self.held[0] != task.version:
            raise RuntimeError(f"async schedule out of step: evaluation at version "
                               f"{task.version} without its step")
        step, metrics, position = self.held
        self.held = None
        metrics.update(self.t.evaluate(self.cl, step))
        self.learner.blocked += now() - t0
        self.rollout.blocked += now() - t0
        self.sched.finish(task)
        self.finish_step(step, metrics, position)
        self.learner.reset()

    def start_generate(self, task: Task) -> None:
        if task.version != self.rollout_version:
            raise RuntimeError(f"async schedule out of step: generating batch {task.batch} with "
                               f"version {task.version}, the rollout holds {self.rollout_version}")
        self.position_before[task.batch] = self.t.sampler.state_dict()
        prompts = self.t.next_prompts()
        self.submit(task, self.generate, prompts, task, self.rollout.waited())

    def start_train(self, task: Task) -> None:
        g = self.generated.pop(task.batch)
        staleness = self.learner_version - g.version
        if task.batch != self.learner_version or not 0 <= staleness <= self.K:
            raise StalenessError(
                f"batch {task.batch} was sampled with weights version {g.version}; the learner "
                f"is at version {self.learner_version}: staleness {staleness} is outside "
                f"[0, asynchronous.max_staleness={self.K}]")
        self.learning[task.batch] = (g, staleness, self.learner.waited())
        self.submit(task, self.t.learn, self.cl, g.rollout, check_logprobs=staleness == 0)

    def submit(self, task: Task, fn, *args, **kwargs) -> None:
        self.running[self.pool.submit(fn, *args, **kwargs)] = task

    def generate(self, prompts: list, task: Task, rollout_wait: float) -> _Generated:
        """(In the rollout's thread.) One batch, with the seed of its step."""
        t0 = now()
        rollout = self.t.generate(self.cl, prompts, task.batch)
        return _Generated(rollout, task.version, now() - t0, rollout_wait)

    # ---------------------------------------------------------------- finished tasks
    def wait_for_one(self) -> None:
        """Waits for a running task; reports every one that finished (generations first)."""
        if not self.running:
            raise RuntimeError("async schedule stalled with nothing running")
        finished, _ = wait(list(self.running), return_when=FIRST_COMPLETED)
        for fut in sorted(finished, key=lambda f: self.running[f].kind != GENERATE):
            task = self.running.pop(fut)
            result = fut.result()  # a worker's error surfaces here
            self.sched.finish(task)
            if task.kind == GENERATE:
                self.generated[task.batch] = result
                self.rollout.reset()
            else:
                self.trained(task, result)

    def trained(self, task: Task, metrics: dict[str, float]) -> None:
        """A training step finished: the learner holds version ``batch + 1``."""
        self.learner_version = last = task.batch + 1
        g, staleness, wait_s = self.learning.pop(task.batch)
        metrics.update(self.step_timing(g, wait_s))
        metrics["rollout/staleness"] = float(staleness)
        metrics["rollout/weight_version"] = float(g.version)
        t = now()
        metrics.update(self.t.step_metrics(g.rollout.batch, t - self.last_end))
        self.last_end = t
        position = self.position_before.pop(last, None) or self.t.sampler.state_dict()
        if self.sched.eval_pending == last:  # logged and saved after the evaluation
            self.held = (last, metrics, position)
        else:
            self.finish_step(last, metrics, position)
        self.learner.reset()

    def step_timing(self, g: _Generated, learner_wait: float) -> dict[str, float]:
        """The generation, the waits, and the syncs since the previous step."""
        m = {"time/generate": g.seconds, "time/learner_wait": learner_wait,
             "time/rollout_wait": g.rollout_wait,
             "time/weight_sync": sum(s for s, _ in self.syncs)}
        if self.syncs:
            m["perf/weight_sync_gb_per_s"] = (sum(b for _, b in self.syncs)
                                              / max(m["time/weight_sync"], 1e-9) / 1e9)
        self.syncs.clear()
        return m

    def finish_step(self, last: int, metrics: dict[str, float], position: dict[str, Any]
                    ) -> None:
        """Queues step ``last`` for the run skeleton (log, save)."""
        self.done.append((last, metrics, position))
