"""Asynchronous PPO, GRPO and online DPO: generation overlapped with learning (methods.md 3).

``asynchronous.enabled: true`` (``train_rl`` dispatches here). The rollout replicas sample batch
``b + 1`` while the learner (actor, critic, reference, reward model) trains on batch ``b``; the
weights a batch is sampled with are at most ``K = asynchronous.max_staleness`` updates old.

How the pieces fit:

* **Who decides.** :class:`~megarlhf.controller.async_schedule.AsyncSchedule` (pure, property
  tested) says when to generate, train, sync or evaluate; this driver carries its decisions
  out. Batch ``b`` takes its prompts in data order (the sampler) and its sampling seed from
  ``b``, exactly as the synchronous loop does, so ``K = 0`` reproduces the synchronous run's
  metrics step by step.
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
* **Off-policy losses.** ``algorithm.use_behaviour_logprobs`` (required): PPO/GRPO ratios use the
  rollout engine's log-probs as ``logp_old``. ``algorithm.tis_cap`` adds truncated importance
  sampling: ``logp_old`` becomes the learner's log-probs at the start of the step and the
  per-token weight ``min(pi / pi_behaviour, tis_cap)`` corrects from the behaviour policy.
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
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from megarlhf.config import JobConfig
from megarlhf.config.base import ConfigError
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
from megarlhf.rewards.computer import RewardComputer
from megarlhf.controller.rl import RLTrainer


@dataclass
class _Generated:
    """A generated batch waiting for the learner."""

    prompts: list
    batch: Any  # TokenBatch
    info: dict[str, Any]
    version: int  # the rollout's weight version it was sampled with
    seconds: float
    rollout_wait: float  # the rollout's idle time before this generation


class AsyncRLTrainer(RLTrainer):
    """PPO / GRPO / online DPO with generation and learning overlapped (module docstring).

    Public API: ``AsyncRLTrainer(job).run()`` (the same history dict as
    :meth:`RLTrainer.run`); usually reached through ``train_rl(job)`` /
    ``megarlhf train grpo CONFIG asynchronous.enabled=true``.
    """

    def __init__(self, job: JobConfig):
        if not job.asynchronous.enabled:
            raise ConfigError("AsyncRLTrainer runs jobs with asynchronous.enabled=true; "
                              "use RLTrainer for synchronous training")
        super().__init__(job)
        self.K = job.asynchronous.max_staleness

    # ---------------------------------------------------------------- the two sides
    def _generate(self, cl: Cluster, prompts: list, task: Task, rollout_wait: float
                  ) -> _Generated:
        t0 = time.perf_counter()
        batch, info = self.generate(cl, prompts, task.batch)
        return _Generated(prompts, batch, info, task.version, time.perf_counter() - t0,
                          rollout_wait)

    def _learn(self, cl: Cluster, rewards: RewardComputer, g: _Generated, staleness: int
               ) -> dict[str, float]:
        return self.learn(cl, rewards, g.prompts, g.batch, g.info,
                          check_logprobs=staleness == 0)

    # ---------------------------------------------------------------- the loop
    def train_loop(self, cl: Cluster, rewards: RewardComputer, sampler, start: int,
                   history: dict[str, Any]) -> int:
        """Runs steps ``start ..`` as the schedule says; returns the last step done."""
        job = self.job
        sched = AsyncSchedule(job.train.steps, self.K, start=start,
                              eval_every=job.train.eval_every)
        learner_version = rollout_version = start  # counted here, checked against the schedule
        generated: dict[int, _Generated] = {}
        sampler_before: dict[int, dict[str, Any]] = {}  # batch -> data position before it
        running: dict[Future, Task] = {}
        learning: dict[int, tuple[_Generated, int, float]] = {}  # batch -> (gen, stale, wait)
        syncs: list[tuple[float, float]] = []  # (seconds, bytes) since the last logged step
        held: tuple[int, dict[str, float], dict[str, Any]] | None = None  # step at an eval
        now = time.perf_counter
        last, last_end = start, now()
        learner_free, learner_blocked = now(), 0.0  # idle since; syncs/evals since then
        rollout_free, rollout_blocked = now(), 0.0
        pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="megarlhf-async")
        stop = False
        try:
            while not sched.done and not stop:
                tasks = sched.next_tasks()
                for task in tasks:
                    if task.kind == SYNC:
                        m: dict[str, float] = {}
                        t0 = now()
                        self.sync(cl, m)
                        dt = now() - t0
                        rollout_version = task.version
                        syncs.append((dt, m["perf/weight_sync_gb_per_s"] * 1e9
                                      * m["time/weight_sync"]))  # (seconds, bytes)
                        learner_blocked += dt
                        rollout_blocked += dt
                        sched.finish(task)
                    elif task.kind == EVAL:
                        t0 = now()
                        if held is None or held[0] != task.version:
                            raise RuntimeError(f"async schedule out of step: evaluation at "
                                               f"version {task.version} without its step")
                        step, metrics, sampler_state = held
                        metrics.update(self.maybe_evaluate(cl, step, history))
                        learner_blocked += now() - t0
                        rollout_blocked += now() - t0
                        sched.finish(task)
                        held = None
                        stop = not self._end_of_step(cl, step, metrics, history, sampler_state)
                        learner_free, learner_blocked = now(), 0.0
                    elif task.kind == GENERATE:
                        if task.version != rollout_version:
                            raise RuntimeError(f"async schedule out of step: generating batch "
                                               f"{task.batch} with version {task.version}, the "
                                               f"rollout holds {rollout_version}")
                        sampler_before[task.batch] = sampler.state_dict()
                        prompts = [self.prompts[i]
                                   for i in sampler.take(job.batch.rollout_prompts_global)]
                        wait_s = max(0.0, now() - rollout_free - rollout_blocked)
                        running[pool.submit(self._generate, cl, prompts, task, wait_s)] = task
                    elif task.kind == TRAIN:
                        g = generated.pop(task.batch)
                        staleness = learner_version - g.version
                        if task.batch != learner_version or not 0 <= staleness <= self.K:
                            raise StalenessError(
                                f"batch {task.batch} was sampled with weights version "
                                f"{g.version}; the learner is at version {learner_version}: "
                                f"staleness {staleness} is outside [0, asynchronous."
                                f"max_staleness={self.K}]")
                        wait_s = max(0.0, now() - learner_free - learner_blocked)
                        learning[task.batch] = (g, staleness, wait_s)
                        running[pool.submit(self._learn, cl, rewards, g, staleness)] = task
                if tasks or stop:
                    continue
                if not running:
                    raise RuntimeError("async schedule stalled with nothing running")
                done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for fut in sorted(done, key=lambda f: running[f].kind != GENERATE):
                    task = running.pop(fut)
                    result = fut.result()  # a worker's error surfaces here
                    sched.finish(task)
                    if task.kind == GENERATE:
                        generated[task.batch] = result
                        rollout_free, rollout_blocked = now(), 0.0
                        continue
                    # A training step finished: the learner holds version batch + 1.
                    learner_version = task.batch + 1
                    last = learner_version
                    g, staleness, wait_s = learning.pop(task.batch)
                    metrics = result
                    metrics["time/generate"] = g.seconds
                    metrics["time/learner_wait"] = wait_s
                    metrics["time/rollout_wait"] = g.rollout_wait
                    metrics["time/weight_sync"] = sum(s for s, _ in syncs)
                    if syncs:
                        metrics["perf/weight_sync_gb_per_s"] = (
                            sum(b for _, b in syncs) / max(sum(s for s, _ in syncs), 1e-9) / 1e9)
                    syncs.clear()
                    metrics["rollout/staleness"] = float(staleness)
                    metrics["rollout/weight_version"] = float(g.version)
                    t = now()
                    self.step_metrics(g.batch, metrics, t - last_end)
                    last_end = t
                    sampler_state = (sampler_before.pop(last) if last in sampler_before
                                     else sampler.state_dict())
                    if sched.eval_pending == last:  # log and save after the evaluation
                        held = (last, metrics, sampler_state)
                    else:
                        stop = not self._end_of_step(cl, last, metrics, history, sampler_state)
                    learner_free, learner_blocked = now(), 0.0
        finally:
            # On a stop, an in-flight generation is abandoned (redone after a resume); its
            # thread ends when the cluster's actors are stopped.
            pool.shutdown(wait=False, cancel_futures=True)
        return last

    def _end_of_step(self, cl: Cluster, last: int, metrics: dict[str, float],
                     history: dict[str, Any], sampler_state: dict[str, Any]) -> bool:
        return self.end_of_step(cl, last, metrics, history, sampler_state, {
            "asynchronous": {"weight_version": last, "max_staleness": self.K}})
