"""Helpers shared by the e2e tests (a plain module: conftest modules are not importable by name)."""

import json
import os


def read_metrics(run_dir: str) -> list[dict]:
    """Every logged row of a run (``<output_dir>/tensorboard/metrics.jsonl``)."""
    with open(os.path.join(run_dir, "tensorboard", "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def set_dotted(job: dict, over: dict) -> dict:
    """Applies ``{"a.b.c": value}`` overrides to a nested job dict in place; returns it."""
    for k, v in over.items():
        node = job
        parts = k.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return job
