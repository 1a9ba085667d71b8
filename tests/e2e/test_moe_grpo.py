"""GRPO on a mixture-of-experts policy with vLLM rollout, on the demo task, at EP2.

The policy is the demo's SFT model sparsely upcycled to Mixtral (8 copies of its MLP, top-2,
a random router: megarlhf.checkpoint.upcycle): it starts as good as the dense model, so a short
run can show learning. Through the whole RL job: Megatron's MoE layers at expert parallel 2
(allgather dispatcher, aux loss with padding excluded) on 2 gloo ranks, the resharder
gathering experts across EP ranks into HF per-expert names, weight sync into vLLM's fused MoE
(CPU build) after every update, vLLM's log-probs checked against the actor's at every step."""

import os

import pytest
import yaml

from _e2e_helpers import check_rl_step_metrics, read_metrics, set_dotted

pytestmark = pytest.mark.e2e

STEPS = 12


def test_grpo_on_an_upcycled_moe_raises_the_verifier_reward(demo_run, tmp_path):
    """If this fails, an MoE policy cannot be trained with RL end to end (EP2 actor -> expert
    resharding -> vLLM's MoE): the run fails, vLLM serves weights that are not the actor's
    (log-prob check), the router metrics are missing, or the policy does not learn."""
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
    algo = {"track_kl": False}
    job["algorithm"].update(algo)
    set_dotted(job, {"train": {"steps": STEPS, "eval_every": STEPS, "eval_prompts": 200}})
    hist = train_rl(from_dict(JobConfig, job))

    rows = [r for r in read_metrics(str(out)) if r["step"] > 0 and "reward/raw_mean" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    check_rl_step_metrics(rows, algo)  # includes vLLM vs actor log-probs <= 0.01 every step
    for r in rows:
        for layer in range(2):
            assert 1.0 <= r[f"moe/layer_{layer}/load_imbalance"] <= 8.0
            assert 1 / 8 <= r[f"moe/layer_{layer}/max_expert_load"] <= 1.0
            assert r[f"moe/layer_{layer}/aux_loss"] > 0

    def mean(rs, key):
        return sum(r[key] for r in rs) / len(rs)

    gain = mean(rows[-5:], "reward/math_mean") - mean(rows[:5], "reward/math_mean")
    (s0, a0), (s1, a1) = hist["eval"][0], hist["eval"][-1]
    print(f"MoE GRPO: reward gain {gain:.3f}, held-out accuracy {a0:.3f} -> {a1:.3f}, "
          f"load imbalance {[round(r['moe/load_imbalance'], 2) for r in rows]}")
    assert (s0, s1) == (0, STEPS)
    assert a0 > 0.3  # the upcycled model is the SFT model: it starts where that one is
    assert gain > 0.02 and a1 > a0, (gain, hist["eval"])
