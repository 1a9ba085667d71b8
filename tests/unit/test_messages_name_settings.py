"""Every config setting an error message names exists (issue 15: messages told users to set
``data.fields``, ``data.prompt_overflow`` and ``data.step_delimiter``, which do not exist).

The test reads megarlhf's source, collects the text of every error message (the arguments of
``raise ...(...)``, of ``check(cond, msg)``, of ``errors.append(...)`` / ``problems.append``
and of ``*.error(...)``), finds the dotted config keys in it and resolves each through the
JobConfig schema (a role section's ``model.`` / ``parallel.`` / ``optimizer.`` may be named
relative to the role)."""

import ast
import dataclasses
import os
import re
import typing

import pytest

import megarlhf
from megarlhf.config.schema import (
    JobConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    RoleConfig,
)

pytestmark = pytest.mark.unit

PKG = os.path.dirname(megarlhf.__file__)
ROOTS = {f.name for f in dataclasses.fields(JobConfig)} | {"model", "parallel", "optimizer"}
RELATIVE = {"model": ModelConfig, "parallel": ParallelConfig, "optimizer": OptimizerConfig}
HOLE = "\x00"  # where an f-string's {expression} was
KEY = re.compile(r"(?:(?<=\x00\.)|(?<![\w./\x00-]))"
                 r"((?:%s)(?:\.(?:[A-Za-z_][A-Za-z0-9_]*|\x00))+)(?![\w(])"
                 % "|".join(sorted(ROOTS, key=len, reverse=True)))
# ``data.jsonl, line 3`` and friends are file names, not settings.
FILE_SUFFIXES = {"json", "jsonl", "yaml", "yml", "safetensors", "model", "parquet", "py", "pt",
                 "txt", "bin", "distcp", "index", "csv", "tmp"}
MESSAGE_CALLS = {"check", "error", "append", "ConfigError", "UsageError", "OutputError",
                 "DatasetError", "CheckpointError", "ConversionError", "HFValidationError",
                 "ArchError", "ModelBuildError", "PlanError", "PlacementError"}


def _text(node) -> str:
    """The literal text of a str constant or f-string (expressions become HOLE)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(_text(v) if isinstance(v, ast.Constant) else HOLE for v in node.values)
    return ""


def _strings(node) -> list[str]:
    out = []
    for n in ast.walk(node):
        if isinstance(n, (ast.Constant, ast.JoinedStr)):
            out.append(_text(n))
    # Adjacent literals are one message: join a call's string arguments too.
    return out


def messages() -> list[tuple[str, str]]:
    """(file:line, text) of every error message in megarlhf."""
    found = []
    for d, _, files in os.walk(PKG):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(d, f)
            tree = ast.parse(open(path, encoding="utf-8").read())
            for node in ast.walk(tree):
                target = None
                if isinstance(node, ast.Raise) and node.exc is not None:
                    target = node.exc
                elif isinstance(node, ast.Call):
                    fn = node.func
                    name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
                    if name == "append":
                        recv = fn.value
                        if not (isinstance(recv, ast.Name) and recv.id in (
                                "errors", "problems", "notes", "diffs")):
                            continue
                    if name in MESSAGE_CALLS:
                        target = node
                if target is None:
                    continue
                where = f"{os.path.relpath(path, PKG)}:{node.lineno}"
                for s in _strings(target):
                    if s:
                        found.append((where, s))
    return found


def _resolve(tp, parts: list[str]) -> bool:
    """``parts`` is a path of fields through dataclass ``tp`` (HOLE matches any field)."""
    for i, part in enumerate(parts):
        origin = typing.get_origin(tp)
        if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
            members = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = members[0] if len(members) == 1 else tp
            origin = typing.get_origin(tp)
        if origin is dict or tp is typing.Any:
            return True  # model.arch.<HF field>, reward.sources.<source>
        if not dataclasses.is_dataclass(tp):
            return False
        hints = typing.get_type_hints(tp)
        if part == HOLE:
            return any(_resolve(h, parts[i + 1:]) for h in hints.values())
        if part not in hints:
            return False
        tp = hints[part]
    return True


# Hugging Face tensor names (model.layers.0.mlp..., model.embed_tokens.weight) in weight
# messages are not settings.
HF_TENSORS = {"layers", "embed_tokens", "norm"}


def resolves(key: str) -> bool:
    parts = key.split(".")
    if parts[-1] in FILE_SUFFIXES or (parts[0] == "model" and parts[1] in HF_TENSORS):
        return True
    if _resolve(JobConfig, parts):
        return True
    if parts[0] in RELATIVE:  # {role}.model.hf_dir printed as model.hf_dir
        return _resolve(RELATIVE[parts[0]], parts[1:]) or _resolve(RoleConfig, parts)
    return False


def test_the_walker_finds_keys_and_catches_bad_ones():
    """If this fails, the walk below would pass whatever the messages say."""
    assert KEY.findall("set data.prompt_key to x") == ["data.prompt_key"]
    assert KEY.findall(f"set {HOLE}.parallel.tp=2") == ["parallel.tp"]
    assert KEY.findall("megarlhf.config.validate and data.jsonl") == ["data.jsonl"]
    assert not KEY.findall("batch.select(x)")
    assert resolves("actor.optimizer.lr") and resolves("parallel.tp")
    assert resolves("actor.model.arch.num_hidden_layers") and resolves("reward.sources.rm")
    for bad in ("data.fields", "data.prompt_overflow", "data.step_delimiter",
                "actor.optimizer.optimizer.lr", "batch.n_sample_per_prompt"):
        assert not resolves(bad), bad


def test_error_messages_name_only_settings_that_exist():
    """If this fails, an error message tells the user to set a config key that does not
    exist (the list names the message's file and line)."""
    found = messages()
    assert len(found) > 300, "the walk found too few messages: the collector is broken"
    keys = {(where, k) for where, text in found for k in KEY.findall(text)}
    assert len(keys) > 150
    bad = sorted(f"{where}: {k.replace(HOLE, '{...}')}" for where, k in keys if not resolves(k))
    assert not bad, "messages name settings that do not exist:\n  " + "\n  ".join(bad)
