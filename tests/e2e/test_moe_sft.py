"""A mixture-of-experts policy through a whole job on CPU: SFT of a tiny Qwen3-MoE at EP2.

The demo task's SFT stage (Ray workers on 2 CPU slots, megatron on gloo) with the demo's tiny
Llama replaced by a tiny Qwen3-MoE (8 experts, top-2) split over 2 expert-parallel ranks, then
the HF export loaded back by transformers. (GRPO on a tiny MoE needs a rollout engine that
takes per-expert HF names; see megarlhf/engine/moe.py and the weight contract in
megarlhf/models/families.py.)
"""

import json
import os

import pytest
import torch

from _e2e_helpers import read_metrics

pytestmark = pytest.mark.e2e


def test_moe_sft_at_ep2_learns_logs_router_metrics_and_exports(tmp_path):
    """If this fails, an MoE model cannot be trained through the job machinery at EP2 (workers,
    engine, aux loss), its router metrics do not reach TensorBoard, or its HF export is not a
    checkpoint transformers loads (per-expert names, Qwen3MoeForCausalLM)."""
    from transformers import AutoModelForCausalLM

    from megarlhf.config import load_config
    from megarlhf.controller.sft import train_sft
    from megarlhf.demo import config_path, prepare_data
    from megarlhf.models.tiny import tiny_arch

    files = prepare_data(str(tmp_path), n_train=400, n_heldout=10)
    arch = tiny_arch("qwen3_moe", vocab_size=int(files["vocab_size"]), num_layers=2,
                     max_pos=128)
    out = tmp_path / "sft"
    job = load_config(config_path("sft"), [
        f"output_dir={out}", f"data.train_path={files['sft_train']}",
        f"actor.model.tokenizer={files['tokenizer']}", "logging.progress_bar=false",
        "train.steps=30", "actor.parallel={tp: 1, ep: 2}", "actor.num_gpus=2",
        "actor.micro_batch_size_per_rank=16", "actor.optimizer.lr_warmup_steps=5",
        f"actor.model.arch={json.dumps(arch)}"])
    assert job.actor.model.arch["model_type"] == "qwen3_moe"
    res = train_sft(job)

    rows = read_metrics(str(out))
    steps = [r for r in rows if "sft/loss" in r]
    assert len(steps) == 30
    assert steps[-1]["sft/loss"] < 0.6 * steps[0]["sft/loss"], (steps[0], steps[-1])
    for r in steps:
        for layer in range(2):
            assert 1.0 <= r[f"moe/layer_{layer}/load_imbalance"] <= 8.0
            assert 1 / 8 <= r[f"moe/layer_{layer}/max_expert_load"] <= 1.0
            assert r[f"moe/layer_{layer}/aux_loss"] > 0

    hf = res["hf_dir"]
    with open(os.path.join(hf, "config.json")) as f:
        assert json.load(f)["architectures"] == ["Qwen3MoeForCausalLM"]
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()
