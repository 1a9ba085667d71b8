"""Loading a job config: YAML file (OmegaConf, with interpolation) + dotted CLI overrides."""

from __future__ import annotations

import os
from typing import Any, Sequence

from megarlhf.config.base import ConfigError, from_dict, to_dict
from megarlhf.config.schema import JobConfig
from megarlhf.config.validate import validate_config


def _load_yaml(path: str) -> dict[str, Any]:
    from omegaconf import OmegaConf

    if os.path.isdir(path):
        raise ConfigError(f"config file {path!r} is a directory; give a YAML file")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    try:
        conf = OmegaConf.load(path)
    except Exception as e:  # noqa: BLE001 - YAML syntax errors come in many types
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return conf


def load_config(path: str | None, overrides: Sequence[str] = (), validate: bool = True
                ) -> JobConfig:
    """Reads ``path`` (YAML), applies ``overrides`` (``a.b.c=value``), builds and checks the
    rules the config alone shows (:func:`~megarlhf.config.validate.validate_config`; the
    model-aware and placement rules are :func:`megarlhf.planning.validate`'s, which commands
    and trainers run before they start anything).

    Override values are parsed as YAML (``actor.parallel.tp=4``, ``reward.sources={math: 1}``,
    ``model.hf_dir=null``). ``key=`` with nothing after it is refused; use ``key=null``.
    """
    from omegaconf import OmegaConf

    base = _load_yaml(path) if path else OmegaConf.create({})
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override {o!r} must look like key.path=value "
                              f"(e.g. actor.parallel.tp=2)")
        key, _, value = o.partition("=")
        if not key or value == "":
            raise ConfigError(f"override {o!r}: give a key and a value (use key=null to unset)")
    try:
        merged = OmegaConf.merge(base, OmegaConf.from_dotlist(list(overrides)))
        data = OmegaConf.to_container(merged, resolve=True)
    except Exception as e:  # noqa: BLE001 - interpolation errors
        raise ConfigError(f"could not resolve the config: {e}") from None
    job = from_dict(JobConfig, data)
    if validate:
        validate_config(job)
    return job


def declared_kind(path: str | None, overrides: Sequence[str] = ()) -> str | None:
    """The ``kind`` the config file or an override sets explicitly (None: neither does)."""
    kind = None
    if path:
        data = _load_yaml(path)
        if hasattr(data, "get"):
            kind = data.get("kind")
    for o in overrides:
        key, _, value = o.partition("=")
        if key.strip() == "kind":
            kind = value.strip()
    return None if kind is None else str(kind)


def dump_config(job: JobConfig, path: str) -> None:
    """Writes the resolved config as YAML (saved next to every run and checkpoint)."""
    from omegaconf import OmegaConf

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(OmegaConf.to_yaml(OmegaConf.create(to_dict(job))))
    os.replace(tmp, path)
