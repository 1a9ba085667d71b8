"""Helpers shared by the e2e tests (a plain module: conftest modules are not importable by name)."""

import json
import os


def read_metrics(run_dir: str) -> list[dict]:
    """Every logged row of a run (``<output_dir>/tensorboard/metrics.jsonl``)."""
    with open(os.path.join(run_dir, "tensorboard", "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
