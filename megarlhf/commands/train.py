"""``megarlhf train sft|rm|ppo|grpo|dpo CONFIG [overrides] [--resume]``."""

from __future__ import annotations

import json

from megarlhf.commands import add_config_args

TRAINERS = {
    "sft": "megarlhf.controller.sft:train_sft",
    "rm": "megarlhf.controller.rm:train_rm",
    "ppo": "megarlhf.controller.rl:train_rl",
    "grpo": "megarlhf.controller.rl:train_rl",
    "dpo": "megarlhf.controller.rl:train_rl",
}


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model: sft, rm (outcome/process reward model), "
                                     "ppo, grpo or dpo (online)")
    p.add_argument("kind", choices=[k for k in TRAINERS if _available(k)],
                   help="what to train")
    add_config_args(p)
    p.add_argument("--resume", action="store_true",
                   help="continue from <checkpoint dir>/latest (same as checkpoint.resume=true)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous run in output_dir: megarlhf's own output only "
                        "(same as checkpoint.overwrite=true)")
    p.set_defaults(func=run)


def _available(kind: str) -> bool:
    import importlib.util

    module = TRAINERS[kind].split(":")[0]
    return importlib.util.find_spec(module) is not None


def run(args) -> int:
    import importlib

    from megarlhf.commands import check_command_kind
    from megarlhf.config import load_config
    from megarlhf.commands import print_config_warnings
    from megarlhf.planning import validate
    from megarlhf.planning.preflight import preflight

    check_command_kind(args.config, args.overrides, args.kind, "train")
    overrides = list(args.overrides) + [f"kind={args.kind}"]
    if args.resume:
        overrides.append("checkpoint.resume=true")
    if args.overwrite:
        overrides.append("checkpoint.overwrite=true")
    job = validate(load_config(args.config, overrides))  # config, models, placement
    print_config_warnings(job, "train")
    # Models, tokenizers, this machine, output_dir and a resume: before Ray starts. (The
    # trainer reads and checks the data itself, also before any worker starts.)
    preflight(job, data=False)
    module, fn = TRAINERS[args.kind].split(":")
    result = getattr(importlib.import_module(module), fn)(job)
    summary = {k: v for k, v in (result or {}).items() if isinstance(v, (int, float, str))}
    print(json.dumps(summary, indent=1))
    return 0
