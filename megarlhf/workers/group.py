"""Driving a group of Ray actors as one: declared dispatch/collect, bounded waits, clear failures.

:class:`ActorGroup` holds one actor per rank and binds every method its worker class declares
with :func:`~megarlhf.workers.dispatch.register` as a group method: ``group.forward(batch)``
dispatches, calls every rank, waits and collects. ``group.submit("forward", batch)`` returns a
:class:`PendingCall` instead, so a driver can run several groups at once (split placement).

Failures surface in the driver, never as a silent hang:

* every wait is bounded: ``timeout_s`` per call (the group's ``call_timeout_s`` by default);
  past it :class:`WorkerTimeoutError` names the role, the method and the ranks that did not
  finish (workers on the driver's node also dump their Python stacks to their logs);
* the driver polls the results every ``poll_s``: a rank whose process died resolves at once
  with Ray's ``ActorDiedError`` and becomes :class:`WorkerDiedError` naming role and rank; a
  Python exception on a rank becomes :class:`WorkerCallError` with that rank's traceback;
* after the first failure the driver waits ``grace_s`` for the other ranks: when every rank
  raised (a deterministic error, e.g. a missing batch field, hit by all ranks alike) the group
  stays usable; otherwise (a rank died, returned, or is still running) its torch.distributed
  world is inconsistent and the group is *broken*: its actors are killed (the survivors would
  wait for the dead rank in a collective until the process-group timeout) and every later
  call raises :class:`GroupBrokenError` at once.

Ranks inside a torch.distributed world also time out on their own: the worker initialises its
process group with a timeout (``pg_timeout_s``), so a collective whose peer is gone raises on
the surviving ranks too.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import time
from collections.abc import Sequence
from typing import Any

from megarlhf.engine.batch import TokenBatch
from megarlhf.workers.dispatch import (
    DispatchContext,
    MethodSpec,
    RankInfo,
    collect_results,
    dispatch_args,
    registered_methods,
)


class WorkerError(RuntimeError):
    """A worker group call failed; the message names the role, the rank(s) and the method."""

    def __init__(self, message: str, *, role: str, ranks: Sequence[int], method: str):
        super().__init__(message)
        self.role = role
        self.ranks = list(ranks)
        self.method = method

    def __reduce__(self):
        # Keyword-only fields: pickle (Ray, when a worker's call of another group fails) needs
        # them spelled out, or the error arrives as Ray's "failed to deserialize".
        return (_rebuild_error, (type(self), str(self), self.role, self.ranks, self.method))


def _rebuild_error(cls, message, role, ranks, method):
    return cls(message, role=role, ranks=ranks, method=method)


class WorkerDiedError(WorkerError):
    """A worker process died (killed, OOM, segfault) during a call."""


class WorkerCallError(WorkerError):
    """A worker raised a Python exception; the message carries its traceback."""


class WorkerTimeoutError(WorkerError):
    """A call did not finish within its timeout (a hung collective, a stuck rank)."""


class GroupBrokenError(WorkerError):
    """The group failed before and its actors were stopped; build a new one."""


def _is_large(v: Any) -> bool:
    import torch

    if isinstance(v, (TokenBatch, torch.Tensor)):
        return True
    if isinstance(v, (list, tuple)):
        return len(v) > 64 or any(_is_large(x) for x in v[:8])
    if isinstance(v, dict):
        return any(_is_large(x) for x in v.values())
    return False


class PendingCall:
    """A call in flight on every rank of a group; :meth:`result` waits for it (bounded)."""

    def __init__(self, group: "ActorGroup", method: str, spec: MethodSpec, refs: list,
                 ctx: DispatchContext, timeout_s: float):
        self.group = group
        self.method = method
        self.spec = spec
        self.refs = refs
        self.ctx = ctx
        self.timeout_s = timeout_s
        self.started = time.monotonic()
        self._done = False
        self._value: Any = None

    def result(self) -> Any:
        """The collected result; raises a :class:`WorkerError` naming role and rank on failure."""
        if not self._done:
            results = self.group._wait(self)
            self._value = collect_results(self.spec, self.group.ranks, results, self.ctx)
            self._done = True
        return self._value


class ActorGroup:
    """One Ray actor per rank, driven as one (see the module docstring).

    Args:
        role: the role's name (in every message).
        actors: Ray actor handles, in rank order.
        ranks: each actor's :class:`RankInfo`, in rank order.
        worker_cls: the (plain) worker class; its :func:`register`-ed methods become group
            methods.
        call_timeout_s: default bound of every call.
        poll_s: how often the driver checks for dead ranks while waiting.
        grace_s: after a rank fails, how long to wait for the others before declaring the
            group broken.
    """

    def __init__(self, role: str, actors: list, ranks: list[RankInfo], worker_cls: type, *,
                 call_timeout_s: float = 1800.0, poll_s: float = 0.5, grace_s: float = 3.0):
        if len(actors) != len(ranks):
            raise ValueError("one RankInfo per actor is needed")
        self.role = role
        self.actors = list(actors)
        self.ranks = list(ranks)
        self.worker_cls = worker_cls
        self.call_timeout_s = call_timeout_s
        self.poll_s = poll_s
        self.grace_s = grace_s
        self.broken: str | None = None
        self._methods = registered_methods(worker_cls)
        for name in self._methods:
            if hasattr(type(self), name):
                continue  # the group defines its own front for this method
            setattr(self, name, self._bound(name))

    # ------------------------------------------------------------------ calls
    def _bound(self, name: str):
        fn = getattr(self.worker_cls, name)

        @functools.wraps(fn)
        def call(*args, timeout_s: float | None = None, **kwargs):
            return self.submit(name, *args, timeout_s=timeout_s, **kwargs).result()

        return call

    @property
    def world_size(self) -> int:
        return len(self.actors)

    @property
    def dp_size(self) -> int:
        return self.ranks[0].dp_size

    def methods(self) -> dict[str, MethodSpec]:
        """The worker methods this group dispatches, with their declared modes."""
        return dict(self._methods)

    def call(self, method: str, *args, timeout_s: float | None = None, **kwargs) -> Any:
        """Calls a registered worker method on the group and waits for the collected result."""
        return self.submit(method, *args, timeout_s=timeout_s, **kwargs).result()

    def submit(self, method: str, *args, timeout_s: float | None = None, **kwargs
               ) -> PendingCall:
        """Starts a registered worker method on every rank; returns its :class:`PendingCall`."""
        import ray

        self._check_usable(method)
        spec = self._methods.get(method)
        if spec is None:
            raise AttributeError(f"{self.worker_cls.__name__}.{method} is not a registered worker "
                                 f"method; registered: {sorted(self._methods)}")
        cache: dict[int, Any] = {}

        def put(v):
            if not _is_large(v):
                return v
            if id(v) not in cache:  # one object-store copy per value, shared by its ranks
                cache[id(v)] = (v, ray.put(v))
            return cache[id(v)][1]

        per_rank, ctx = dispatch_args(spec, getattr(self.worker_cls, method), self.ranks,
                                      args, kwargs, put)
        refs = [getattr(a, method).remote(*ra, **rk) for a, (ra, rk) in zip(self.actors,
                                                                            per_rank)]
        return PendingCall(self, method, spec, refs, ctx,
                           self.call_timeout_s if timeout_s is None else timeout_s)

    def _check_usable(self, method: str) -> None:
        if self.broken is not None:
            raise GroupBrokenError(
                f"{self.role}: cannot call {method}(): the group is broken since an earlier "
                f"failure ({self.broken}); its workers were stopped, build a new group",
                role=self.role, ranks=[], method=method)

    # ------------------------------------------------------------------ waiting
    def _wait(self, call: PendingCall) -> list[Any]:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        pending = {ref: rank for rank, ref in enumerate(call.refs)}
        results: dict[int, Any] = {}
        errors: dict[int, tuple[str, str]] = {}  # rank -> (kind, text)
        deadline = call.started + call.timeout_s
        grace_end = None
        while pending:
            now = time.monotonic()
            end = deadline if grace_end is None else min(deadline, grace_end)
            if now >= end:
                break
            ready, _ = ray.wait(list(pending), num_returns=len(pending),
                                timeout=min(self.poll_s, end - now))
            for ref in ready:
                rank = pending.pop(ref)
                try:
                    results[rank] = ray.get(ref)
                except RayActorError as e:
                    errors[rank] = ("died", _short(e))
                except RayTaskError as e:
                    errors[rank] = ("raised", _cause_text(e))
                except Exception as e:  # noqa: BLE001 - anything else Ray reports for a task
                    errors[rank] = ("raised", f"{type(e).__name__}: {e}")
            if errors and grace_end is None:
                grace_end = time.monotonic() + self.grace_s
        if not errors and not pending:
            return [results[r] for r in range(len(call.refs))]
        return self._fail(call, results, errors, sorted(pending.values()))

    def _fail(self, call: PendingCall, results: dict, errors: dict, unfinished: list[int]):
        method, role = call.method, self.role
        lines = []
        for rank in sorted(errors):
            kind, text = errors[rank]
            what = "died" if kind == "died" else "raised"
            lines.append(f"--- {role} rank {rank} ({self.ranks[rank].where()}) {what}:\n{text}")
        dumped = self._dump_stacks(unfinished) if unfinished and not errors else []
        for rank in unfinished:
            note = " (Python stack dumped to its worker log)" if rank in dumped else ""
            lines.append(f"--- {role} rank {rank} ({self.ranks[rank].where()}) had not "
                         f"finished{note}")
        elapsed = time.monotonic() - call.started
        if errors:
            died = [r for r, (k, _) in errors.items() if k == "died"]
            bad = died or sorted(errors)
            cls = WorkerDiedError if died else WorkerCallError
            head = (f"{role} rank{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))} "
                    f"{'died' if died else 'failed'} during {method}() after {elapsed:.1f} s")
        else:
            bad = unfinished
            cls = WorkerTimeoutError
            head = (f"{role}: {method}() did not finish within {call.timeout_s:.0f} s on "
                    f"rank{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))} (a hung "
                    "collective or a stuck rank; raise timeout_s if the step is just slow)")
        # Usable only if every rank raised (a deterministic error before or outside any
        # collective); a rank that returned, died or still runs leaves the world inconsistent.
        keep = not unfinished and not results and all(k == "raised" for k, _ in errors.values())
        if keep:
            head += "; every rank reported, the group remains usable"
        else:
            self.broken = head
            self.shutdown()
            head += f"; the {role} group is broken and its workers were stopped"
        raise cls(head + "\n" + "\n".join(lines), role=role, ranks=bad, method=method)

    def _dump_stacks(self, ranks: list[int]) -> list[int]:
        """SIGUSR1 to unfinished workers on this node: they dump their stacks (faulthandler)."""
        import ray

        here = ray.util.get_node_ip_address()
        done = []
        for r in ranks:
            info = self.ranks[r]
            if info.pid and info.node_ip == here:
                try:
                    os.kill(info.pid, signal.SIGUSR1)
                    done.append(r)
                except OSError:
                    pass
        if done:
            time.sleep(0.5)
        return done

    # ------------------------------------------------------------------ lifetime
    def shutdown(self) -> None:
        """Stops every actor of the group (idempotent)."""
        import ray

        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass

    def __repr__(self) -> str:
        state = "broken" if self.broken else "ok"
        return (f"<{type(self).__name__} {self.role}: {self.world_size} ranks, "
                f"dp {self.dp_size}, {state}>")


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _short(e: Exception, limit: int = 600) -> str:
    s = _ANSI.sub("", str(e)).strip()
    return s if len(s) <= limit else s[:limit] + " ..."


def _cause_text(e: Exception) -> str:
    """The remote traceback of a RayTaskError (Ray's str() already carries it)."""
    return _ANSI.sub("", str(e)).strip()


def wait_all(calls: Sequence[PendingCall]) -> list[Any]:
    """Results of several pending calls (e.g. of different groups), in order."""
    return [c.result() for c in calls]
