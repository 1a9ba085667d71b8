"""`megarlhf score` end to end: the user's log-prob tool agrees with transformers."""

import json
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.dist


def test_score_cli_tp2_matches_transformers(tmp_path):
    """If this fails, `megarlhf score` (the log-prob debugging tool) reports wrong log-probs."""
    from megarlhf.models.tiny import save_tiny_hf_model, tiny_arch

    model = save_tiny_hf_model(str(tmp_path / "m"), tiny_arch("llama", num_layers=2), seed=2)
    seqs = [list(range(3, 14)), [7, 9, 11, 5, 200, 17]]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"input_ids": s}) + "\n" for s in seqs))
    r = subprocess.run([sys.executable, "-m", "megarlhf.cli", "score", "--hf-dir",
                        str(tmp_path / "m"), "--input", str(tmp_path / "in.jsonl"), "--tp", "2",
                        "--temperature", "0.7", "--output", str(tmp_path / "out.jsonl")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [row["input_ids"] for row in rows] == seqs
    with torch.no_grad():
        for s, row in zip(seqs, rows):
            ids = torch.tensor([s])
            lp = torch.log_softmax(model(ids).logits / 0.7, -1)[0, :-1].gather(
                -1, ids[0, 1:, None])[:, 0]
            got = torch.tensor(row["logprobs"])
            assert got[0] == 0.0
            assert (got[1:] - lp).abs().max() < 1e-4


def test_score_cli_rejects_bad_input(tmp_path):
    """If this fails, a malformed input file gives a traceback instead of file:line advice."""
    (tmp_path / "in.jsonl").write_text('{"input_ids": [1, 2]}\n{"oops": 1}\n')
    from megarlhf.models.tiny import save_tiny_hf_model, tiny_arch

    save_tiny_hf_model(str(tmp_path / "m"), tiny_arch("llama", num_layers=2))
    r = subprocess.run([sys.executable, "-m", "megarlhf.cli", "score", "--hf-dir",
                        str(tmp_path / "m"), "--input", str(tmp_path / "in.jsonl")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "in.jsonl, line 2" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "glm4_moe", "deepseek_v3"])
def test_score_cli_moe_tp2_pp2_ep2_matches_transformers(tmp_path, family):
    """If this fails, `megarlhf score --ep` reports wrong log-probs for a mixture-of-experts
    family (experts split over EP ranks, routing under TP + SP, a pipeline stage's dense layers,
    latent attention), or cannot run one of them."""
    from megarlhf.models.tiny import save_tiny_hf_model, tiny_arch

    model = save_tiny_hf_model(str(tmp_path / "m"), tiny_arch(family, num_layers=4), seed=2)
    seqs = [list(range(3, 14)), [7, 9, 11, 5, 200, 17]]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"input_ids": s}) + "\n" for s in seqs))
    r = subprocess.run([sys.executable, "-m", "megarlhf.cli", "score", "--hf-dir",
                        str(tmp_path / "m"), "--input", str(tmp_path / "in.jsonl"), "--tp", "2",
                        "--pp", "2", "--ep", "2", "--output", str(tmp_path / "out.jsonl")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    with torch.no_grad():
        for s, row in zip(seqs, rows):
            ids = torch.tensor([s])
            lp = torch.log_softmax(model(ids).logits, -1)[0, :-1].gather(-1, ids[0, 1:, None])
            got = torch.tensor(row["logprobs"])
            assert (got[1:] - lp[:, 0]).abs().max() < 1e-4, family
