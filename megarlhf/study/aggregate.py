"""The runs' metrics, read back from what each job wrote.

Per job instance: ``tensorboard/metrics.jsonl`` (every logged scalar, by step; a resumed run
appends, so a step logged twice keeps its last row), and the result files of evaluations and
reward models (``bon.json``, ``rm_eval.json``) and the completion record (``COMPLETE.json``,
with the job's wall time). A run's data is its jobs' data; only runs whose jobs are all
complete are analysed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from megarlhf.checkpoint.atomic import read_complete
from megarlhf.study import stats
from megarlhf.study.sweep import Run, StudyPlan

RESULT_FILES = ("bon.json", "rm_eval.json")


@dataclass
class JobData:
    """One job's metrics.

    Attributes:
        rows: metrics.jsonl rows, one per step (the last one logged for a step), by step.
        files: parsed result files by name (``bon.json``, ``rm_eval.json``, ``COMPLETE.json``).
    """

    rows: list[dict[str, float]] = field(default_factory=list)
    files: dict[str, Any] = field(default_factory=dict)

    def series(self, name: str) -> list[tuple[int, float]]:
        """``(step, value)`` of every row that logged ``name``."""
        return [(int(r["step"]), float(r[name])) for r in self.rows if name in r]

    def values(self, name: str) -> list[float]:
        return [v for _, v in self.series(name)]

    def last(self, name: str, k: int = 1) -> float | None:
        """The mean of the last ``k`` logged values of ``name`` (None: never logged)."""
        v = self.values(name)
        return stats.mean(v[-k:]) if v else None

    def first(self, name: str, k: int = 1) -> float | None:
        v = self.values(name)
        return stats.mean(v[:k]) if v else None

    def bon(self, n: int | None = None, metric: str = "accuracy") -> float | None:
        """Best-of-N ``metric`` at ``n`` (default: the largest N) from ``bon.json``."""
        curve = (self.files.get("bon.json") or {}).get("curve") or {}
        if not curve:
            return None
        key = str(n if n is not None else max(int(k) for k in curve))
        row = curve.get(key)
        return None if row is None else float(row[metric])

    @property
    def seconds(self) -> float | None:
        info = self.files.get("COMPLETE.json") or {}
        return info.get("seconds")


@dataclass
class RunData:
    """One run: its sweep point, seed and its jobs' data."""

    point: dict[str, Any]
    seed: int | None
    jobs: dict[str, JobData]
    label: str = ""


def read_job(out_dir: str) -> JobData:
    data = JobData()
    path = os.path.join(out_dir, "tensorboard", "metrics.jsonl")
    by_step: dict[int, dict[str, float]] = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a kill
                if isinstance(row, dict) and "step" in row:
                    by_step.setdefault(int(row["step"]), {}).update(row)
    # A resumed run logs its steps again after the checkpoint: the last row of a step wins
    # (dict.update in file order), the steps in order.
    data.rows = [by_step[s] for s in sorted(by_step)]
    for name in RESULT_FILES:
        p = os.path.join(out_dir, name)
        if os.path.isfile(p):
            try:
                with open(p, encoding="utf-8") as f:
                    data.files[name] = json.load(f)
            except ValueError:
                pass
    info = read_complete(out_dir)
    if info is not None:
        data.files["COMPLETE.json"] = info
    return data


def run_is_complete(plan: StudyPlan, run: Run) -> bool:
    return all(read_complete(plan.instances[k].out_dir) is not None for k in run.jobs.values())


def collect(plan: StudyPlan) -> tuple[list[RunData], list[Run]]:
    """The data of every complete run, and the runs that are not complete."""
    cache: dict[str, JobData] = {}
    runs, missing = [], []
    for run in plan.runs:
        if not run_is_complete(plan, run):
            missing.append(run)
            continue
        jobs = {}
        for name, key in run.jobs.items():
            if key not in cache:
                cache[key] = read_job(plan.instances[key].out_dir)
            jobs[name] = cache[key]
        runs.append(RunData(point=dict(run.point), seed=run.seed, jobs=jobs,
                            label=run.label()))
    return runs, missing
