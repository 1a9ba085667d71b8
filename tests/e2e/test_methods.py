"""The policy-optimisation methods of docs/methods.md end to end on the demo task: each run
trains briefly from the demo's SFT model with the demo's GRPO config (actor at TP1: what is
tested here is the method, tests/e2e/test_trainers.py covers TP2) and one combination of
methods, and must raise the verifier reward and the held-out accuracy, with every metric
finite and in range and each method's own metrics logged.

Runs dominate the suite's time (each pays a worker and engine start), so methods and advantage
estimators are combined so that every one runs once in four runs:

* GSPO + RLOO + sequence TIS + a KL loss (k3+, clamp) with the adaptive KL controller;
* GSPO-token + REINFORCE++ + KL in the reward (k3) + sequence masked IS;
* CISPO + REINFORCE++-baseline + token-sum aggregation + the unbiased std + IcePop;
* DAPO (dynamic sampling, overlong shaping, clip-higher) + Dr.GRPO + token masked IS.

GAE with the KL in the reward runs in the PPO test, GRPO with token TIS (``tis_cap``) in the
kill -9 / resume test (tests/e2e/test_trainers.py), with the same metric checks."""

import os

import pytest
import yaml

from _e2e_helpers import check_rl_step_metrics, read_metrics, set_dotted

pytestmark = pytest.mark.e2e

STEPS = 12
GSPO_CLIP = {"clip_eps_low": 3.0e-4, "clip_eps_high": 4.0e-4}
CASES = {
    "gspo_rloo_seq_tis_adaptive_kl": {
        "policy_loss": "gspo", "loss_agg_mode": "seq_mean_token_mean", **GSPO_CLIP,
        "advantage_estimator": "rloo",
        "off_policy_correction": "seq_tis", "is_upper": 2.0,
        "kl_coef": 0.05, "kl_target": 0.02, "kl_horizon": 2560, "kl_estimator": "k3+",
        "kl_clamp": 10.0},
    "gspo_token_reinforce_pp_kl_in_reward_seq_mis": {
        "policy_loss": "gspo_token", "loss_agg_mode": "seq_mean_token_mean", **GSPO_CLIP,
        "advantage_estimator": "reinforce_pp", "kl_in_reward": True, "kl_coef": 0.05,
        "kl_estimator": "k3",
        "off_policy_correction": "seq_mis", "is_upper": 2.0, "is_lower": 0.5},
    "cispo_reinforce_pp_baseline_token_sum_icepop": {
        "policy_loss": "cispo", "clip_eps_low": 1.0, "clip_eps_high": 0.28,
        "advantage_estimator": "reinforce_pp_baseline", "loss_agg_mode": "token_sum",
        "unbiased_std": True, "track_kl": False,
        "off_policy_correction": "icepop"},
    "dapo_dr_grpo_token_mis": {
        "dynamic_sampling": True, "dynamic_sampling_max_rounds": 2, "overlong_buffer": 8,
        "clip_eps_low": 0.2, "clip_eps_high": 0.28,
        "advantage_estimator": "dr_grpo", "loss_agg_mode": "seq_mean_token_sum_norm",
        "track_kl": False,
        "off_policy_correction": "token_mis", "is_upper": 2.0},
}


def _job(demo_run, out, algorithm):
    path = os.path.join(os.path.dirname(__import__("megarlhf.demo").demo.__file__), "grpo.yaml")
    job = yaml.safe_load(open(path))
    job.update(output_dir=str(out), logging={"progress_bar": False})
    job["actor"].update(parallel={"tp": 1}, num_gpus=1, micro_batch_size_per_rank=64)
    job["actor"]["model"]["hf_dir"] = demo_run["sft_hf"]
    job["data"].update(train_path=demo_run["prompts_train"],
                       eval_path=demo_run["prompts_heldout"])
    job["algorithm"].update(algorithm)
    set_dotted(job, {"train": {"steps": STEPS, "eval_every": STEPS, "eval_prompts": 200}})
    from megarlhf.config import from_dict
    from megarlhf.config.schema import JobConfig

    return from_dict(JobConfig, job)


def _mean(rows, key):
    return sum(r[key] for r in rows) / len(rows)


@pytest.mark.parametrize("name", list(CASES))
def test_method_raises_the_verifier_reward(demo_run, tmp_path, name):
    """If this fails, this method (or a combination of methods) no longer trains end to end
    on the demo task: it does not run, does not learn, or logs its metrics wrong."""
    from megarlhf.controller.rl import train_rl

    algo = CASES[name]
    hist = train_rl(_job(demo_run, tmp_path / name, algo))
    rows = [r for r in read_metrics(str(tmp_path / name)) if r["step"] > 0
            and "reward/raw_mean" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    check_rl_step_metrics(rows, algo)
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
    # Learning: the verifier reward of the samples and the held-out accuracy rise.
    gain = _mean(rows[-5:], "reward/math_mean") - _mean(rows[:5], "reward/math_mean")
    (s0, a0), (s1, a1) = hist["eval"][0], hist["eval"][-1]
    assert (s0, s1) == (0, STEPS)
    assert gain > 0.02 and a1 > a0, (gain, hist["eval"])
