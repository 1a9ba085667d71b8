"""One module per ``megarlhf`` command; each exposes ``register(subparsers)``."""

from megarlhf.config import ConfigError
from megarlhf.config.loader import declared_kind
from megarlhf.config.validate import config_warnings


class UsageError(ValueError):
    """A command was given a bad flag value, input file or output path; the message names it
    and what to change (the CLI prints it and exits with code 2)."""


def add_config_args(p):
    """The CONFIG positional and the dotted overrides every config-driven command takes."""
    p.add_argument("config", help="YAML job config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides, e.g. actor.parallel.tp=4 batch.n_samples_per_prompt=8")


def check_command_kind(path: str, overrides, kind: str, command: str) -> None:
    """The config's own ``kind`` (file or override) must be the one the command runs:
    ``megarlhf train sft`` on a ``kind: grpo`` config used to train SFT silently.

    Raises:
        ConfigError: naming both kinds and the two ways out.
    """
    declared = declared_kind(path, overrides)
    if declared is not None and declared != kind:
        raise ConfigError(f"{path} says kind: {declared}, but `megarlhf {command} {kind}` runs "
                          f"kind {kind}; run `megarlhf {command} {declared} {path}`, or change "
                          f"kind in the config")


def print_config_warnings(job, command: str) -> None:
    """Prints :func:`megarlhf.config.validate.config_warnings` (settings that do nothing in
    this job) to stderr, one line each, before the command starts its work."""
    import sys

    for w in config_warnings(job):
        print(f"megarlhf {command}: warning: {w}", file=sys.stderr)
