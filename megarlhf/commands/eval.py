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
    p.set_defaults(func=run)


def run(args) -> int:
    import importlib

    from megarlhf.config import ConfigError, load_config

    job = load_config(args.config, list(args.overrides) + [f"kind={args.what}"])
    if job.kind != args.what:
        raise ConfigError(f"the config says kind={job.kind} but the command evaluates "
                          f"{args.what}")
    module, fn = EVALUATIONS[args.what].split(":")
    result = getattr(importlib.import_module(module), fn)(job)
    print(json.dumps({"path": result["path"], "num_prompts": result["num_prompts"],
                      "samples_per_prompt": result["samples_per_prompt"],
                      "curve": {str(n): v for n, v in result["curve"].items()}}, indent=1))
    return 0
