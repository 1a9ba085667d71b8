"""``megarlhf plan CONFIG [overrides]``: placement and per-GPU memory before any launch."""

from __future__ import annotations

import sys

from megarlhf.commands import add_config_args


def register(sub) -> None:
    p = sub.add_parser("plan", help="print where every role runs and its per-GPU memory "
                                    "estimate; exit 1 if a layout does not fit the GPUs")
    add_config_args(p)
    p.add_argument("--overhead-gib", type=float, default=None,
                   help="GPU memory per process for CUDA context/NCCL/allocator slack "
                        "(default 1.0)")
    p.set_defaults(func=run)


def run(args) -> int:
    import math

    from megarlhf.commands import UsageError
    from megarlhf.config import load_config
    from megarlhf.commands import print_config_warnings
    from megarlhf.planning import validate
    from megarlhf.planning.plan import PROCESS_OVERHEAD_GIB, format_plan, make_plan
    from megarlhf.planning.preflight import preflight

    if args.overhead_gib is not None and not (math.isfinite(args.overhead_gib)
                                              and args.overhead_gib >= 0):
        raise UsageError(f"--overhead-gib {args.overhead_gib}: give the GiB per process (>= 0, "
                         f"default {PROCESS_OVERHEAD_GIB}) for CUDA context, NCCL buffers and "
                         "allocator slack")
    job = validate(load_config(args.config, args.overrides))
    print_config_warnings(job, "plan")
    # Everything `train` would refuse; inputs a planning template leaves unset are notes.
    for note in preflight(job, require_inputs=False):
        print(f"megarlhf plan: note: needed to train: {note}", file=sys.stderr)
    overhead = PROCESS_OVERHEAD_GIB if args.overhead_gib is None else args.overhead_gib
    plan = make_plan(job, overhead_gib=overhead)
    print(format_plan(plan))
    if not plan.fits:
        print(f"megarlhf plan: refused: {len(plan.problems)} problem(s), listed above under "
              "DOES NOT FIT", file=sys.stderr)
        return 1
    return 0
