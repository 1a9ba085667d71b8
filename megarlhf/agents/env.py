"""Environments of multi-turn agents: the interface, its results, and lookup by name.

An environment is one episode's counterpart. The rollout (:mod:`megarlhf.agents.rollout`)
creates one per trajectory from a dataset row, then alternates: the model writes an assistant
message, the environment answers with observation messages (a tool's result, a user's
feedback), a reward and whether the episode is over::

    class Guess(Environment):
        def reset(self, row):              # the row of the prompts file (prompt, answer, ...)
            self.secret = int(row["answer"])
            return []                      # extra opening messages; the prompt comes first
        def step(self, assistant_text):
            n = int(assistant_text.strip())
            if n == self.secret:
                return StepResult(reward=1.0, done=True)
            hint = "higher" if n < self.secret else "lower"
            return StepResult([{"role": "user", "content": hint}])

Select it in the job config with ``rollout.agent.env``: a built-in name (:data:`BUILTIN_ENVS`)
or ``module:Class`` (importable on the driver), with ``rollout.agent.options`` passed to its
constructor as keyword arguments. ``step`` may also be a coroutine function (``async def``).

Faults never end the run: an environment whose ``reset`` / ``step`` raises, exceeds
``rollout.agent.step_timeout_s``, or returns something that is not a :class:`StepResult` (or
observation messages that are not ``{"role": "user" | "tool" | "system", "content": str}``)
ends that trajectory with ``rollout.agent.fault_reward``; the fault is counted in the metrics
(``agent/env_errors``, ``agent/env_timeouts``, ``agent/env_garbage``).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any

OBSERVATION_ROLES = ("user", "tool", "system")


class EnvError(ValueError):
    """An environment cannot be found or built from the config (the message names the
    setting); raised before any worker starts."""


@dataclass
class StepResult:
    """An environment's answer to one assistant message.

    Attributes:
        observations: messages appended to the conversation before the model's next turn
            (``role`` user, tool or system; ``content`` a string). Empty when ``done``.
        reward: added to the trajectory's reward (the sum over its steps is the trajectory's
            reward, what the advantage estimators see).
        done: the episode is over (the trajectory ends; observations are ignored).
        info: free-form numbers the environment reports; numeric values are averaged into
            ``agent/info/<key>`` metrics.
    """

    observations: list[dict[str, str]] = field(default_factory=list)
    reward: float = 0.0
    done: bool = False
    info: dict[str, Any] = field(default_factory=dict)


class Environment:
    """One episode (see the module docstring). Subclasses implement :meth:`step` and usually
    :meth:`reset`; constructor keyword arguments come from ``rollout.agent.options``."""

    def reset(self, row: dict[str, Any]) -> list[dict[str, str]]:
        """Starts an episode on dataset ``row`` (its ``prompt``, ``answer`` and other fields).
        Returns messages to append after the prompt before the model's first turn (usually
        none)."""
        return []

    def step(self, assistant_text: str) -> StepResult:
        raise NotImplementedError

    def tools(self) -> list[dict[str, Any]] | None:
        """OpenAI function schemas of the environment's tools, rendered into the prompt by the
        chat template (templates that take ``tools``); None: the prompt describes the task
        alone. Asked once per job, from an environment built for the purpose."""
        return None

    def close(self) -> None:
        """Called once when the trajectory ends (also after a fault)."""


def is_async_step(env: Environment) -> bool:
    return inspect.iscoroutinefunction(type(env).step)


def check_observations(messages: Any) -> list[dict[str, str]]:
    """``messages`` as a list of observation messages.

    Raises:
        TypeError: not a list of ``{"role": user | tool | system, "content": str}``.
    """
    if not isinstance(messages, list):
        raise TypeError(f"observations are a {type(messages).__name__}, not a list")
    for m in messages:
        if not (isinstance(m, dict) and m.get("role") in OBSERVATION_ROLES
                and isinstance(m.get("content"), str)):
            raise TypeError(f"observation {m!r} is not a message with role in "
                            f"{OBSERVATION_ROLES} and string content")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def check_result(result: Any) -> StepResult:
    """``result`` as a valid :class:`StepResult`.

    Raises:
        TypeError: the environment returned something else (what, in the message).
    """
    if not isinstance(result, StepResult):
        raise TypeError(f"step returned {type(result).__name__}, not a StepResult")
    try:
        reward = float(result.reward)
    except (TypeError, ValueError):
        raise TypeError(f"reward {result.reward!r} is not a number") from None
    if reward != reward or reward in (float("inf"), float("-inf")):
        raise TypeError(f"reward {reward} is not finite")
    check_observations(result.observations)
    if not result.done and not result.observations:
        raise TypeError("step returned no observations and done=False (the model would be "
                        "asked to continue its own message)")
    if not isinstance(result.info, dict):
        raise TypeError(f"info is a {type(result.info).__name__}, not a dict")
    return StepResult(list(result.observations), reward, bool(result.done), dict(result.info))


def _builtins() -> dict[str, str]:
    return {"calculator": "megarlhf.agents.builtins:CalculatorEnv",
            "python": "megarlhf.agents.builtins:PythonEnv",
            "guess": "megarlhf.agents.builtins:GuessEnv",
            "tools": "megarlhf.agents.tools:FunctionToolsEnv"}


BUILTIN_ENVS = tuple(_builtins())


def env_class(spec: str) -> type[Environment]:
    """The environment class ``spec`` names: a built-in (:data:`BUILTIN_ENVS`) or
    ``module:Class``.

    Raises:
        EnvError: not found, not importable, or not an :class:`Environment` subclass.
    """
    path = _builtins().get(spec, spec)
    if ":" not in path:
        raise EnvError(f"rollout.agent.env = {spec!r}: not a built-in environment "
                       f"({', '.join(BUILTIN_ENVS)}) nor module:Class")
    mod, _, name = path.partition(":")
    try:
        cls = getattr(importlib.import_module(mod), name)
    except ImportError as e:
        raise EnvError(f"rollout.agent.env = {spec!r}: cannot import {mod} ({e})") from None
    except AttributeError:
        raise EnvError(f"rollout.agent.env = {spec!r}: {mod} has no {name}") from None
    if not (isinstance(cls, type) and issubclass(cls, Environment)):
        raise EnvError(f"rollout.agent.env = {spec!r}: {name} is not a subclass of "
                       "megarlhf.agents.Environment")
    return cls


def make_env_factory(spec: str, options: dict[str, Any]):
    """A zero-argument function building a fresh environment. One environment is built here
    and closed: a wrong keyword or a bad option value (a tool that does not import, a missing
    tokenizer) is a config error before anything starts, not a fault of every trajectory."""
    cls = env_class(spec)
    try:
        inspect.signature(cls).bind(**options)
    except TypeError as e:
        raise EnvError(f"rollout.agent.options {sorted(options)} do not fit {cls.__name__}: "
                       f"{e}") from None
    try:
        probe = cls(**options)
        schemas = probe.tools()
        probe.close()
    except EnvError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of the user's constructor, named
        raise EnvError(f"rollout.agent: {cls.__name__}(**rollout.agent.options) failed: "
                       f"{type(e).__name__}: {e}") from None
    if schemas is not None and not (isinstance(schemas, list) and all(
            isinstance(t, dict) for t in schemas)):
        raise EnvError(f"rollout.agent: {cls.__name__}.tools() must return a list of "
                       f"function schemas (dicts) or None, got {type(schemas).__name__}")

    def make() -> Environment:
        return cls(**options)

    make.tool_schemas = schemas  # type: ignore[attr-defined]
    return make
