"""``megarlhf study STUDY.yaml [k=v ...]``: run a study (a base job x a sweep), resumably, and
write its plot, table and verdict (megarlhf/study, examples/studies/)."""

from __future__ import annotations

import os
import sys


def register(sub) -> None:
    p = sub.add_parser("study", help="run a study: a base job swept over one or two factors x "
                                     "seeds; skips complete runs; writes a plot, a table and "
                                     "a verdict (examples/studies/)")
    p.add_argument("study", help="study YAML file (see examples/studies/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="<job>.<key>=value (a job's setting, e.g. rl.train.steps=50) or a "
                        "study setting (output_dir=..., sweep.seeds=[1,2,3])")
    p.add_argument("--ray-address", default=None,
                   help="submit each run as a Ray job to this cluster (dashboard address, "
                        "e.g. http://HEAD:8265); default $RAY_ADDRESS; without either, runs "
                        "one job at a time on this machine")
    p.add_argument("--max-concurrent", type=int, default=4,
                   help="Ray jobs running at once (with --ray-address)")
    p.add_argument("--python", default="python",
                   help="the Python interpreter that runs each Ray job on the cluster's nodes "
                        "(with --ray-address; default: `python` on their PATH)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the study and list its jobs and what is complete; run nothing")
    p.add_argument("--plan", action="store_true",
                   help="print the placement/memory plan of every job (as `megarlhf plan`); "
                        "exit 1 if one does not fit; run nothing")
    p.add_argument("--report", action="store_true",
                   help="only aggregate the complete runs and write results/ (run nothing)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from megarlhf.commands import UsageError
    from megarlhf.study.report import write_report
    from megarlhf.study.runner import LocalLauncher, RayJobLauncher, completed, run_study
    from megarlhf.study.spec import load_study
    from megarlhf.study.sweep import expand, validate_plan

    if args.max_concurrent < 1:
        raise UsageError(f"--max-concurrent {args.max_concurrent}: give 1 or more")
    spec = load_study(args.study, args.overrides)
    plan = expand(spec)
    validate_plan(plan)  # every job's config, before anything runs or is written
    if args.plan:
        return _plan_all(plan)
    if args.dry_run:
        done, problems = completed(plan) if os.path.isdir(spec.output_dir) else (set(), [])
        print(f"study {spec.study}: {len(plan.runs)} runs, {len(plan.instances)} jobs "
              f"({len(done)} complete) in {spec.output_dir}")
        for key, inst in plan.instances.items():
            mark = "done" if key in done else "todo"
            what = (f"builtin {inst.job.builtin}" if inst.job.builtin
                    else "megarlhf " + " ".join(inst.argv()))
            print(f"  [{mark}] {key}: {what}")
        for p in problems:
            print(f"  problem: {p}", file=sys.stderr)
        return 0
    if args.report:
        from megarlhf.checkpoint.atomic import read_marker

        info = read_marker(spec.output_dir) if os.path.isdir(spec.output_dir) else None
        if info is None or info.get("writer") != f"study {spec.study}":
            raise UsageError(f"--report: {spec.output_dir} holds no run of study {spec.study}; "
                             "run the study first (without --report)")
        res = write_report(plan)
    else:
        address = args.ray_address or os.environ.get("RAY_ADDRESS")
        launcher = (RayJobLauncher(address, max_concurrent=args.max_concurrent,
                                   python=args.python) if address else LocalLauncher())
        outcome = run_study(plan, launcher, progress=not args.no_progress)
        res = outcome.results
        if outcome.failed:
            print(f"megarlhf study: {len(outcome.failed)} job(s) did not complete:",
                  file=sys.stderr)
            for k, why in outcome.failed.items():
                print(f"  {k}: {why}", file=sys.stderr)
    print(f"{spec.title}\n  verdict: {res['outcome']} ({res['runs_complete']} of "
          f"{res['runs_total']} runs): {res['statistic']}\n  report: "
          f"{os.path.join(spec.output_dir, 'results', 'report.md')}")
    return 0 if res["runs_complete"] == res["runs_total"] else 1


def _plan_all(plan) -> int:
    """`megarlhf plan` of every distinct job config of the study (seeds aside)."""
    import tempfile

    from megarlhf.config import load_config
    from megarlhf.planning.plan import format_plan, make_plan
    from megarlhf.study.sweep import _stand_ins

    fits = True
    seen = set()
    key = plan.spec.seed_key + "="
    with tempfile.TemporaryDirectory(prefix="megarlhf-study-") as tmp:
        for name, inst in plan.instances.items():
            if inst.job.builtin is not None:
                continue
            over = [o for o in _stand_ins(inst, plan, tmp) if not o.startswith(key)]
            sig = (inst.job.config, tuple(o.replace(tmp, "") for o in over))
            if sig in seen:
                continue
            seen.add(sig)
            p = make_plan(load_config(inst.job.config, over))
            fits &= p.fits
            print(f"== {name}: {'fits' if p.fits else 'DOES NOT FIT'}")
            print(format_plan(p))
    return 0 if fits else 1
