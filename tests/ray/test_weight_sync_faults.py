"""Faults during a weight sync (Ray actors, vLLM's CPU build, megarlhf's weight-transfer
backend over gloo): an owner rank of the actor or a vLLM worker process dies.

What must hold: the sync raises within the sync timeout (``rollout.weight_sync_timeout_s``, 15 s
here) with an error naming the weight version and the rank or replica; no replica serves
weights afterwards (its version is unset and ``generate`` refuses) rather than a mix of two
versions. The actor is PP2 (two owners sending at once) on 2 fake GPUs, one replica on
another; both start from a first complete sync.
"""

import os
import signal
import sys
import time

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ray = pytest.importorskip("ray")
pytest.importorskip("vllm", reason="vLLM is not installed (tools/install_cpu.sh installs it)")
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

TIMEOUT_S = 15


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    from megarlhf.models.tiny import save_tiny_hf_model, tiny_arch

    d = str(tmp_path_factory.mktemp("lm"))
    save_tiny_hf_model(d, tiny_arch("llama", num_layers=2, hidden_size=64, num_heads=2,
                                    num_kv_heads=2), seed=5)
    return d


def _start(lm_dir):
    from megarlhf.config.base import from_dict
    from megarlhf.config.schema import JobConfig
    from megarlhf.controller.cluster import ClusterPlacement
    from megarlhf.planning import validate
    from megarlhf.planning.placement import plan_placement
    from megarlhf.workers import RolloutGroup, RolloutSpec, WorkerGroup

    job = validate(from_dict(JobConfig, {
        "kind": "grpo",
        "cluster": {"num_nodes": 1, "gpus_per_node": 8, "placement": "split"},
        "actor": {"model": {"hf_dir": lm_dir, "dtype": "fp32"}, "parallel": {"pp": 2},
                  "num_gpus": 2, "optimizer": {"name": "sgd", "lr": 0.5,
                                               "use_distributed_optimizer": False}},
        "rollout": {"engine": "vllm", "num_gpus": 1, "kv_cache_gib": 0.25, "max_new_tokens": 8,
                    "weight_sync_timeout_s": TIMEOUT_S},
        "batch": {"rollout_prompts_global": 2, "train_prompts_global": 2,
                  "n_samples_per_prompt": 2},
        "data": {"max_prompt_len": 16}, "algorithm": {"track_kl": False},
    }))
    pl = ClusterPlacement(plan_placement(job), "GPU", timeout_s=60)
    actor = WorkerGroup.from_job(job, "actor", pl, call_timeout_s=120, pg_timeout_s=60)
    rollout = RolloutGroup.create(pl, RolloutSpec.from_job(job), call_timeout_s=120)
    actor.sync_weights_to(rollout, version=1)
    assert rollout.weight_version() == ["1"]
    return pl, actor, rollout


def _serves_nothing(rollout):
    from megarlhf.rollout import SamplingParams
    from megarlhf.workers.group import WorkerCallError

    assert rollout.weight_version() == [None]
    with pytest.raises(WorkerCallError, match="last update failed"):
        rollout.generate([[5, 6, 7]], SamplingParams(max_new_tokens=2))


def test_owner_rank_dies_during_a_sync(ray_cluster, lm_dir):
    """If this fails, a dead trainer rank hangs the run (the replica waits for its share
    forever), or leaves the replica serving a mix of the new first stage and the old second."""
    from megarlhf.weights.transfer import WeightTransferError

    pl, actor, rollout = _start(lm_dir)
    try:
        ray.kill(actor.actors[1])  # the second pipeline stage's owner
        t = time.monotonic()
        with pytest.raises(WeightTransferError, match=r"version 2 .*actor.*rank.*1") as e:
            actor.sync_weights_to(rollout, version=2)
        assert "died" in str(e.value)
        # The replica had started the update: it gives up on the dead owner within the timeout.
        _serves_nothing(rollout)
        assert time.monotonic() - t < TIMEOUT_S + 60
    finally:
        for g in (rollout, actor):
            g.shutdown()
        pl.release()


def test_vllm_worker_dies_during_a_sync(ray_cluster, lm_dir):
    """If this fails, a dead vLLM worker hangs the owners' sends, or the error does not say
    which replica failed."""
    from megarlhf.weights.transfer import WeightTransferError

    pl, actor, rollout = _start(lm_dir)
    try:
        def engine_pids(worker):
            import psutil

            return [c.pid for c in psutil.Process().children(recursive=True)
                    if "python" in c.name().lower() or "VLLM" in c.name()]

        (pids,) = rollout.execute(engine_pids)
        assert pids
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        t = time.monotonic()
        with pytest.raises(WeightTransferError, match=r"version 2") as e:
            actor.sync_weights_to(rollout, version=2)
        assert "rollout" in str(e.value) and "rank 0" in str(e.value)
        assert time.monotonic() - t < TIMEOUT_S + 60
    finally:
        for g in (rollout, actor):
            g.shutdown()
        pl.release()
