"""One job of a study, as its own process: ``python -m megarlhf.study.job``.

    python -m megarlhf.study.job --out DIR -- train grpo CONFIG k=v ... --resume
    python -m megarlhf.study.job --out DIR --builtin demo-data --params '{"n_train": 1000}'

A command runs through the CLI's own entry (:func:`megarlhf.cli.main`), exactly as a user's
``megarlhf train ...`` does. When it returns 0 *and* its final outputs exist (a training job
reached ``train.steps`` and exported ``hf/``; an evaluation wrote its table), the job's
directory gets ``COMPLETE.json`` (:func:`megarlhf.checkpoint.atomic.mark_complete`), written
last: the study runner skips a job only when that file is there. A job stopped early (SIGTERM
saves and exits 0 before the last step) is not complete, and the runner resumes it.

The same entry point runs locally (a subprocess per job) and as a Ray job on a cluster.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

from megarlhf.checkpoint.atomic import mark_complete
from megarlhf.checkpoint.outputs import is_run_dir
from megarlhf.cli import main as cli_main
from megarlhf.config.base import from_dict
from megarlhf.study.builtins import BUILTINS

EXIT_INCOMPLETE = 3  # the command returned 0 but its final outputs are missing


def final_outputs_missing(command: list[str], out_dir: str) -> list[str]:
    """What a finished ``command`` should have written into ``out_dir`` but did not."""
    missing = []
    if command[0] == "train":
        if not os.path.isfile(os.path.join(out_dir, "hf", "config.json")):
            missing.append("hf/config.json (the run did not reach train.steps)")
        metrics = os.path.join(out_dir, "tensorboard", "metrics.jsonl")
        if not os.path.isfile(metrics) or os.path.getsize(metrics) == 0:
            missing.append("tensorboard/metrics.jsonl")
    elif command[:2] == ["eval", "bon"]:
        if not os.path.isfile(os.path.join(out_dir, "bon.json")):
            missing.append("bon.json")
    return missing


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megarlhf.study.job")
    p.add_argument("--out", required=True, help="the job's output directory")
    p.add_argument("--builtin", default=None)
    p.add_argument("--params", default="{}")
    p.add_argument("--inputs", default=None,
                   help="JSON recorded in COMPLETE.json (megarlhf.study.runner.job_inputs)")
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    command = [c for c in args.command if c != "--"] if args.command[:1] == ["--"] \
        else list(args.command)

    t0 = time.time()
    if args.builtin is not None:
        b = BUILTINS[args.builtin]
        result = b.run(from_dict(b.params, json.loads(args.params)), args.out)
        missing = [f for f in b.outputs if not os.path.isfile(os.path.join(args.out, f))]
        rc = 0
        what = ["builtin", args.builtin]
    else:
        what = list(command)  # the study's command line (what a rerun compares)
        if "--resume" in command and not is_run_dir(args.out):
            # A study job resumes a run it started earlier; its first attempt starts one
            # (`train --resume` refuses a directory that never held a run).
            command = [c for c in command if c != "--resume"]
        rc = cli_main(command)
        result = None
        missing = final_outputs_missing(command, args.out) if rc == 0 else []
    if rc != 0:
        return rc
    if missing:
        print(f"megarlhf study: job in {args.out} returned 0 but did not write "
              f"{', '.join(missing)}; not marked complete", file=sys.stderr)
        return EXIT_INCOMPLETE
    mark_complete(args.out, {
        "command": what, "seconds": time.time() - t0,
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "result": result,
        **({"inputs": json.loads(args.inputs)} if args.inputs is not None else {})})
    return 0


if __name__ == "__main__":
    sys.exit(main())
