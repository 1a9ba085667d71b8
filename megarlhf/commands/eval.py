"""``megarlhf eval bon CONFIG [overrides]``: best-of-N evaluation of a reward model."""

from __future__ import annotations

import json

from megarlhf.commands import add_config_args

EVALUATIONS = {
    "bon": "megarlhf.controller.bon:eval_bon",
}


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model: bon (best-of-N accuracy of a reward "
                                    "model over a policy's samples, with oracle and majority "
                                    "vote)")
    p.add_argument("what", choices=sorted(EVALUATIONS), help="which evaluation")
    add_config_args(p)
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier evaluation in output_dir (megarlhf's own output "
                        "only; same as checkpoint.overwrite=true)")
    p.set_defaults(func=run)


def run(args) -> int:
    import importlib

    from megarlhf.commands import check_command_kind
    from megarlhf.config import load_config
    from megarlhf.commands import print_config_warnings
    from megarlhf.planning import validate
    from megarlhf.planning.preflight import preflight

    check_command_kind(args.config, args.overrides, args.what, "eval")
    overrides = list(args.overrides) + [f"kind={args.what}"]
    if args.overwrite:
        overrides.append("checkpoint.overwrite=true")
    job = validate(load_config(args.config, overrides))  # config, models, placement
    print_config_warnings(job, "eval")
    preflight(job)  # models, tokenizers, test prompts and output_dir, before Ray starts
    module, fn = EVALUATIONS[args.what].split(":")
    result = getattr(importlib.import_module(module), fn)(job)
    print(json.dumps({"path": result["path"], "num_prompts": result["num_prompts"],
                      "samples_per_prompt": result["samples_per_prompt"],
                      "curve": {str(n): v for n, v in result["curve"].items()}}, indent=1))
    return 0
