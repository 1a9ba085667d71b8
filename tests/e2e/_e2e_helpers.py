"""Helpers shared by the e2e tests (a plain module: conftest modules are not importable by name)."""

import json
import math
import os


def read_metrics(run_dir: str) -> list[dict]:
    """Every logged row of a run (``<output_dir>/tensorboard/metrics.jsonl``)."""
    with open(os.path.join(run_dir, "tensorboard", "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def set_dotted(job: dict, over: dict) -> dict:
    """Applies ``{"a.b.c": value}`` overrides to a nested job dict in place; returns it."""
    for k, v in over.items():
        node = job
        parts = k.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return job


def check_rl_step_metrics(rows: list[dict], algorithm: dict, kind: str = "grpo") -> None:
    """The metrics every RL step logs are finite and inside what they can be, for a run of
    ``kind`` with these ``algorithm`` overrides (rows of steps > 0). A failure means an
    estimator or option no longer runs through the driver, the workers and the loss as it
    should, or logs a metric that cannot be right."""
    assert rows
    for r in rows:
        assert all(math.isfinite(v) for v in r.values()), r
        assert 0 <= r["reward/raw_mean"] <= 1 and 0 <= r["reward/accuracy"] <= 1
        if kind != "ppo":  # GAE's returns are not group-normalized
            # Group-normalized / group-centred / whitened rewards and leave-one-out baselines
            # average 0 (a KL penalty in the reward is inside what is normalized).
            assert abs(r["reward/normalized_mean"]) < 1e-4, r["reward/normalized_mean"]
        assert r["policy/entropy"] > 0 and r["policy/grad_norm"] > 0 and r["policy/lr"] > 0
        assert 0 <= r["policy/clip_frac"] <= 1 and r["policy/approx_kl"] >= 0
        assert abs(r["policy/ratio_mean"] - 1) < 0.1  # near on-policy: 2 steps per rollout
        if algorithm.get("track_kl", True):
            assert r["policy/kl_ref"] >= -1e-6  # k3 >= 0 (0 at step 1: actor = reference)
        assert 0 < r["policy/response_length"] <= 40 and 0 <= r["rollout/truncated_frac"] <= 1
        assert r["rollout/logprob_diff_max"] <= 0.01  # the engine serves the actor's weights
        in_loss = algorithm.get("kl_coef", 0) > 0 and not algorithm.get("kl_in_reward")
        assert ("policy/kl_loss" in r) == in_loss, sorted(r)
        if in_loss and algorithm.get("kl_estimator", "k3") == "k3":
            assert r["policy/kl_loss"] >= 0
        if kind == "ppo":
            assert r["critic/value_loss"] > 0 and r["critic/grad_norm"] > 0
            assert r["critic/explained_variance"] <= 1
        if "tis_cap" in algorithm:
            assert 0 < r["offpolicy/weight_mean"] <= algorithm["tis_cap"]
            assert 0 <= r["offpolicy/truncated_frac"] <= 1
        elif "off_policy_correction" not in algorithm:
            assert "offpolicy/weight_mean" not in r


def check_method_metrics(rows: list[dict], algo: dict) -> None:
    """The method-specific metrics of docs/methods.md for a run with these ``algorithm``
    overrides (rows of steps > 0): off-policy weights and masks, GSPO's sequence clipping, the
    adaptive KL coefficient, dynamic sampling's rounds and refills."""
    for r in rows:
        if "off_policy_correction" not in algo:
            assert "offpolicy/weight_mean" not in r
            continue
        # Off-policy weights: the synchronous engine is close to the learner, weights near 1.
        assert 0 <= r["offpolicy/masked_frac"] <= 0.05
        assert abs(r["offpolicy/weight_mean"] - 1) < 0.05 and r["offpolicy/weight_std"] >= 0
        assert r["offpolicy/ratio_min"] <= 1 <= r["offpolicy/ratio_max"] + 1e-6
        assert r["offpolicy/mismatch_kl"] >= 0
    last = rows[-1]
    if algo.get("policy_loss", "ppo").startswith("gspo"):
        # GSPO's clip range is a sequence ratio's: the second update of a rollout clips.
        assert max(r["policy/clip_frac"] for r in rows) > 0
    if "kl_target" in algo:
        beta = [r["policy/kl_coef"] for r in rows]
        assert beta[0] == algo["kl_coef"] and beta != [beta[0]] * len(beta)
        assert all(b > 0 for b in beta) and "policy/kl_loss" in last
    if algo.get("dynamic_sampling"):
        for r in rows:
            assert 1 <= r["rollout/ds_rounds"] <= 3 and r["rollout/ds_prompts_drawn"] >= 64
            assert 0 < r["rollout/ds_kept_frac"] <= 1 and r["rollout/ds_filled_prompts"] >= 0
            assert -1 <= r["reward/overlong_penalty_mean"] <= 0
        assert max(r["rollout/ds_rounds"] for r in rows) >= 2  # some step had to refill
