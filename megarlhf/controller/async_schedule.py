"""The asynchronous schedule, pure: when to generate, with which weights, when to sync.

Two resources work at once: the *rollout* (the generator's replicas) and the *learner* (actor,
critic, reference, reward model). Batch ``b`` is trained at learner step ``b``; every step
produces one new weight *version*, so the learner holds version ``L`` = the number of batches
it has trained, and the rollout holds the version ``R <= L`` last synced into it. A batch
generated with version ``v`` and trained at step ``b`` has

    staleness = b - v        (learner version at train time - the version it was sampled with)

and the schedule keeps ``staleness <= K`` (``asynchronous.max_staleness``) by construction:

* generate batch ``b`` (the next one in data order) when the rollout is idle and
  ``b - R <= K``; otherwise the rollout waits for a sync;
* train batch ``L`` when the learner is idle and batch ``L`` has been generated;
* sync (push version ``L`` into the rollout) when *both* are idle and ``R < L`` (and batches are
  left to generate): a sync streams the learner's weights into the replicas, so it needs the
  learner between steps and the rollout between generations. It never waits behind a
  generation and never holds the learner longer than itself;
* evaluation at version ``L`` (every ``eval_every`` steps) is a barrier: nothing new starts until
  the rollout is idle, then sync to ``L`` (if needed), evaluate, continue.

With ``fixed=True`` (``asynchronous.fixed_staleness``) every batch is sampled *exactly* ``K``
versions before it is trained (batch ``b`` with version ``b - K``; the first ``K`` batches after
the start, a resume or an evaluation with the newest weights there are): the rollout is synced
only to the version the next batch needs, and the learner waits rather than move past that
version before the sync. Without it a rollout slower than the learner is synced as soon as
both are free, so the staleness stays near 1 whatever ``K`` is: fastest, but not a controlled
amount of off-policyness (what a study of it needs).

``K = 0`` degenerates to the synchronous order ``generate(b), train(b), sync`` for every ``b``;
``K = 1`` is "one step off-policy": batch ``b + 1`` is generated with version ``b`` while the
learner trains batch ``b``, then both meet for the sync.

:class:`AsyncSchedule` is the state machine the driver (:mod:`megarlhf.controller.async_rl`)
follows; :func:`simulate` runs it on a simulated clock with given durations (tests; predicting
the speed-up of ``K`` from measured phase times).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

GENERATE, TRAIN, SYNC, EVAL = "generate", "train", "sync", "eval"


class StalenessError(RuntimeError):
    """A batch would be trained with weights more than ``max_staleness`` versions old."""


@dataclass(frozen=True)
class Task:
    """One unit of work the schedule starts.

    Attributes:
        kind: ``generate`` (rollout), ``train`` (learner), ``sync`` (both), ``eval`` (rollout,
            while the learner waits at the barrier).
        batch: the batch index for generate / train (= the step it is trained at); -1 else.
        version: generate: the rollout's weight version used; train: the version the batch was
            generated with; sync: the version pushed; eval: the version evaluated.
        staleness: train only: ``batch - version``.
    """

    kind: str
    batch: int = -1
    version: int = -1
    staleness: int = 0

    @property
    def uses_learner(self) -> bool:
        return self.kind in (TRAIN, SYNC)

    @property
    def uses_rollout(self) -> bool:
        return self.kind in (GENERATE, SYNC, EVAL)


class AsyncSchedule:
    """The state machine of the asynchronous loop (see the module docstring).

    Drive it with :meth:`next_tasks` (start what it returns) and :meth:`finish` (report a task
    done), until :attr:`done`.

    Args:
        steps: train steps of the run (batches ``start .. steps - 1``).
        max_staleness: K >= 0.
        start: the first step (resume); the learner and the rollout both hold version ``start``
            (the driver syncs before the loop).
        eval_every: evaluation barrier every this many steps (0: none).
        fixed: staleness exactly ``K`` rather than at most ``K`` (see the module doc).
    """

    def __init__(self, steps: int, max_staleness: int, *, start: int = 0, eval_every: int = 0,
                 fixed: bool = False):
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        if not 0 <= start <= steps:
            raise ValueError(f"start={start} must be in [0, steps={steps}]")
        self.steps = steps
        self.K = max_staleness
        self.eval_every = eval_every
        self.fixed = fixed
        self.learner_version = start  # L: batches trained
        self.rollout_version = start  # R: version the rollout holds
        self.next_batch = start       # the next batch to generate (data order)
        self.ready: dict[int, int] = {}  # generated, not yet trained: batch -> version
        self.running: list[Task] = []
        self.eval_pending: int | None = None

    # ---------------------------------------------------------------- queries
    @property
    def done(self) -> bool:
        return (self.learner_version >= self.steps and not self.running
                and self.eval_pending is None)

    def _idle(self) -> tuple[bool, bool]:
        return (not any(t.uses_learner for t in self.running),
                not any(t.uses_rollout for t in self.running))

    def learner_idle(self) -> bool:
        return self._idle()[0]

    def rollout_idle(self) -> bool:
        return self._idle()[1]

    # ---------------------------------------------------------------- decisions
    def next_tasks(self) -> list[Task]:
        """The tasks to start now (marked running); empty: wait for a running one to finish.

        A ``sync`` or ``eval`` task comes alone (the driver runs it and calls :meth:`finish`
        before asking again).
        """
        out: list[Task] = []
        learner_idle, rollout_idle = self._idle()
        L, R = self.learner_version, self.rollout_version
        if self.eval_pending is not None:  # the barrier: drain, sync, evaluate
            if learner_idle and rollout_idle:
                v = self.eval_pending
                out.append(Task(SYNC, version=v) if R < v else Task(EVAL, version=v))
            self.running += out
            return out
        # fixed: the version the next batch is to be sampled with (older ones are not kept)
        target = self.next_batch - self.K
        if (learner_idle and rollout_idle and R < L and self.next_batch < self.steps
                and (not self.fixed or R < target <= L)):
            out.append(Task(SYNC, version=L))
            self.running += out
            return out
        if rollout_idle and self.next_batch < self.steps and self.next_batch - R <= self.K:
            out.append(Task(GENERATE, batch=self.next_batch, version=R))
            self.next_batch += 1
        # fixed: training batch L drops version L, which batch L + K (not started yet) is to be
        # sampled with: wait until the rollout holds it
        hold = self.fixed and R < L and self.next_batch <= L + self.K < self.steps
        if learner_idle and L < self.steps and L in self.ready and not hold:
            v = self.ready.pop(L)
            s = L - v
            if s > self.K:  # cannot happen by construction; a violated invariant is a bug
                raise StalenessError(
                    f"batch {L} was generated with weights version {v} and would be trained at "
                    f"version {L}: staleness {s} > asynchronous.max_staleness={self.K}")
            out.append(Task(TRAIN, batch=L, version=v, staleness=s))
        self.running += out
        return out

    def finish(self, task: Task) -> None:
        """Records ``task`` (one :meth:`next_tasks` returned) as done."""
        self.running.remove(task)
        if task.kind == GENERATE:
            self.ready[task.batch] = task.version
        elif task.kind == TRAIN:
            self.learner_version = task.batch + 1
            L = self.learner_version
            if self.eval_every and L % self.eval_every == 0:
                self.eval_pending = L
        elif task.kind == SYNC:
            self.rollout_version = task.version
        elif task.kind == EVAL:
            self.eval_pending = None


# -------------------------------------------------------------------- simulation
@dataclass
class SimResult:
    """What :func:`simulate` observed.

    Attributes:
        makespan: simulated time until the last task ended.
        trace: ``(start, end, task)`` of every task, in start order.
        staleness: per trained batch, in step order.
        learner_wait: total learner idle time (not training, syncing or at an eval barrier).
    """

    makespan: float
    trace: list[tuple[float, float, Task]] = field(default_factory=list)
    staleness: list[int] = field(default_factory=list)
    learner_wait: float = 0.0

    def order(self) -> list[tuple[str, int]]:
        """``(kind, batch-or-version)`` in start order."""
        return [(t.kind, t.batch if t.kind in (GENERATE, TRAIN) else t.version)
                for _, _, t in self.trace]


def simulate(steps: int, max_staleness: int, gen_time: Callable[[int], float],
             train_time: Callable[[int], float], sync_time: float | Callable[[int], float] = 0.0,
             *, eval_every: int = 0, eval_time: float = 0.0, start: int = 0,
             fixed: bool = False) -> SimResult:
    """Runs :class:`AsyncSchedule` on a simulated clock (no Ray, no threads).

    Args:
        steps, max_staleness, eval_every, start, fixed: as :class:`AsyncSchedule`.
        gen_time: generation duration of batch ``b``.
        train_time: learner duration of batch ``b`` (reward, scoring, updates).
        sync_time: duration of a sync (a number, or a function of the version pushed).
        eval_time: duration of an evaluation.
    """
    sched = AsyncSchedule(steps, max_staleness, start=start, eval_every=eval_every, fixed=fixed)
    sync_fn = sync_time if callable(sync_time) else (lambda v: sync_time)
    now = 0.0
    ends: list[tuple[float, int, Task]] = []  # (end time, start seq, task)
    res = SimResult(makespan=0.0)
    seq = 0
    while not sched.done:
        started = sched.next_tasks()
        for t in started:
            d = {GENERATE: lambda: gen_time(t.batch), TRAIN: lambda: train_time(t.batch),
                 SYNC: lambda: sync_fn(t.version), EVAL: lambda: eval_time}[t.kind]()
            if d < 0:
                raise ValueError(f"negative duration {d} for {t}")
            ends.append((now + d, seq, t))
            res.trace.append((now, now + d, t))
            seq += 1
            if t.kind == TRAIN:
                res.staleness.append(t.staleness)
        if started:
            continue
        if not ends:
            raise RuntimeError(f"schedule stalled: L={sched.learner_version}, "
                               f"R={sched.rollout_version}, next={sched.next_batch}")
        ends.sort(key=lambda e: (e[0], e[1]))
        end, _, t = ends.pop(0)
        now = end
        sched.finish(t)
    res.makespan = now
    busy = sum(e - s for s, e, t in res.trace if t.uses_learner or t.kind == EVAL)
    res.learner_wait = max(0.0, now - busy)  # (the learner also stands still at an eval)
    return res
