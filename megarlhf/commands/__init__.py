"""One module per ``megarlhf`` command; each exposes ``register(subparsers)``."""


def add_config_args(p):
    """The CONFIG positional and the dotted overrides every config-driven command takes."""
    p.add_argument("config", help="YAML job config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides, e.g. actor.parallel.tp=4 batch.n_samples_per_prompt=8")
