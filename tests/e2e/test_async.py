"""Asynchronous GRPO on the demo task, end to end on CPU (issue 9, methods.md 3).

Split placement on two CPU slots (actor TP1 on one, one vLLM (CPU build) rollout replica on the
other; no reference: kl_coef = 0 and KL tracking off), from the demo's SFT model. Three runs of
16 steps, the same seeds and data order:

* sync       the synchronous loop (RLTrainer);
* async K=0  asynchronous.enabled, max_staleness 0: must reproduce ``sync`` step by step
             (its first 8 steps: the run stops there, at its first checkpoint);
* async K=1  one step off-policy; then again from its step-8 checkpoint (a crash after step 8).

Evaluation (200 held-out prompts, greedy) at steps 0, 8 and 16; checkpoints at steps 8 and 16.
"""

import json
import os
import shutil

import pytest
import yaml

from _e2e_helpers import read_metrics, set_dotted

pytestmark = pytest.mark.e2e

STEPS = 16
HALF = 8
# Keys only the async loop logs, and keys that measure time (never equal between two runs).
ASYNC_ONLY = {"time/learner_wait", "time/rollout_wait"}


def _job(demo, out, **over):
    path = os.path.join(os.path.dirname(__import__("megarlhf.demo").demo.__file__), "grpo.yaml")
    job = yaml.safe_load(open(path))
    job.update(output_dir=str(out))
    job["cluster"].update(placement="split", gpus_per_node=2)
    job["actor"].update(parallel={"tp": 1}, num_gpus=1, micro_batch_size_per_rank=64)
    job["actor"]["model"]["hf_dir"] = demo["sft_hf"]
    job["algorithm"].update(track_kl=False, use_behaviour_logprobs=True)
    job["data"].update(train_path=demo["prompts_train"], eval_path=demo["prompts_heldout"])
    job["train"].update(steps=STEPS, eval_every=HALF)
    job["logging"] = {"progress_bar": False}
    set_dotted(job, over)
    from megarlhf.config import load_config

    path = str(out) + ".yaml"
    with open(path, "w") as f:
        yaml.safe_dump(job, f)
    return load_config(path)


def _driver_state(out, step):
    with open(os.path.join(str(out), "checkpoints", f"step_{step:06d}",
                           "driver_state.json")) as f:
        return json.load(f)


def _by_step(rows):
    return {r["step"]: r for r in rows}


def _last_mean(rows, key, k=5):
    vals = [r[key] for r in rows if key in r]
    return sum(vals[-k:]) / k


@pytest.fixture(scope="module")
def runs(demo_run, tmp_path_factory):
    from megarlhf.controller.rl import train_rl

    root = tmp_path_factory.mktemp("async")
    out = {k: root / k for k in ("sync", "k0", "k1", "k1_resumed")}
    every = {"checkpoint.save_every": HALF}  # keep_last=2: steps 8 and 16 stay
    hist = {"sync": train_rl(_job(demo_run, out["sync"], **every))}
    hist["k0"] = train_rl(_job(demo_run, out["k0"], **every, **{
        "asynchronous": {"enabled": True, "max_staleness": 0}, "train.steps": HALF}))
    k1 = {"asynchronous": {"enabled": True, "max_staleness": 1}}
    hist["k1"] = train_rl(_job(demo_run, out["k1"], **every, **k1))
    # A crash right after step 8's checkpoint: its state and metrics up to step 8, resumed.
    shutil.copytree(out["k1"], out["k1_resumed"])
    ckpt = out["k1_resumed"] / "checkpoints"
    shutil.rmtree(ckpt / f"step_{STEPS:06d}")
    (ckpt / "latest").write_text(f"step_{HALF:06d}")
    mfile = out["k1_resumed"] / "tensorboard" / "metrics.jsonl"
    kept = [r for r in read_metrics(str(out["k1_resumed"])) if r["step"] <= HALF]
    mfile.write_text("".join(json.dumps(r) + "\n" for r in kept))
    hist["k1_resumed"] = train_rl(_job(demo_run, out["k1_resumed"], **every, **k1,
                                       **{"checkpoint.resume": True}))
    return {"out": out, "hist": hist,
            "rows": {k: read_metrics(str(d)) for k, d in out.items()}}


def test_K0_reproduces_the_synchronous_run_exactly(runs):
    """If this fails, asynchronous mode with max_staleness 0 is not the synchronous loop: a
    different data order, seed, weight version or loss input crept in."""
    sync, k0 = _by_step(runs["rows"]["sync"]), _by_step(runs["rows"]["k0"])
    assert sorted(sync) == list(range(STEPS + 1)) and sorted(k0) == list(range(HALF + 1))
    compared = 0
    for step in sorted(k0):
        a = {k: v for k, v in sync[step].items() if not k.startswith(("time/", "perf/"))}
        b = {k: v for k, v in k0[step].items()
             if not k.startswith(("time/", "perf/")) and k not in ASYNC_ONLY}
        assert a.keys() == b.keys(), (step, a.keys() ^ b.keys())
        for k in a:
            assert b[k] == a[k], (step, k, a[k], b[k])  # bitwise: same computation, same order
            compared += 1
        if step:
            assert k0[step]["rollout/staleness"] == 0.0
            assert k0[step]["rollout/weight_version"] == step - 1
    assert compared > 15 * HALF
    assert runs["hist"]["k0"]["eval"] == runs["hist"]["sync"]["eval"][:2]  # steps 0 and 8
    # the same data position in the checkpoint
    assert _driver_state(runs["out"]["k0"], HALF)["sampler"] == \
        _driver_state(runs["out"]["sync"], HALF)["sampler"]


def test_K1_reaches_the_synchronous_final_reward(runs):
    """If this fails, one-step-off-policy GRPO learns worse than synchronous GRPO on the demo.

    Reward = reward/raw_mean (verifier accuracy of the 256 samples of a step). The runs see the
    same prompts in the same order, so their per-step rewards are paired; over 5 steps the mean
    of the paired difference has a standard deviation of about 0.015 here."""
    rows, hist = runs["rows"], runs["hist"]
    sync_final = _last_mean(rows["sync"], "reward/raw_mean")
    k1_final = _last_mean(rows["k1"], "reward/raw_mean")
    assert k1_final >= sync_final - 0.04, (k1_final, sync_final)
    # Both runs learned (greedy held-out accuracy, 200 prompts), and by a similar amount.
    (_, s0), *_, (_, s1) = hist["sync"]["eval"]
    (_, a0), *_, (_, a1) = hist["k1"]["eval"]
    assert a0 == s0 and hist["k1"]["eval"][-1][0] == STEPS
    assert s1 >= s0 + 0.03, hist["sync"]["eval"]
    assert a1 >= s1 - 0.04, (hist["k1"]["eval"], hist["sync"]["eval"])


def test_K1_staleness_is_bounded_and_logged(runs):
    """If this fails, staleness is not measured, exceeds K, or is not what one step off-policy
    means; or the learner's idle time / the sync time is not logged."""
    by = _by_step(runs["rows"]["k1"])
    assert sorted(by) == list(range(STEPS + 1))
    stale = {s: by[s]["rollout/staleness"] for s in range(1, STEPS + 1)}
    # Batch 0 is sampled with the initial weights; every later batch one version behind (it
    # was generated while the learner trained the previous one), through the eval barrier.
    assert stale == {s: float(s > 1) for s in stale}
    for s in range(1, STEPS + 1):
        assert by[s]["rollout/weight_version"] == s - 1 - stale[s]
        assert by[s]["time/learner_wait"] >= 0 and by[s]["time/weight_sync"] >= 0
        assert "perf/tokens_per_s" in by[s] and "policy/loss" in by[s]
    # The rollout-vs-actor log-prob check runs on fresh batches only.
    assert "rollout/logprob_diff_max" in by[1] and "rollout/logprob_diff_max" not in by[2]
    # Generation overlapped training: the learner waited less than the generations took.
    wait = sum(by[s]["time/learner_wait"] for s in range(2, STEPS + 1))
    gen = sum(by[s]["time/generate"] for s in range(2, STEPS + 1))
    assert wait < gen, (wait, gen)


def test_K1_resume_continues_from_the_weight_version_and_redoes_pending_generations(runs):
    """If this fails, an async checkpoint does not hold the weight version or the data
    position before the batch that was being generated, or a resumed run does not continue."""
    out = runs["out"]
    saved = _driver_state(out["k1"], HALF)
    # Batch 8 was already being generated when step 8 was saved: the data position is the one
    # before it (the synchronous run's after 8 steps).
    assert saved["asynchronous"] == {"weight_version": HALF, "max_staleness": 1}
    assert saved["sampler"] == _driver_state(out["sync"], HALF)["sampler"]
    rows = runs["rows"]["k1_resumed"]
    assert [r["step"] for r in rows] == list(range(STEPS + 1))
    by, ref = _by_step(rows), _by_step(runs["rows"]["k1"])
    for s in range(HALF + 1):
        assert by[s] == ref[s]
    # The pending batch is regenerated with the resumed weights (version 8): staleness 0.
    assert by[HALF + 1]["rollout/staleness"] == 0.0
    assert by[HALF + 1]["rollout/weight_version"] == HALF
    assert all(by[s]["rollout/staleness"] == 1.0 for s in range(HALF + 2, STEPS + 1))
    final = _driver_state(out["k1_resumed"], STEPS)
    assert final["asynchronous"]["weight_version"] == STEPS
    assert final["sampler"] == _driver_state(out["sync"], STEPS)["sampler"]
    hist = runs["hist"]["k1_resumed"]
    assert hist["step"] == STEPS and os.path.isdir(hist["hf_dir"])
    assert [e[0] for e in hist["eval"]] == [0, HALF, STEPS]
