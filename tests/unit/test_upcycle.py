"""Sparse upcycling of a dense HF checkpoint into Mixtral (megarlhf.checkpoint.upcycle).

Oracle: transformers' forward of the dense model; the upcycled Mixtral (identical experts,
renormalised top-k) must compute the same logits within fp32 rounding (1e-5), and megarlhf's
Mixtral family must accept the result."""

import json
import os

import pytest
import torch

from megarlhf.checkpoint.upcycle import upcycle_to_mixtral
from megarlhf.models.tiny import save_tiny_hf_model, tiny_arch

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("dense"))
    model = save_tiny_hf_model(d, tiny_arch("llama", num_layers=2, vocab_size=64), seed=1)
    return d, model.eval()


def test_upcycled_mixtral_computes_the_dense_function(dense, tmp_path):
    """Broken: the upcycled policy does not start from the dense model (wrong expert names,
    gate/up/down swapped, router weights not renormalised) or megarlhf refuses it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from megarlhf.models.families import arch_spec

    src, model = dense
    out = upcycle_to_mixtral(src, str(tmp_path / "moe"), num_experts=4, topk=2, seed=3)
    moe = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(moe).__name__ == "MixtralForCausalLM"
    ids = torch.randint(3, 64, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gap = (moe(ids).logits - model(ids).logits).abs().max().item()
    assert gap < 1e-5, gap
    spec = arch_spec(AutoConfig.from_pretrained(out))
    assert spec.moe.num_experts == 4 and spec.moe.topk == 2 and spec.moe.norm_topk_prob
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["sliding_window"] is None
    # the router is random, not zero: routing differs between tokens
    from safetensors.torch import load_file

    sd = load_file(os.path.join(out, "model.safetensors"))
    assert sd["model.layers.0.block_sparse_moe.gate.weight"].std() > 0
    assert torch.equal(sd["model.layers.1.block_sparse_moe.experts.3.w2.weight"],
                       model.state_dict()["model.layers.1.mlp.down_proj.weight"])


def test_upcycle_refuses_bad_input(dense, tmp_path):
    """Broken: a bad request writes a broken checkpoint or overwrites a directory."""
    src, _ = dense
    with pytest.raises(ValueError, match="topk must be an integer in"):
        upcycle_to_mixtral(src, str(tmp_path / "a"), num_experts=2, topk=3)
    with pytest.raises(ValueError, match="num_experts must be a positive integer"):
        upcycle_to_mixtral(src, str(tmp_path / "a"), num_experts=0)
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds files megarlhf did not write"):
        upcycle_to_mixtral(src, str(full), overwrite=True)
    assert (full / "keep.txt").read_text() == "mine"
    moe_src = tmp_path / "q"
    save_tiny_hf_model(str(moe_src), tiny_arch("qwen3_moe", num_layers=1))
    with pytest.raises(ValueError, match="'qwen3_moe' model; upcycling into Mixtral takes"):
        upcycle_to_mixtral(str(moe_src), str(tmp_path / "b"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        upcycle_to_mixtral(str(tmp_path / "empty"), str(tmp_path / "c"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_upcycle(dense, tmp_path, capsys):
    """Broken: `megarlhf convert upcycle` is missing, writes nothing, or a bad request ends in
    a traceback instead of one line and exit code 2."""
    from megarlhf.cli import main

    src, _ = dense
    assert main(["convert", "upcycle", "--hf-dir", src, "--out", str(tmp_path / "m"),
                 "--experts", "2", "--topk", "2"]) == 0
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert main(["convert", "upcycle", "--hf-dir", src, "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "pass --overwrite to replace it" in err and "Traceback" not in err
    assert main(["convert", "upcycle", "--hf-dir", src, "--out", str(tmp_path / "m"),
                 "--experts", "3", "--overwrite"]) == 0
    assert json.loads((tmp_path / "m" / "config.json").read_text())["num_local_experts"] == 3


def test_upcycle_keeps_llama3_rope_scaling(tmp_path):
    """Broken: a Llama-3.x checkpoint (``rope_scaling`` of type llama3 beside ``rope_theta``,
    as its config.json has them) is upcycled with plain RoPE: the MoE silently computes another
    function (measured 1.7e-2 nats off on 200 tokens before the fix)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from megarlhf.models.families import arch_spec

    src = tmp_path / "llama31"
    save_tiny_hf_model(str(src), tiny_arch("llama", num_layers=2, vocab_size=64, max_pos=512),
                       seed=1)
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg["rope_theta"] = 500000.0
    cfg["rope_scaling"] = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 32, "rope_type": "llama3"}
    (src / "config.json").write_text(json.dumps(cfg))
    dense = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    out = upcycle_to_mixtral(str(src), str(tmp_path / "moe"), num_experts=4, topk=2)
    moe = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert moe.config.rope_parameters == dense.config.rope_parameters
    ids = torch.randint(3, 64, (2, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (moe(ids).logits - dense(ids).logits).abs().max().item() < 1e-5
    arch_spec(AutoConfig.from_pretrained(out))  # megarlhf's Mixtral family takes it


def test_upcycle_checks_everything_before_writing(dense, tmp_path, capsys):
    """Broken (issue 30): a truncated safetensors ends in a traceback; --out inside --hf-dir
    is accepted (the output lands inside its own input); top-1 routing writes a Mixtral
    megarlhf then cannot load (megatron-core refuses renormalised top-1); a non-numeric
    config field surfaces as Python's int() message. Each must be one line, exit 2, nothing
    written."""
    import shutil

    from megarlhf.cli import main

    src, _ = dense
    before = sorted(os.listdir(src))
    cases = {}
    trunc = tmp_path / "trunc"
    shutil.copytree(src, trunc)
    st = trunc / "model.safetensors"
    with open(st, "r+b") as f:
        f.truncate(st.stat().st_size // 2)
    cases["truncated or corrupt"] = ["--hf-dir", str(trunc), "--out", str(tmp_path / "o1")]
    cases["is inside --hf-dir"] = ["--hf-dir", src, "--out", os.path.join(src, "moe")]
    cases["num_experts_per_tok=1 with renormalised"] = [
        "--hf-dir", src, "--out", str(tmp_path / "o2"), "--topk", "1"]
    words = tmp_path / "words"
    shutil.copytree(src, words)
    cfg = json.loads((words / "config.json").read_text())
    cfg["num_hidden_layers"] = "two"
    (words / "config.json").write_text(json.dumps(cfg))
    cases["num_hidden_layers"] = ["--hf-dir", str(words), "--out", str(tmp_path / "o3")]
    for expected, argv in cases.items():
        capsys.readouterr()
        assert main(["convert", "upcycle", *argv]) == 2, expected
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err and "int()" not in err, err
    assert sorted(os.listdir(src)) == before
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 3))
