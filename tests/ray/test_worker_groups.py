"""Worker groups on a local Ray cluster with 8 fake GPUs, against the single-process engine.

Two placements of the same PPO-style roles, each role's ranks a gloo world of its own:

* ``colocate_all``: actor (TP2) and critic (TP2) and two rollout replicas time-share GPUs 0-1
  (1/3 GPU per process), offloading between phases;
* ``split``: actor (PP2) on two GPUs, critic (TP2) on two others.

Oracle: the in-process engine on one rank (``run_distributed`` world 1, as
tests/dist/test_engine.py), built from the same HF weights, scoring and training the same batch
with the same loss specs. Tolerances, all fp32 as in test_engine: per-token log-probs, entropy
and values within 1e-5 absolute (TP/PP only change the order of float sums; seen ~1e-6);
loss and grad norm within 1e-5 relative; outputs after the optimizer step within 1e-5 absolute
(actor: SGD, whose update is linear in the gradient; critic: Adam with the DistributedOptimizer,
whose first step lr * g / (|g| + eps) turns sum-order noise into at most lr * noise / eps
differences for near-zero gradients, seen ~1e-7 at lr 1e-3).
Rollout log-probs against the actor's forward: 1e-4 (transformers vs megatron, fp32; test_engine
sees <= 4e-7).
"""

import sys
import time

import pytest
import torch

from megarlhf.platform.launch import run_distributed
from _batches import make_loss_batch

pytestmark = pytest.mark.ray
ray = pytest.importorskip("ray")
# Functions of this module travel to the workers by value (the workers cannot import it).
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

B = 8
ACTOR_OPT = {"name": "sgd", "lr": 0.05, "clip_grad": 1.0, "use_distributed_optimizer": False}
CRITIC_OPT = {"name": "adam", "lr": 1e-3, "clip_grad": 1.0, "use_distributed_optimizer": True}


def _arch():
    from megarlhf.models.tiny import tiny_arch

    return tiny_arch("llama", num_layers=2)


def _make_batch(vocab: int = 256, seed: int = 0):
    return make_loss_batch(B, vocab, seed)


def _specs(batch):
    from megarlhf.engine.loss_fns import PolicyLossSpec, ValueLossSpec

    n = float(batch.fields["response_mask"].sum())
    return (PolicyLossSpec(normalizer=n, num_tokens=n, eps_low=0.2, eps_high=0.28),
            ValueLossSpec(normalizer=n, num_tokens=n, clip_eps=0.2))


def rank_reference(lm_dir, rm_dir):
    """The single-process oracle: score, train one step, score again, for actor and critic."""
    from megarlhf.config.schema import ModelConfig, OptimizerConfig
    from megarlhf.engine.engine import MegatronEngine
    from megarlhf.models.builder import build_model
    from megarlhf.parallel.layout import ParallelLayout, destroy_parallel, initialize_parallel
    from megarlhf.weights.loader import load_hf_dir

    batch = _make_batch()
    pspec, vspec = _specs(batch)
    out = {}
    for role, d, head, opt, spec, key in (
            ("actor", lm_dir, "lm", ACTOR_OPT, pspec, "logp"),
            ("critic", rm_dir, "scalar", CRITIC_OPT, vspec, "values")):
        ctx = initialize_parallel(ParallelLayout(), seed=1234)
        bundle = build_model(ModelConfig(hf_dir=d, dtype="fp32"), ctx, head=head,
                             for_training=True, init_weights=False, seed=1234,
                             use_distributed_optimizer=opt["use_distributed_optimizer"])
        load_hf_dir(bundle, d)
        eng = MegatronEngine(bundle, OptimizerConfig(**opt), total_steps=10, micro_batch_size=2)
        before = eng.forward(batch, entropy=head == "lm")
        step = eng.train(batch, spec)
        after = eng.forward(batch)
        out[role] = {"before": before, "after": after[key], "loss": step.metrics["loss"],
                     "grad_norm": step.grad_norm}
        destroy_parallel()
    return out


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    from megarlhf.models.tiny import save_tiny_hf_model

    lm = str(tmp_path_factory.mktemp("lm"))
    rm = str(tmp_path_factory.mktemp("rm"))
    save_tiny_hf_model(lm, _arch(), seed=5)
    save_tiny_hf_model(rm, _arch(), seed=6, head="scalar")
    return lm, rm


@pytest.fixture(scope="module")
def reference(model_dirs):
    return run_distributed(rank_reference, 1, *model_dirs, timeout=240)[0]


def _job(placement, lm, rm, actor_par, critic_par, rollout_gpus=1):
    from megarlhf.config.base import from_dict
    from megarlhf.config.schema import JobConfig
    from megarlhf.planning import validate

    return validate(from_dict(JobConfig, {
        "kind": "ppo",
        "cluster": {"num_nodes": 1, "gpus_per_node": 8, "placement": placement},
        "actor": {"model": {"hf_dir": lm, "dtype": "fp32"}, "parallel": actor_par,
                  "num_gpus": 2, "micro_batch_size_per_rank": 2, "optimizer": ACTOR_OPT},
        "critic": {"model": {"hf_dir": rm, "dtype": "fp32"}, "parallel": critic_par,
                   "num_gpus": 2, "micro_batch_size_per_rank": 2, "optimizer": CRITIC_OPT,
                   "offload": True},
        "rollout": {"engine": "hf", "num_gpus": rollout_gpus},
        "batch": {"rollout_prompts_global": 2, "train_prompts_global": 2,
                  "n_samples_per_prompt": 4},
        "train": {"steps": 10},
        # No reference role: these tests place actor, critic and rollout only.
        "algorithm": {"track_kl": False},
    }))


def _close(a, b, atol):
    s = min(a.shape[1], b.shape[1])
    return (a[:, :s] - b[:, :s]).abs().max().item() <= atol


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-8)


def _train_and_score(actor, critic, colocated):
    """One PPO-shaped round: actor then critic, offloading the idle role when colocated."""
    batch = _make_batch()
    pspec, vspec = _specs(batch)
    res = {"actor": {}, "critic": {}}
    if colocated:
        critic.offload()
    res["actor"]["before"] = actor.forward(batch, entropy=True)
    step = actor.train(batch, pspec)
    res["actor"]["loss"], res["actor"]["grad_norm"] = step.metrics["loss"], step.grad_norm
    if colocated:
        critic.onload()
    res["critic"]["before"] = critic.forward(batch)
    step = critic.train(batch, vspec)
    res["critic"]["loss"], res["critic"]["grad_norm"] = step.metrics["loss"], step.grad_norm
    if colocated:
        assert all(n > 0 for n in critic.offload())
    res["actor"]["after"] = actor.forward(batch)["logp"]
    if colocated:
        critic.onload()
        assert not any(s["offloaded"] for s in critic.status())
    res["critic"]["after"] = critic.forward(batch)["values"]
    return res


def _check_against_reference(res, ref):
    for role, key in (("actor", "logp"), ("critic", "values")):
        got, want = res[role], ref[role]
        assert _close(got["before"][key], want["before"][key], 1e-5), (role, "before")
        assert _close(got["after"], want["after"], 1e-5), (
            role, "after", (got["after"] - want["after"]).abs().max())
        assert _rel(got["loss"], want["loss"]) < 1e-5, (role, got["loss"], want["loss"])
        assert _rel(got["grad_norm"], want["grad_norm"]) < 1e-5, (role, got["grad_norm"],
                                                                  want["grad_norm"])
    assert _close(res["actor"]["before"]["entropy"], ref["actor"]["before"]["entropy"], 1e-5)


def _rollout_matches_actor(rollout, actor, seed):
    """Samples from the rollout group, and the actor's log-probs of the same tokens."""
    from megarlhf.engine.batch import TokenBatch
    from megarlhf.rollout import SamplingParams

    prompts = [[5, 6, 7], [8, 9, 10, 11], [12, 13], [14, 15, 16]]
    params = SamplingParams(n=2, max_new_tokens=5, seed=seed, temperature=1.0)
    outs = rollout.generate(prompts, params)
    assert [o.prompt_token_ids for o in outs] == [tuple(p) for p in prompts]
    seqs, resp, lps = [], [], []
    for p, o in zip(prompts, outs):
        for s in o.samples:
            seqs.append(list(p) + list(s.token_ids))
            resp.append([0.0] * len(p) + [1.0] * len(s.token_ids))
            lps.append([0.0] * len(p) + list(s.logprobs))
    batch = TokenBatch.from_sequences(seqs, fields={"response_mask": resp, "lp": lps})
    logp = actor.forward(batch)["logp"]
    mask = batch.fields["response_mask"].bool()
    err = (logp - batch.fields["lp"])[mask].abs().max().item()
    return outs, err


def test_colocated_groups_match_single_process(ray_cluster, model_dirs, reference):
    """If this fails, colocated groups (TP2, offload, weight sync) differ from one process."""
    from megarlhf.controller.cluster import ClusterPlacement
    from megarlhf.planning.placement import plan_placement
    from megarlhf.rollout import SamplingParams, make_rollout_engine
    from megarlhf.workers import RolloutGroup, RolloutSpec, WorkerGroup

    lm, rm = model_dirs
    job = _job("colocate_all", lm, rm, {"tp": 2}, {"tp": 2}, rollout_gpus=2)
    plan = plan_placement(job)
    assert plan.roles["actor"].fraction == pytest.approx(1 / 3, abs=1e-4)
    placement = ClusterPlacement(plan, "GPU", timeout_s=30)
    groups = []
    try:
        actor = WorkerGroup.from_job(job, "actor", placement, call_timeout_s=120,
                                     pg_timeout_s=60)
        groups.append(actor)
        critic = WorkerGroup.from_job(job, "critic", placement, call_timeout_s=120,
                                      pg_timeout_s=60)
        groups.append(critic)
        # Random weights: only the weight stream can make it agree with the actor.
        rollout = RolloutGroup.create(placement, RolloutSpec(engine="hf", model=_arch()),
                                      call_timeout_s=120)
        groups.append(rollout)
        # Colocated: both roles' rank r and rollout replica r share fake GPU r.
        assert [r.devices for r in actor.ranks] == [r.devices for r in critic.ranks]
        assert [r.devices for r in rollout.ranks] == [r.devices for r in actor.ranks]
        assert len({r.devices for r in actor.ranks}) == 2
        assert [r.is_output_rank for r in actor.ranks] == [True, False]  # TP rank 0 collects

        # The real resharder (TP2 shards -> HF tensors) into the transformers engine, through
        # the weight-transfer groups (each replica's actor receives the owners' broadcasts).
        stats = actor.sync_weights_to(rollout, version=1).replicas
        n_tensors = stats[0].tensors
        assert all(s.tensors == n_tensors and s.missing == () for s in stats)
        outs, err = _rollout_matches_actor(rollout, actor, seed=11)
        assert err < 1e-4, err
        # Two replicas split the prompts and offset the seeds: one engine gives the same.
        single = make_rollout_engine("hf", model=lm)
        want = single.generate([list(o.prompt_token_ids) for o in outs],
                               SamplingParams(n=2, max_new_tokens=5, seed=11))
        assert [tuple(s.token_ids for s in o.samples) for o in outs] == \
            [tuple(s.token_ids for s in o.samples) for o in want]
        rollout.sleep()

        res = _train_and_score(actor, critic, colocated=True)
        _check_against_reference(res, reference)

        rollout.wake_up()
        actor.sync_weights_to(rollout, version=2)  # the trained weights
        _, err = _rollout_matches_actor(rollout, actor, seed=12)
        assert err < 1e-4, err
    finally:
        for g in groups:
            g.shutdown()
        placement.release()


def test_split_groups_match_single_process(ray_cluster, model_dirs, reference):
    """If this fails, split groups (own GPUs, PP2 and TP2) differ from the one-process engine."""
    from megarlhf.controller.cluster import ClusterPlacement
    from megarlhf.planning.placement import plan_placement
    from megarlhf.workers import WorkerGroup

    lm, rm = model_dirs
    job = _job("split", lm, rm, {"pp": 2}, {"tp": 2})
    plan = plan_placement(job)
    assert plan.roles["actor"].fraction == 1.0
    placement = ClusterPlacement(plan, "GPU", timeout_s=30)
    groups = []
    try:
        t0 = time.monotonic()
        actor = WorkerGroup.from_job(job, "actor", placement, call_timeout_s=120,
                                     pg_timeout_s=60)
        groups.append(actor)
        critic = WorkerGroup.from_job(job, "critic", placement, call_timeout_s=120,
                                      pg_timeout_s=60)
        groups.append(critic)
        print(f"split groups up in {time.monotonic() - t0:.1f} s")
        devices = [r.devices for r in actor.ranks] + [r.devices for r in critic.ranks]
        assert len(set(devices)) == 4  # every rank on a GPU of its own
        assert [r.is_output_rank for r in actor.ranks] == [False, True]  # last PP stage
        res = _train_and_score(actor, critic, colocated=False)
        _check_against_reference(res, reference)
    finally:
        for g in groups:
            g.shutdown()
        placement.release()
