"""``logging.log_every``: what a run writes to metrics.jsonl (and TensorBoard)."""

import json
import os

import pytest

from megarlhf.config.base import from_dict
from megarlhf.config.schema import JobConfig
from megarlhf.controller.session import Session

pytestmark = pytest.mark.unit


def test_log_every_thins_step_metrics_but_keeps_evals_and_the_last(tmp_path):
    """Broken: logging.log_every is accepted and ignored (every step logged), or thinning
    drops an evaluation or the final step."""
    job = from_dict(JobConfig, {"kind": "sft", "output_dir": str(tmp_path / "run"),
                                "logging": {"log_every": 3, "progress_bar": False},
                                "actor": {"model": {"arch": {"model_type": "llama"}}}})
    s = Session(job, total_steps=7)
    try:
        for step in range(1, 8):
            s.log(step, {"loss": float(step)})
        s.log(5, {"eval/accuracy": 0.5})
    finally:
        s.close()
    with open(os.path.join(tmp_path, "run", "tensorboard", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [3, 6, 7, 5]
    assert rows[-1]["eval/accuracy"] == 0.5
