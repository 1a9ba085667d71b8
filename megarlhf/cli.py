"""``megarlhf`` command line.

Each command lives in its own module with a ``register(subparsers)`` function; :data:`COMMANDS`
lists them in help order. Only commands that work are registered, so ``megarlhf --help`` never
advertises something that does not exist.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from megarlhf.config.base import ConfigError

# (command, module that registers it)
COMMANDS: list[tuple[str, str]] = [
    ("demo", "megarlhf.commands.demo"),
    ("train", "megarlhf.commands.train"),
    ("eval", "megarlhf.commands.eval"),
    ("validate", "megarlhf.commands.validate"),
    ("score", "megarlhf.commands.score"),
    ("convert", "megarlhf.commands.convert"),
    ("plan", "megarlhf.commands.plan"),
    ("study", "megarlhf.commands.study"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megarlhf",
        description="RLHF for Megatron-scale models: PPO, GRPO, online DPO, reward models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for _, module in COMMANDS:
        importlib.import_module(module).register(sub)
    return parser


# Errors a user causes (a bad config, data file, path, model directory, checkpoint or flag):
# each carries one message naming the file / field and the fix, printed without a traceback.
# Exit code 2: refused (nothing was started or written); 1: the run failed (DivergenceError).
USER_ERRORS: list[tuple[str, str, int]] = [
    ("megarlhf.commands", "UsageError", 2),
    ("megarlhf.checkpoint.outputs", "OutputError", 2),
    ("megarlhf.data.datasets", "DatasetError", 2),
    ("megarlhf.checkpoint.model", "CheckpointError", 2),
    ("megarlhf.checkpoint.convert", "ConversionError", 2),
    ("megarlhf.rollout.base", "WeightSyncError", 2),  # trainer and rollout models differ
    ("megarlhf.weights.validate", "HFValidationError", 2),
    ("megarlhf.weights.hf_io", "HFCheckpointError", 2),
    ("megarlhf.models.arch", "ArchError", 2),
    ("megarlhf.models.families", "UnsupportedArchitecture", 2),
    ("megarlhf.models.builder", "ModelBuildError", 2),
    ("megarlhf.study.errors", "StudyError", 2),
    ("megarlhf.study.plot", "PlotUnavailable", 2),
    ("megarlhf.observability.divergence", "DivergenceError", 1),
    ("megarlhf.controller.rl", "LogprobMismatchError", 1),  # rollout.logprob_check_action=stop
    # Not a user error, but its message is the whole story (the lost node, what it held, the
    # checkpoint to resume from): printed without a traceback, exit code 1.
    ("megarlhf.controller.cluster", "NodeLostError", 1),
]


def user_error_code(e: BaseException) -> int | None:
    """The exit code of a user error ``e`` (see :data:`USER_ERRORS`), None for anything else."""
    for module, name, code in USER_ERRORS:
        mod = sys.modules.get(module)  # an error of a module that was never imported: not it
        cls = getattr(mod, name, None) if mod is not None else None
        if cls is not None and isinstance(e, cls):
            return code
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # KEY=VALUE overrides may come after a flag (`train sft CFG --overwrite output_dir=X`):
    # argparse ends a positional list at the first flag, so they arrive here as extras.
    if extra and hasattr(args, "overrides") and all(
            "=" in a and not a.startswith("-") for a in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")

    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"megarlhf: config error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - user errors get one line; anything else is a bug
        code = user_error_code(e)
        if code is None:
            raise
        print(f"megarlhf {args.command}: error: {e}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
