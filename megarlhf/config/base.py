"""Typed construction of dataclass configs from plain dicts, with errors that say what to change.

``from_dict(JobConfig, data)`` walks the dataclass tree: unknown keys are rejected with the
nearest valid name, values are checked against the field's type (ints, floats, bools, strings,
``Literal`` choices, ``Optional``, lists, dicts and nested dataclasses), and each component's own
``__post_init__`` validation runs with the dotted path of the component in its message.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin


class ConfigError(ValueError):
    """A config value is wrong; the message names the field (dotted path) and the fix."""


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Checks ``value`` against type ``tp``; returns the value (converted where lossless)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{path}: must not be null; expected {_type_name(tp)}")
        members = [a for a in args if a is not type(None)]
        if len(members) == 1:  # Optional[X]: X's own message is the useful one
            return _coerce(value, members[0], path)
        for a in members:
            if isinstance(value, dict) and dataclasses.is_dataclass(a):
                return _coerce(value, a, path)
        for a in members:
            try:
                return _coerce(value, a, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            near = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(
                f"{path}: {value!r} is not one of {', '.join(repr(c) for c in choices)}{hint}"
            )
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item_tp,) = get_args(tp)[:1] or (Any,)
        return [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        kt, vt = get_args(tp) or (Any, Any)
        return {k: _coerce(v, vt, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)  # YAML 1.1 reads "1e-5" as a string
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        if not math.isfinite(number):
            # .inf / .nan would train (and export) NaN weights without a word.
            raise ConfigError(f"{path}: {value!r} is not a finite number; give a finite value")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")


def from_dict(cls: type, data: dict[str, Any] | None, path: str = "") -> Any:
    """Builds dataclass ``cls`` from ``data``, recursively, with typed and named errors."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        k = unknown[0]
        where = f"{path}.{k}" if path else k
        near = difflib.get_close_matches(str(k), list(fields), n=1, cutoff=0.5)
        hint = f"; did you mean {(path + '.' if path else '') + near[0]!r}?" if near else ""
        valid = ", ".join(sorted(fields))
        raise ConfigError(f"unknown config key {where!r}{hint} (valid keys here: {valid})")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{path}.{name}" if path else name)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(qualify(path, str(e))) from None


def qualify(path: str, msg: str) -> str:
    """``msg`` of a component's own check, with the field named by its full dotted path.

    A component names its fields from its own level (``optimizer.lr``), a component's section
    name included or not; under ``path`` (``actor.optimizer``) the message gets the missing
    prefix once: ``optimizer.lr`` -> ``actor.optimizer.lr``, ``lr`` -> ``actor.optimizer.lr``,
    never ``actor.optimizer.optimizer.lr``.
    """
    if not path or msg.startswith(path + ".") or msg.startswith(path + ":") \
            or msg.startswith(path + " "):
        return msg
    parts = path.split(".")
    # The longest tail of ``path`` the message already starts with ("optimizer." for
    # "actor.optimizer"): only the part before it is added.
    for i in range(len(parts)):
        tail = ".".join(parts[i:])
        if msg.startswith(tail + ".") or msg.startswith(tail + ":") \
                or msg.startswith(tail + " "):
            return ".".join(parts[:i]) + "." + msg if i else msg
    return f"{path}.{msg}"


def to_dict(obj: Any) -> Any:
    """The plain-dict form of a config (for YAML dumps and checkpoints)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def check(cond: bool, message: str) -> None:
    """Raises :class:`ConfigError` with ``message`` when ``cond`` is false (for __post_init__)."""
    if not cond:
        raise ConfigError(message)
