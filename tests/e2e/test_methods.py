"""The policy-optimisation methods of docs/methods.md end to end on the demo task: each run
trains briefly from the demo's SFT model with the demo's GRPO config (actor at TP1: what is
tested here is the method, tests/e2e/test_trainers.py covers TP2) and one combination of
methods, and must raise the verifier reward and the held-out accuracy, with every metric
finite and in range and each method's own metrics logged.

Runs dominate the suite's time (each pays a worker and engine start), so methods and advantage
estimators are combined so that every one runs once in four runs (one of them elsewhere):

* GSPO + RLOO + sequence TIS + a KL loss (k3+, clamp) with the adaptive KL controller;
* GSPO-token + REINFORCE++ + KL in the reward (k3) + sequence masked IS;
* CISPO + REINFORCE++-baseline + token-sum aggregation + the unbiased std + IcePop;
* DAPO (dynamic sampling, overlong shaping, clip-higher) + Dr.GRPO + token masked IS, on the
  mixture-of-experts policy (tests/e2e/test_moe_grpo.py).

GAE with the KL in the reward runs in the PPO test, GRPO with token TIS (``tis_cap``) in the
kill -9 / resume test (tests/e2e/test_trainers.py), with the same metric checks."""

import os

import pytest
import yaml

from _e2e_helpers import check_method_metrics, check_rl_step_metrics, read_metrics, set_dotted

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
}
# DAPO (dynamic sampling, overlong shaping, clip-higher) + Dr.GRPO + token masked IS run on
# the mixture-of-experts policy: tests/e2e/test_moe_grpo.py (one run start fewer).


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
    check_method_metrics(rows, algo)
    # Learning: the verifier reward of the samples and the held-out accuracy rise.
    gain = _mean(rows[-5:], "reward/math_mean") - _mean(rows[:5], "reward/math_mean")
    (s0, a0), (s1, a1) = hist["eval"][0], hist["eval"][-1]
    assert (s0, s1) == (0, STEPS)
    assert gain > 0.02 and a1 > a0, (gain, hist["eval"])
