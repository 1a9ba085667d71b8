"""``megarlhf study`` end to end on CPU: a tiny real study (the demo task's data builtin and two
SFT runs of a few steps, a 2-run sweep over the learning rate), run through the CLI on a Ray
cluster (``--ray-address``): each job a real Ray job (Ray's job server, ``JobSubmissionClient``)
running `megarlhf train sft`, which joins the cluster as a job does; the two SFT jobs at once.
Then run again, which must skip every complete job and submit nothing. The local launcher (a
subprocess per job) is tested at unit level (tests/unit/test_study.py), as is kill-and-resume
with a fake launcher: a real one would cost minutes the suite does not have. About 40 s on
2 cores."""

import json
import os
import sys

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


@pytest.fixture
def job_server():
    """The dashboard (job server) address of this session's Ray cluster (the e2e runs before
    this test started one), or of a local one started here."""
    import ray
    from ray._private.worker import get_dashboard_url

    pytest.importorskip("ray.dashboard", reason="Ray's job server needs ray[default]")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False)
    url = get_dashboard_url()
    if not url:
        pytest.skip("this session's Ray cluster runs without its dashboard (the job server)")
    return "http://" + url


def test_tiny_study_runs_real_jobs_as_ray_jobs_and_resumes(tmp_path, capsys, job_server):
    """If this fails, `megarlhf study --ray-address` cannot run real megarlhf jobs end to end
    on a Ray cluster (job submission and polling, ${job} paths between jobs, completion markers
    written by the jobs, their logs, metrics read back, plot and report), or running it again
    reruns (resubmits) finished jobs."""
    from ray.job_submission import JobSubmissionClient

    from megarlhf.cli import main

    client = JobSubmissionClient(job_server)
    before = {j.submission_id for j in client.list_jobs()}
    path = _study(tmp_path)
    ray_args = ["--ray-address", job_server, "--max-concurrent", "2", "--python",
                sys.executable, "--no-progress"]
    assert main(["study", path, *ray_args]) == 0, capsys.readouterr()
    submitted = [j for j in client.list_jobs() if j.submission_id not in before]
    assert sorted(j.metadata["megarlhf_study_job"] for j in submitted) == [
        "data/base", "sft/lr-0.001+seed-1", "sft/lr-0.003+seed-1"]
    assert all(str(j.status).endswith("SUCCEEDED") for j in submitted)
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
    log = (out / "logs" / "sft__lr-0.001+seed-1.log").read_text()
    assert "$ ray job" in log and "megarlhf" in log  # the job's own output, fetched from Ray
    capsys.readouterr()

    # Again: every job is complete, nothing runs.
    assert main(["study", path, *ray_args]) == 0
    said = capsys.readouterr().out
    assert "3 of 3 jobs already complete" in said and "running the other 0" in said
    assert complete == json.loads((sft / "COMPLETE.json").read_text())
    assert len([j for j in client.list_jobs() if j.submission_id not in before]) == 3
