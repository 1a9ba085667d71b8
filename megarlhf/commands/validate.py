"""``megarlhf validate CONFIG [overrides]``: check a job config without starting anything."""

from __future__ import annotations

from megarlhf.commands import add_config_args


def register(sub) -> None:
    p = sub.add_parser("validate", help="check a job config (types, layouts, batch sizes) and "
                                        "what it reads and writes (models, tokenizer, data, "
                                        "output_dir), as train would; print the resolved YAML")
    add_config_args(p)
    p.add_argument("--quiet", action="store_true", help="print nothing when the config is valid")
    p.set_defaults(func=run)


def run(args) -> int:
    from omegaconf import OmegaConf

    from megarlhf.config import load_config, to_dict
    from megarlhf.commands import print_config_warnings
    from megarlhf.planning import validate
    from megarlhf.planning.preflight import preflight

    job = validate(load_config(args.config, args.overrides))
    print_config_warnings(job, "validate")
    # What `train` would refuse too: inputs (models, tokenizer, every data row), this machine
    # (FP8 / Transformer Engine), output_dir and a resume.
    preflight(job)
    if not args.quiet:
        print(OmegaConf.to_yaml(OmegaConf.create(to_dict(job))), end="")
        print(f"# valid: {job.kind} job {job.name!r}")
    return 0
