"""``megarlhf study`` end to end on CPU: a tiny real study (the demo task's data builtin and two
SFT runs of a few steps, a 2-run sweep over the learning rate), run through the CLI: each job
a real `megarlhf train sft` process; then run again, which must skip every complete job.
Kill-and-resume is tested at unit level (tests/unit/test_study.py) with a fake launcher: a real
one would cost minutes the suite does not have. About 60 s on 2 cores."""

import json
import os

import pytest
import yaml

pytestmark = pytest.mark.e2e

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SFT = os.path.join(ROOT, "examples", "studies", "_base", "mini_sft.yaml")
TINY = ("{model_type: llama, vocab_size: 64, hidden_size: 32, intermediate_size: 64, "
        "num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 2, "
        "max_position_embeddings: 128}")


def _study(tmp_path) -> str:
    doc = {
        "study": "custom",
        "output_dir": str(tmp_path / "study"),
        "jobs": {
            "data": {"builtin": "demo-data",
                     "params": {"n_train": 200, "n_heldout": 20, "n_pairs": 10,
                                "n_labelled": 10, "n_heldout_pairs": 0}},
            "sft": {"command": "train sft", "config": SFT, "overrides": [
                "data.train_path=${data}/sft_train.jsonl",
                "actor.model.tokenizer=${data}/tokenizer.model",
                f"actor.model.arch={TINY}", "actor.parallel.tp=1", "actor.num_gpus=1",
                "cluster.gpus_per_node=1", "actor.micro_batch_size_per_rank=16",
                "train.global_batch_size=16", "train.steps=3",
                "actor.optimizer.lr_warmup_steps=0"]},
        },
        "sweep": {"factors": {"sft.actor.optimizer.lr": [1.0e-3, 3.0e-3]}, "seeds": [1]},
        "analysis": {"job": "sft", "metrics": ["sft/loss"]},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(path)


def test_tiny_study_runs_real_jobs_and_resumes(tmp_path, capsys):
    """If this fails, `megarlhf study` cannot run real megarlhf jobs end to end (subprocess per
    job, ${job} paths between them, completion markers, metrics read back, plot and report),
    or running it again reruns finished jobs."""
    from megarlhf.cli import main

    path = _study(tmp_path)
    assert main(["study", path, "--no-progress"]) == 0, capsys.readouterr()
    out = tmp_path / "study"
    jobs = ["data/base", "sft/lr-0.001+seed-1", "sft/lr-0.003+seed-1"]
    for key in jobs:
        assert (out / "jobs" / key / "COMPLETE.json").is_file(), key
    sft = out / "jobs" / "sft" / "lr-0.003+seed-1"
    assert (sft / "hf" / "config.json").is_file()
    complete = json.loads((sft / "COMPLETE.json").read_text())
    assert complete["command"][:2] == ["train", "sft"] and "--resume" in complete["command"]
    runs = json.loads((out / "results" / "runs.json").read_text())
    assert [r["point"] for r in runs] == [{"sft.actor.optimizer.lr": 0.001},
                                          {"sft.actor.optimizer.lr": 0.003}]
    assert all(r["final"]["sft"]["step"] == 3 for r in runs)
    assert (out / "results" / "custom.png").read_bytes()[:4] == b"\x89PNG"
    assert "| sft/loss | 0.003 | 1 |" in (out / "results" / "table.md").read_text()
    assert "sft__lr-0.001+seed-1.log" in os.listdir(out / "logs")
    capsys.readouterr()

    # Again: every job is complete, nothing runs.
    assert main(["study", path, "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert "3 of 3 jobs already complete" in said and "running the other 0" in said
    assert complete == json.loads((sft / "COMPLETE.json").read_text())
