"""Failures of a worker group surface in the driver within a bounded time, naming role and rank.

Each scenario runs a real tiny actor (llama, 2 layers, hidden 64, random weights) at TP2 on a
local Ray cluster with fake GPUs; every scenario but the first leaves its group broken, so each
builds its own.
"""

import os
import signal
import sys
import time

import pytest
import torch

pytestmark = pytest.mark.ray
ray = pytest.importorskip("ray")
# Functions of this module travel to the workers by value (the workers cannot import it).
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _group(tp=2, **kwargs):
    from megarlhf.config.base import from_dict
    from megarlhf.config.schema import JobConfig
    from megarlhf.controller.cluster import ClusterPlacement
    from megarlhf.models.tiny import tiny_arch
    from megarlhf.planning.placement import plan_placement
    from megarlhf.workers import WorkerGroup

    job = from_dict(JobConfig, {
        "kind": "sft",
        "cluster": {"num_nodes": 1, "gpus_per_node": 8, "placement": "split"},
        "actor": {"model": {"arch": tiny_arch("llama", num_layers=2), "dtype": "fp32"},
                  "parallel": {"tp": tp}, "num_gpus": tp,
                  "optimizer": {"name": "sgd", "lr": 0.01, "use_distributed_optimizer": False}},
    })
    placement = ClusterPlacement(plan_placement(job), "GPU", timeout_s=30)
    kwargs = {"call_timeout_s": 60, "pg_timeout_s": 60, "poll_s": 0.2, "grace_s": 1.0,
              **kwargs}
    return WorkerGroup.from_job(job, "actor", placement, **kwargs), placement


def _raise_everywhere(worker):
    raise ValueError(f"bad input on rank {worker.rank}")


def _barrier_but_rank1_sleeps(worker, seconds):
    if worker.rank == 1:
        time.sleep(seconds)
        return "late"
    torch.distributed.barrier()
    return "ok"


def _sleep(worker, seconds):
    time.sleep(seconds)


def _long_batch(n=96, length=120):
    from megarlhf.engine.batch import TokenBatch
    from megarlhf.engine.loss_fns import SFTLossSpec

    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 256, (length,), generator=g).tolist() for _ in range(n)]
    batch = TokenBatch.from_sequences(seqs, fields={"loss_mask": [[1.0] * length] * n})
    tokens = float(n * length)
    return batch, SFTLossSpec(normalizer=tokens, num_tokens=tokens)


def test_killed_worker_fails_fast_naming_role_and_rank(ray_cluster):
    """If this fails, a worker dying mid-step hangs the driver or goes unnamed (role, rank)."""
    from megarlhf.workers import GroupBrokenError, WorkerCallError, WorkerDiedError

    group, placement = _group()
    try:
        # The same Python error on every rank: reported with each traceback, group still usable.
        with pytest.raises(WorkerCallError, match="actor ranks 0, 1 failed during execute") as e:
            group.execute(_raise_everywhere)
        assert "bad input on rank 1" in str(e.value) and group.broken is None
        batch, spec = _long_batch(8, 10)
        assert group.train(batch, spec).metrics["loss"] > 0

        batch, spec = _long_batch()
        pending = group.submit("train", batch, spec)
        time.sleep(1.0)  # the step is running: ~100 micro-batches at TP2
        os.kill(group.ranks[1].pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(WorkerDiedError, match=r"actor rank 1 died during train\(\)") as e:
            pending.result()
        elapsed = time.monotonic() - t0
        assert elapsed < 10, elapsed
        assert e.value.role == "actor" and e.value.ranks == [1]
        assert "tp 1" in str(e.value)  # where the rank sat in the layout
        assert group.broken is not None
        t0 = time.monotonic()
        with pytest.raises(GroupBrokenError, match="actor"):
            group.forward(batch)
        assert time.monotonic() - t0 < 1
    finally:
        group.shutdown()
        placement.release()


def test_hung_collective_times_out_in_the_process_group(ray_cluster):
    """If this fails, a collective whose peer never comes hangs past the process-group timeout."""
    from megarlhf.workers import WorkerCallError

    group, placement = _group(pg_timeout_s=3)
    try:
        t0 = time.monotonic()
        with pytest.raises(WorkerCallError, match=r"actor rank 0 failed during execute") as e:
            group.execute(_barrier_but_rank1_sleeps, 60)
        assert time.monotonic() - t0 < 20
        msg = str(e.value)
        assert "actor rank 1" in msg and "had not finished" in msg
        assert group.broken is not None  # rank 1 never joined: the world is inconsistent
    finally:
        group.shutdown()
        placement.release()


def test_call_timeout_bounds_a_stuck_rank(ray_cluster):
    """If this fails, a call that never returns blocks the driver past its timeout."""
    from megarlhf.workers import WorkerTimeoutError

    group, placement = _group(tp=1)
    try:
        t0 = time.monotonic()
        with pytest.raises(WorkerTimeoutError, match=r"execute\(\) did not finish within 2 s "
                                                     r"on rank 0") as e:
            group.execute(_sleep, 60, timeout_s=2)
        assert time.monotonic() - t0 < 8
        assert e.value.ranks == [0] and group.broken is not None
    finally:
        group.shutdown()
        placement.release()
