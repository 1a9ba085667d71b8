"""RL on a mixture-of-experts policy with vLLM rollout, on the demo task, at EP2: DAPO
(dynamic sampling, overlong shaping, clip-higher) with Dr.GRPO advantages and token-level masked
importance sampling (the fourth method combination of tests/e2e/test_methods.py, run here to
spare the suite one run start).

The policy is the demo's SFT model sparsely upcycled to Mixtral (8 copies of its MLP, top-2,
a random router: megarlhf.checkpoint.upcycle): it starts as good as the dense model, so a short
run can show learning. Through the whole RL job: Megatron's MoE layers at expert parallel 2
(allgather dispatcher, aux loss with padding excluded) on 2 gloo ranks, the resharder
gathering experts across EP ranks into HF per-expert names, weight sync into vLLM's fused MoE
(CPU build) after every update, vLLM's log-probs checked against the actor's at every step."""

import os

import pytest
import yaml

from _e2e_helpers import check_method_metrics, check_rl_step_metrics, read_metrics, set_dotted

pytestmark = pytest.mark.e2e

STEPS = 12
ALGO = {"dynamic_sampling": True, "dynamic_sampling_max_rounds": 2, "overlong_buffer": 8,
        "clip_eps_low": 0.2, "clip_eps_high": 0.28,
        "advantage_estimator": "dr_grpo", "loss_agg_mode": "seq_mean_token_sum_norm",
        "track_kl": False,
        "off_policy_correction": "token_mis", "is_upper": 2.0}


def test_dapo_on_an_upcycled_moe_raises_the_verifier_reward(demo_run, tmp_path):
    """If this fails, an MoE policy cannot be trained with RL end to end (EP2 actor -> expert
    resharding -> vLLM's MoE): the run fails, vLLM serves weights that are not the actor's
    (log-prob check), the router metrics are missing, or the policy does not learn; or DAPO /
    Dr.GRPO / token masked IS no longer run or log their metrics right."""
    from megarlhf.checkpoint.upcycle import upcycle_to_mixtral
    from megarlhf.config import from_dict
    from megarlhf.config.schema import JobConfig
    from megarlhf.controller.rl import train_rl

    moe_dir = upcycle_to_mixtral(demo_run["sft_hf"], str(tmp_path / "mixtral"), num_experts=8,
                                 topk=2, seed=0)
    path = os.path.join(os.path.dirname(__import__("megarlhf.demo").demo.__file__), "grpo.yaml")
    job = yaml.safe_load(open(path))
    out = tmp_path / "grpo"
    job.update(output_dir=str(out), logging={"progress_bar": False})
    job["actor"].update(parallel={"tp": 1, "ep": 2}, num_gpus=2, micro_batch_size_per_rank=64)
    job["actor"]["model"]["hf_dir"] = moe_dir
    job["data"].update(train_path=demo_run["prompts_train"],
                       eval_path=demo_run["prompts_heldout"])
    algo = ALGO
    job["algorithm"].update(algo)
    set_dotted(job, {"train": {"steps": STEPS, "eval_every": STEPS, "eval_prompts": 200}})
    hist = train_rl(from_dict(JobConfig, job))

    rows = [r for r in read_metrics(str(out)) if r["step"] > 0 and "reward/raw_mean" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    check_rl_step_metrics(rows, algo)  # includes vLLM vs actor log-probs <= 0.01 every step
    check_method_metrics(rows, algo)
    for r in rows:
        for layer in range(2):
            assert 1.0 <= r[f"moe/layer_{layer}/load_imbalance"] <= 8.0
            assert 1 / 8 <= r[f"moe/layer_{layer}/max_expert_load"] <= 1.0
            assert r[f"moe/layer_{layer}/aux_loss"] > 0

    def mean(rs, key):
        return sum(r[key] for r in rs) / len(rs)

    gain = mean(rows[-5:], "reward/math_mean") - mean(rows[:5], "reward/math_mean")
    (s0, a0), (s1, a1) = hist["eval"][0], hist["eval"][-1]
    print(f"MoE DAPO: reward gain {gain:.3f}, held-out accuracy {a0:.3f} -> {a1:.3f}, "
          f"load imbalance {[round(r['moe/load_imbalance'], 2) for r in rows]}")
    assert (s0, s1) == (0, STEPS)
    assert a0 > 0.3  # the upcycled model is the SFT model: it starts where that one is
    assert gain > 0.02 and a1 > a0, (gain, hist["eval"])
