"""Run a function on W local ranks, each its own process in one torch.distributed world.

Used by the tests (the ``dist`` tier), the benchmarks and the CPU tools (``megarlhf score``,
``megarlhf convert``) to run megatron's real code on several gloo ranks of one machine.

* Processes come from a fork server that has already imported torch and megatron-core, so a rank
  starts in well under a second instead of re-importing them.
* A free TCP port is picked for the rendezvous; the group is initialised before ``fn`` runs and
  destroyed after it returns.
* A ``timeout`` bounds the whole run: a hung collective fails in seconds with the Python stack of
  every rank (dumped by ``faulthandler``) instead of hanging CI.
* An exception on any rank stops all ranks and is re-raised in the caller with every rank's
  traceback.
"""

from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import signal
import socket
import sys
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

_PRELOAD = ["megarlhf.platform", "torch", "megatron.core"]
_CTX = None


class DistributedRunError(RuntimeError):
    """One or more ranks failed or the run timed out; the message holds every rank's report."""


def free_port() -> int:
    """A TCP port on the loopback interface that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _context():
    global _CTX
    if _CTX is None:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)
        _CTX = ctx
    return _CTX


def _rank_main(fn, rank, world_size, port, args, kwargs, queue, threads, env, pg_timeout_s,
               unset=()):
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    for name in unset:  # the caller's own defaults (platform.default_env): each rank decides
        os.environ.pop(name, None)
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        import torch

        if threads:
            torch.set_num_threads(threads)
        from megarlhf.platform import init_platform

        platform = init_platform(local_rank=rank)
        torch.distributed.init_process_group(
            backend=platform.backend,
            rank=rank,
            world_size=world_size,
            init_method=f"tcp://127.0.0.1:{port}",
            timeout=timedelta(seconds=pg_timeout_s),
        )
        try:
            result = fn(*args, **kwargs)
        finally:
            try:
                from megarlhf.parallel.layout import destroy_parallel

                destroy_parallel()
            except Exception:  # noqa: BLE001 - best effort cleanup
                pass
            torch.distributed.destroy_process_group()
        queue.put((rank, "ok", _dumps(result)))
    except BaseException:  # noqa: BLE001 - reported to the parent
        queue.put((rank, "error", traceback.format_exc()))


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    threads_per_rank: int | None = None,
    env: dict[str, str] | None = None,
    daemon: bool = True,
    **kwargs: Any,
) -> list[Any]:
    """Runs ``fn(*args, **kwargs)`` on ``world_size`` ranks and returns each rank's result.

    Args:
        fn: a module-level function (it is pickled by reference into the rank processes).
        world_size: number of ranks.
        timeout: seconds for the whole run; past it every rank's stack is printed, all ranks
            are killed and :class:`DistributedRunError` is raised.
        threads_per_rank: torch intra-op threads per rank; default: cores / world_size, >= 1.
        env: extra environment variables for the ranks.
        daemon: start the ranks as daemonic processes (killed when the caller exits). A rank
            that starts processes of its own (a vLLM engine) must not be daemonic; the ranks
            are killed when the run ends either way.

    Returns:
        ``[result_of_rank_0, ..., result_of_rank_{W-1}]`` (results must be picklable).
    """
    ctx = _context()
    port = free_port()
    if threads_per_rank is None:
        threads_per_rank = max(1, (os.cpu_count() or 1) // world_size)
    queue = ctx.Queue()
    procs = []
    pg_timeout_s = max(10, int(timeout))
    from megarlhf.platform import process_env_defaults

    unset = process_env_defaults()  # then ``env`` is applied on top in each rank
    for rank in range(world_size):
        p = ctx.Process(
            target=_rank_main,
            args=(fn, rank, world_size, port, args, kwargs, queue, threads_per_rank, env or {},
                  pg_timeout_s, unset),
            daemon=daemon,
        )
        p.start()
        procs.append(p)

    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                rank, status, payload = queue.get(timeout=min(remaining, 0.5))
            except Exception:  # queue.Empty
                dead = [i for i, p in enumerate(procs)
                        if not p.is_alive() and p.exitcode not in (0, None)
                        and i not in results and i not in errors]
                for i in dead:
                    errors[i] = f"rank {i} died with exit code {procs[i].exitcode}"
                if errors:
                    # Give the others a moment to report, then stop.
                    _drain(queue, results, errors, 2.0)
                    break
                continue
            if status == "ok":
                results[rank] = _loads(payload)
            else:
                errors[rank] = payload
            if errors:
                _drain(queue, results, errors, 2.0)
                break
    finally:
        pending = [i for i in range(world_size) if i not in results and i not in errors]
        if pending:
            for i in pending:
                if procs[i].is_alive():
                    os.kill(procs[i].pid, signal.SIGUSR1)  # dump its Python stack
            time.sleep(0.5)
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(timeout=5)

    if errors or len(results) < world_size:
        lines = []
        for i in range(world_size):
            if i in errors:
                lines.append(f"--- rank {i} failed:\n{errors[i]}")
            elif i not in results:
                lines.append(f"--- rank {i} did not finish within {timeout:.0f} s "
                             "(its stack was dumped to stderr above)")
        raise DistributedRunError(
            f"distributed run of {getattr(fn, '__qualname__', fn)} on {world_size} ranks failed:\n"
            + "\n".join(lines)
        )
    return [results[i] for i in range(world_size)]


def _drain(queue, results, errors, seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            rank, status, payload = queue.get(timeout=0.1)
        except Exception:
            continue
        if status == "ok":
            results[rank] = _loads(payload)
        else:
            errors[rank] = payload


def _dumps(obj: Any) -> bytes:
    # torch.save, not the multiprocessing pickler: the latter passes tensors as shared-memory
    # handles that die with the rank process.
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _loads(data: bytes) -> Any:
    import io

    import torch

    return torch.load(io.BytesIO(data), weights_only=False)
