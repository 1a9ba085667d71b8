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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"megarlhf: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
