"""Rollout replicas running the real vLLM (its CPU build) as Ray actors, fed by a Megatron actor
through vLLM's weight-transfer API (megarlhf's backend: every owner rank sends its share to
every replica's workers): colocated (actor TP2 and 2 replicas time-share 2 fake GPUs) and split
(actor PP2 on 2 GPUs: two owners sending at once; 2 replicas on 2 others).

The replicas start from dummy weights (config only), so only weight sync can make them agree
with the actor. Oracle: the actor's own forward on the replicas' samples; after every sync the
rollout log-probs equal it within 1e-4 (fp32; vLLM's CPU attention vs megatron's, seen ~1e-6),
and before a sync (dummy weights, then after a training step) they differ by more than 1e-2,
so a sync that keeps stale weights fails. A rollout model of another architecture is refused
before any data moves, naming the tensor.
"""

import sys

import pytest
import torch

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ray = pytest.importorskip("ray")
pytest.importorskip("vllm", reason="vLLM is not installed (tools/install_cpu.sh installs it)")
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

PROMPTS = [[5, 6, 7], [8, 9, 10, 11], [12, 13], [14, 15, 16], [17, 18, 19], [20, 21]]
TOL, STALE = 1e-4, 1e-2


def _arch(**kw):
    from megarlhf.models.tiny import tiny_arch

    # head_dim 32: the smallest head size vLLM's CPU attention runs.
    return tiny_arch("llama", num_layers=2, hidden_size=64, num_heads=2, num_kv_heads=2, **kw)


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    from megarlhf.models.tiny import save_tiny_hf_model

    d = str(tmp_path_factory.mktemp("lm"))
    save_tiny_hf_model(d, _arch(), seed=5)
    return d


def _job(placement, lm, actor_par):
    from megarlhf.config.base import from_dict
    from megarlhf.config.schema import JobConfig
    from megarlhf.planning import validate

    return validate(from_dict(JobConfig, {
        "kind": "grpo",
        "cluster": {"num_nodes": 1, "gpus_per_node": 8, "placement": placement},
        "actor": {"model": {"hf_dir": lm, "dtype": "fp32"}, "parallel": actor_par,
                  "num_gpus": 2, "micro_batch_size_per_rank": 4,
                  "optimizer": {"name": "sgd", "lr": 0.5, "use_distributed_optimizer": False}},
        "rollout": {"engine": "vllm", "num_gpus": 2, "kv_cache_gib": 0.25,
                    "max_new_tokens": 8},
        "batch": {"rollout_prompts_global": 2, "train_prompts_global": 2,
                  "n_samples_per_prompt": 2},
        "data": {"max_prompt_len": 16},
        "algorithm": {"track_kl": False},
    }))


def _gap(rollout, actor, seed):
    """max |logp_rollout - logp_actor| over the replicas' samples; and the outputs."""
    from megarlhf.engine.batch import TokenBatch
    from megarlhf.rollout import SamplingParams

    outs = rollout.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=6, seed=seed))
    assert [o.prompt_token_ids for o in outs] == [tuple(p) for p in PROMPTS]  # prompt order
    seqs, resp, lps = [], [], []
    for p, o in zip(PROMPTS, outs):
        for s in o.samples:
            seqs.append(list(p) + list(s.token_ids))
            resp.append([0.0] * len(p) + [1.0] * len(s.token_ids))
            lps.append([0.0] * len(p) + list(s.logprobs))
    batch = TokenBatch.from_sequences(seqs, fields={"response_mask": resp, "lp": lps})
    logp = actor.forward(batch)["logp"]
    mask = batch.fields["response_mask"].bool()
    return float((logp - batch.fields["lp"])[mask].abs().max()), batch, logp


def _train(actor, batch, logp):
    from megarlhf.engine.loss_fns import PolicyLossSpec

    mask = batch.fields["response_mask"].bool()
    n = float(mask.sum())
    g = torch.Generator().manual_seed(1)
    batch.fields["advantages"] = torch.where(mask, torch.randn(mask.shape, generator=g), 0.0)
    batch.fields["logp_old"] = logp
    actor.train(batch, PolicyLossSpec(normalizer=n, num_tokens=n))


def _sync_train_sync(actor, rollout):
    from megarlhf.workers.group import WorkerCallError

    with pytest.raises(WorkerCallError, match="before a complete weight update"):
        _gap(rollout, actor, seed=3)  # dummy weights are never served
    res = actor.sync_weights_to(rollout, version=1)
    stats = res.replicas
    assert len(stats) == 2 and all(s.tensors == stats[0].tensors > 0 for s in stats)
    assert all(s.missing == () and s.version == "1" for s in stats)
    # Each rank sends exactly its own share: the owners' bytes make one model, others none.
    sent = [r["bytes"] for r in res.ranks]
    owners = res.owners[0]["owners"]
    assert sum(sent) == stats[0].bytes and all(sent[r] == 0 for r in range(len(sent))
                                               if r not in owners)
    fresh0, batch, logp = _gap(rollout, actor, seed=4)
    _train(actor, batch, logp)
    stale1, _, _ = _gap(rollout, actor, seed=5)
    actor.sync_weights_to(rollout, version=2)
    assert rollout.weight_version() == ["2", "2"]
    fresh1, _, _ = _gap(rollout, actor, seed=6)
    assert stale1 > STALE, stale1
    assert fresh0 < TOL and fresh1 < TOL, (fresh0, fresh1)
    return owners


@pytest.mark.parametrize("placement, actor_par", [
    ("colocate_all", {"tp": 2}),
    ("split", {"pp": 2}),
])
def test_vllm_replicas_follow_the_actor(ray_cluster, lm_dir, placement, actor_par):
    """If this fails, vLLM replicas in Ray actors (colocated or on their own GPUs) do not get the
    actor's weights through the resharder on every sync, or split a batch wrongly."""
    from megarlhf.controller.cluster import ClusterPlacement
    from megarlhf.planning.placement import plan_placement
    from megarlhf.workers import RolloutGroup, RolloutSpec, WorkerGroup

    job = _job(placement, lm_dir, actor_par)
    pl = ClusterPlacement(plan_placement(job), "GPU", timeout_s=60)
    groups = []
    try:
        actor = WorkerGroup.from_job(job, "actor", pl, call_timeout_s=300, pg_timeout_s=120)
        groups.append(actor)
        spec = RolloutSpec.from_job(job, model=_arch())  # config only: dummy weights
        rollout = RolloutGroup.create(pl, spec, call_timeout_s=300)
        groups.append(rollout)
        assert rollout.num_replicas == 2
        actor_gpus = {r.devices for r in actor.ranks}
        rollout_gpus = {r.devices for r in rollout.ranks}
        if placement == "colocate_all":
            assert rollout_gpus == actor_gpus
        else:
            assert not rollout_gpus & actor_gpus
        owners = _sync_train_sync(actor, rollout)
        assert len(owners) == (2 if placement == "split" else 1)  # PP2: one per stage
    finally:
        for g in groups:
            g.shutdown()
        pl.release()


def test_mismatched_rollout_model_is_refused_before_any_data_moves(ray_cluster, lm_dir):
    """If this fails, a rollout engine serving another architecture gets a partial, garbled
    weight stream (or silently keeps its weights) instead of a refusal naming the tensor."""
    from megarlhf.controller.cluster import ClusterPlacement
    from megarlhf.planning.placement import plan_placement
    from megarlhf.rollout import WeightSyncError
    from megarlhf.workers import RolloutGroup, RolloutSpec, WorkerGroup

    job = _job("split", lm_dir, {"pp": 2})
    pl = ClusterPlacement(plan_placement(job), "GPU", timeout_s=60)
    groups = []
    try:
        actor = WorkerGroup.from_job(job, "actor", pl, call_timeout_s=300, pg_timeout_s=120)
        groups.append(actor)
        other = RolloutSpec.from_job(job, model=_arch(vocab_size=300))
        rollout = RolloutGroup.create(pl, other, num_replicas=1, call_timeout_s=300)
        groups.append(rollout)
        with pytest.raises(WeightSyncError, match=r"model\.embed_tokens\.weight.*\(256, 64\).*"
                                                  r"\(300, 64\)"):
            actor.sync_weights_to(rollout, version=1)
        # Refused before the transfer groups opened or an update started.
        assert rollout.weight_version() == [None] and "_transfer_target" not in actor.__dict__
    finally:
        for g in groups:
            g.shutdown()
        pl.release()

