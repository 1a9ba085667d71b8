"""A study's results: aggregated metrics, the finding's table, plot and verdict.

Written into ``<output_dir>/results/`` (each file atomically, so a reader or a killed runner
never leaves half a file):

* ``runs.json``    every complete run: its point, seed and each job's final metrics;
* ``table.md``     the finding's table (mean ± std over seeds);
* ``<study>.png``  the plot (curves with their spread over seeds);
* ``verdict.json`` the verdict, its statistic and the test used;
* ``report.md``    all of it on one page.

The report covers the complete runs only and says how many are missing; run the study again to
complete it (finished jobs are skipped).
"""

from __future__ import annotations

import datetime
import os
from typing import Any

from megarlhf.checkpoint.atomic import write_file_atomic, write_json_atomic
from megarlhf.study import stats
from megarlhf.study.aggregate import RunData, collect
from megarlhf.study.findings import FINDINGS, Analysis, Verdict
from megarlhf.study.plot import draw
from megarlhf.study.sweep import StudyPlan


def analyze(spec, runs: list[RunData]) -> Analysis:
    """The finding's analysis of ``runs`` (an inconclusive verdict without any run)."""
    finding = FINDINGS[spec.study]
    if not runs:
        return Analysis([], [], [], Verdict(stats.INCONCLUSIVE, "no complete run yet",
                                            "run the study to completion"))
    return finding.analyze(runs, spec.factors, spec.analysis)


def markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    if not columns:
        return "(no complete run yet)\n"
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def _final_metrics(run: RunData) -> dict[str, Any]:
    out = {}
    for name, d in run.jobs.items():
        last = d.rows[-1] if d.rows else {}
        m = {k: v for k, v in last.items() if not k.startswith(("time/", "perf/"))}
        for k in ("eval/accuracy",):
            if d.last(k) is not None:
                m[k] = d.last(k)
        if "bon.json" in d.files:
            m["bon"] = d.files["bon.json"].get("curve")
        if d.seconds is not None:
            m["seconds"] = d.seconds
        out[name] = m
    return out


def write_report(plan: StudyPlan, failed: dict[str, str] | None = None) -> dict[str, Any]:
    """Aggregates the complete runs of ``plan`` and writes ``results/`` (module docstring)."""
    spec = plan.spec
    finding = FINDINGS[spec.study]
    runs, missing = collect(plan)
    res_dir = os.path.join(spec.output_dir, "results")
    os.makedirs(res_dir, exist_ok=True)
    analysis = analyze(spec, runs)
    write_json_atomic(os.path.join(res_dir, "runs.json"),
                      [{"point": r.point, "seed": r.seed, "final": _final_metrics(r)}
                       for r in runs])
    table = markdown_table(analysis.columns, analysis.rows)
    write_file_atomic(os.path.join(res_dir, "table.md"), table)
    png = None
    if analysis.panels:
        png = draw(analysis.panels, os.path.join(res_dir, f"{spec.study}.png"), spec.title)
    v = analysis.verdict
    result = {"study": spec.study, "title": spec.title, "claim": finding.claim,
              "source": finding.source, "outcome": v.outcome, "statistic": v.statistic,
              "test": v.test, "values": v.values, "runs_complete": len(runs),
              "runs_total": len(plan.runs),
              "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "plot": png, "table": table}
    write_json_atomic(os.path.join(res_dir, "verdict.json"), result)
    lines = [f"# {spec.title}", "",
             f"Claim ({finding.source}): {finding.claim}", "",
             f"Study file: `{spec.path}`; {len(runs)} of {len(plan.runs)} runs complete.", "",
             f"**Verdict: {v.outcome}.** {v.statistic}.", "", f"Test: {v.test}.", "",
             table]
    if png:
        lines += ["", f"![{spec.study}]({os.path.basename(png)})"]
    for n in analysis.notes:
        lines += ["", f"Note: {n}."]
    if missing:
        lines += ["", f"Not complete ({len(missing)} runs): "
                  + "; ".join(r.label() for r in missing[:10])
                  + (" ..." if len(missing) > 10 else "")
                  + ". Run the study again to complete them."]
    if failed:
        lines += ["", "Failed jobs:"] + [f"- {k}: {why}" for k, why in failed.items()]
    write_file_atomic(os.path.join(res_dir, "report.md"), "\n".join(lines) + "\n")
    return result
