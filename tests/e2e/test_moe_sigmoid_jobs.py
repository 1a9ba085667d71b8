"""The DeepSeek-V3-style MoE families through whole jobs on CPU: SFT at EP2, then GRPO at EP2
from the SFT export, with the rollout engine each family runs on here.

A tiny glm4_moe and a tiny deepseek_v3 (2 layers: a dense one, an MoE one with 8 experts in 2
groups, a shared expert, sigmoid routing with expert bias; deepseek_v3 with latent attention)
on the demo task. What no other test covers is the composition: the job machinery (Ray workers
on 2 CPU slots) training these models at EP2, the expert bias that megatron moves by load
travelling from the trainer through the SFT export into the GRPO job, and from the GRPO actor
into the rollout engine after every update (the log-prob check at every step) and into the
final export; glm4_moe generating with vLLM's CPU build, deepseek_v3 with the transformers
engine (``rollout.engine: auto`` resolves to it on CPU: vLLM's CPU build does not run
multi-latent attention, and validate says so).
"""

import json
import math
import os

import pytest
import torch
import yaml

from _e2e_helpers import read_metrics

pytestmark = pytest.mark.e2e

SFT_STEPS, RL_STEPS = 6, 2


def _bias(hf_dir: str) -> dict[str, torch.Tensor]:
    from megarlhf.weights.hf_io import HFCheckpointReader

    r = HFCheckpointReader(hf_dir)
    return {n: r.get(n) for n in r.names() if n.endswith("e_score_correction_bias")}


@pytest.mark.parametrize("family,engine", [("glm4_moe", "vllm"), ("deepseek_v3", "hf")])
def test_sft_then_grpo_at_ep2_carries_the_trained_expert_bias(tmp_path, family, engine):
    """If this fails, a glm4_moe / deepseek_v3 model cannot be trained through the job
    machinery at EP2, its expert bias does not train (or is lost between the trainer, the
    exports and the rollout engine: the engine would route with a stale bias and the per-step
    log-prob check fails), or ``rollout.engine: auto`` picks an engine that cannot run the
    model here."""
    from transformers import AutoModelForCausalLM

    from megarlhf.config import from_dict, load_config
    from megarlhf.config.schema import JobConfig
    from megarlhf.config.validate import config_warnings, resolved_rollout_engine
    from megarlhf.controller.rl import train_rl
    from megarlhf.controller.sft import train_sft
    from megarlhf.demo import config_path, prepare_data
    from megarlhf.models.tiny import tiny_arch

    files = prepare_data(str(tmp_path), n_train=400, n_heldout=40)
    arch = tiny_arch(family, vocab_size=int(files["vocab_size"]), num_layers=2, max_pos=128)
    sft = load_config(config_path("sft"), [
        f"output_dir={tmp_path / 'sft'}", f"data.train_path={files['sft_train']}",
        f"actor.model.tokenizer={files['tokenizer']}", "logging.progress_bar=false",
        f"train.steps={SFT_STEPS}", "actor.parallel={tp: 1, ep: 2}", "actor.num_gpus=2",
        "actor.micro_batch_size_per_rank=16", "actor.optimizer.lr_warmup_steps=1",
        "actor.model.moe_expert_bias_update_rate=0.01", f"actor.model.arch={json.dumps(arch)}"])
    res = train_sft(sft)
    rows = [r for r in read_metrics(str(tmp_path / "sft")) if "sft/loss" in r]
    assert len(rows) == SFT_STEPS and all("moe/layer_1/load_imbalance" in r for r in rows)
    assert "moe/layer_0/load_imbalance" not in rows[0]  # the dense layer has no router
    sft_bias = _bias(res["hf_dir"])
    # Started at zero; SFT_STEPS updates of +-0.01 by load (each expert moves every step
    # unless exactly at the mean load).
    assert list(sft_bias) == ["model.layers.1.mlp.gate.e_score_correction_bias"]
    b = next(iter(sft_bias.values()))
    assert b.dtype == torch.float32 and 0 < b.abs().max() <= SFT_STEPS * 0.01 + 1e-6

    path = os.path.join(os.path.dirname(__import__("megarlhf.demo").demo.__file__), "grpo.yaml")
    job = yaml.safe_load(open(path))
    job.update(output_dir=str(tmp_path / "grpo"), logging={"progress_bar": False})
    job["actor"].update(parallel={"tp": 1, "ep": 2}, num_gpus=2, micro_batch_size_per_rank=16)
    job["actor"]["model"].update(hf_dir=res["hf_dir"], moe_expert_bias_update_rate=0.01)
    job["rollout"]["engine"] = "auto"
    job["data"].update(train_path=files["prompts_train"], eval_path=files["prompts_heldout"])
    job["batch"].update(rollout_prompts_global=16, train_prompts_global=8)
    job["train"].update(steps=RL_STEPS, eval_every=0)
    cfg = from_dict(JobConfig, job)
    assert resolved_rollout_engine(cfg) == engine
    notes = [w for w in config_warnings(cfg) if "latent attention" in w]
    assert bool(notes) == (engine == "hf"), notes
    out = train_rl(cfg)

    rows = [r for r in read_metrics(str(tmp_path / "grpo")) if r["step"] > 0
            and "reward/raw_mean" in r]
    assert [r["step"] for r in rows] == list(range(1, RL_STEPS + 1))
    # The rollout engine generated with the actor's weights, expert bias included (the log-prob
    # check at every step, stop on mismatch). The tiny models rarely earn a reward: learning is
    # not what this test is about (tests/e2e/test_moe_rl.py).
    for r in rows:
        assert all(math.isfinite(v) for v in r.values()), r
        assert r["rollout/logprob_diff_max"] <= 0.01
        assert r["policy/entropy"] > 0 and r["moe/layer_1/load_imbalance"] >= 1
    rl_bias = _bias(out["hf_dir"])
    assert rl_bias.keys() == sft_bias.keys()
    moved = (next(iter(rl_bias.values())) - b).abs()
    # trained on, from the SFT model's bias: 2 optimizer steps per RL step (16 prompts / 8)
    assert 0 < moved.max() <= 2 * RL_STEPS * 0.01 + 1e-6
    model = AutoModelForCausalLM.from_pretrained(out["hf_dir"], dtype=torch.float32)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all()
