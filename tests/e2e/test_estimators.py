"""Advantage estimators and RL options end to end, briefly: two steps each on the demo
task from the demo's SFT model (actor TP1, colocated on 2 CPU slots), and the logged metrics
checked for sense: GAE with the KL in the reward (PPO), GRPO with token TIS. RLOO with a KL
loss, REINFORCE++ with the KL in the reward, REINFORCE++-baseline and Dr.GRPO run (with the
same checks) inside tests/e2e/test_methods.py's combined runs, to pay for fewer starts. Not a learning test (tests/e2e/test_trainers.py is): what breaks here is
the glue - an estimator or option that no longer runs through the driver, the workers and the
loss, or logs a metric that cannot be right."""

import math
import os

import pytest
import yaml

from _e2e_helpers import read_metrics, set_dotted

pytestmark = pytest.mark.e2e

K3 = {"kl_coef": 0.05, "kl_estimator": "k3"}
CASES = {
    # name: (kind, algorithm overrides, other overrides)
    "gae_kl_in_reward": ("ppo", {"advantage_estimator": "gae", "kl_in_reward": True,
                                 "whiten_advantages": True, **K3},
                         {"critic": {"num_gpus": 1, "micro_batch_size_per_rank": 16,
                                     "optimizer": {"lr": 1.0e-4}}}),
    "grpo_tis_cap": ("grpo", {"advantage_estimator": "grpo", "tis_cap": 2.0}, {}),
}


def _job(demo_run, out, kind, algorithm, over):
    path = os.path.join(os.path.dirname(__import__("megarlhf.demo").demo.__file__), "grpo.yaml")
    job = yaml.safe_load(open(path))
    job.update(kind=kind, output_dir=str(out), logging={"progress_bar": False})
    job["actor"].update(parallel={"tp": 1}, num_gpus=1, micro_batch_size_per_rank=16)
    job["actor"]["model"]["hf_dir"] = demo_run["sft_hf"]
    job["data"].update(train_path=demo_run["prompts_train"], eval_path=None)
    job["algorithm"].update(algorithm)
    set_dotted(job, {"batch": {"rollout_prompts_global": 8, "train_prompts_global": 4,
                               "n_samples_per_prompt": 4},
                     "train": {"steps": 2, "eval_every": 0}, **over})
    from megarlhf.config import from_dict
    from megarlhf.config.schema import JobConfig

    return from_dict(JobConfig, job)


@pytest.mark.parametrize("name", list(CASES))
def test_estimator_runs_and_logs_sensible_metrics(demo_run, tmp_path, name):
    """If this fails, this estimator/option does not run end to end, or a metric it logs is
    missing, not finite, or outside what it can be."""
    from megarlhf.controller.rl import train_rl

    kind, algorithm, over = CASES[name]
    job = _job(demo_run, tmp_path / name, kind, algorithm, over)
    hist = train_rl(job)
    rows = [r for r in read_metrics(str(tmp_path / name)) if r["step"] > 0]
    assert [r["step"] for r in rows] == [1, 2] and hist["step"] == 2
    for r in rows:
        assert all(math.isfinite(v) for v in r.values()), r
        assert 0 <= r["reward/raw_mean"] <= 1 and 0 <= r["reward/accuracy"] <= 1
        # Group-normalized or group-centred rewards (and leave-one-out baselines) average 0.
        assert abs(r["reward/normalized_mean"]) < 1e-4, r["reward/normalized_mean"]
        assert r["policy/entropy"] > 0 and r["policy/grad_norm"] > 0 and r["policy/lr"] > 0
        assert 0 <= r["policy/clip_frac"] <= 1 and r["policy/approx_kl"] >= 0
        assert abs(r["policy/ratio_mean"] - 1) < 0.1  # near on-policy: 2 steps per rollout
        assert r["policy/kl_ref"] >= -1e-6  # k3 >= 0 (0 at step 1: actor = reference)
        assert 0 < r["policy/response_length"] <= 40 and 0 <= r["rollout/truncated_frac"] <= 1
        assert r["rollout/logprob_diff_max"] <= 0.01  # the engine serves the actor's weights
        in_loss = algorithm.get("kl_coef", 0) > 0 and not algorithm.get("kl_in_reward")
        assert ("policy/kl_loss" in r) == in_loss
        if in_loss:
            assert r["policy/kl_loss"] >= 0
        if kind == "ppo":
            assert r["critic/value_loss"] > 0 and r["critic/grad_norm"] > 0
            assert r["critic/explained_variance"] <= 1
        if "tis_cap" in algorithm:
            assert 0 < r["offpolicy/weight_mean"] <= algorithm["tis_cap"]
            assert 0 <= r["offpolicy/truncated_frac"] <= 1
        else:
            assert "offpolicy/weight_mean" not in r
