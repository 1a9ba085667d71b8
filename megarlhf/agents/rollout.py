"""Multi-turn rollouts: trajectories that alternate between the rollout engine and their
environments, each advancing on its own.

The driver keeps every trajectory in one of two states: waiting for the model or waiting for
its environment. Each engine call takes every trajectory waiting for the model at that moment
(the engine batches them: vLLM's continuous batching, or the transformers engine's padding);
each environment step runs in a thread of its own, and a trajectory whose environment answered
joins the next engine call, while slower environments keep working. A trajectory ends when its
environment says done, at ``max_turns`` assistant messages, when its tokens reach
``max_tokens``, when a turn reaches ``max_tokens_per_turn`` without a stop token, or on an
environment fault (:mod:`megarlhf.agents.env`): raise, timeout, invalid result. A hung
environment's thread is abandoned, not killed (Python cannot stop a thread): environments that
run untrusted or unbounded work should do it in a process they can kill, as ``python`` does
through the code sandbox.

Sampling: each engine call draws with its own seed (``seed + call * SEED_STRIDE``); which
trajectories share a call depends on the environments' timing, so an agent rollout is not
bit-reproducible from its seed alone.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

from megarlhf.agents.env import Environment, check_observations, check_result, is_async_step
from megarlhf.agents.trajectory import TemplateError, TokenAssembler, Trajectory
from megarlhf.rollout.base import RolloutOutput, Sample, SamplingParams

SEED_STRIDE = 1_000_003

# Metrics of one rollout batch (averages over trajectories unless named *_frac / total).
AGENT_METRICS = ("agent/turns_mean", "agent/tool_calls_mean", "agent/tool_errors_mean",
                 "agent/generated_tokens_mean", "agent/observation_tokens_mean",
                 "agent/env_seconds_mean", "agent/truncated_frac", "agent/env_errors",
                 "agent/env_timeouts", "agent/env_garbage", "agent/done_frac")


@dataclass(frozen=True)
class AgentSettings:
    """The limits of a multi-turn rollout (``rollout.agent`` in the job config)."""

    max_turns: int = 8
    max_tokens: int = 1024
    max_tokens_per_turn: int = 256
    step_timeout_s: float = 30.0
    fault_reward: float = 0.0
    max_prompt_tokens: int | None = None  # a prompt an environment extends must fit


def turn_params(params: SamplingParams, max_new_tokens: int, call: int) -> SamplingParams:
    """The sampling of engine call number ``call`` of an agent rollout: one sample per context,
    the turn's budget, and the call's own seed (``seed + call * SEED_STRIDE``)."""
    return replace(params, n=1, max_new_tokens=max_new_tokens,
                   seed=None if params.seed is None else params.seed + call * SEED_STRIDE)


@dataclass
class _Pending:
    traj: Trajectory
    env: Environment
    thread: threading.Thread | None = None
    result: list = field(default_factory=list)  # [("ok", StepResult) | ("error", exc)]
    started: float = 0.0


def _run_step(env: Environment, text: str, out: list) -> None:
    try:
        if is_async_step(env):
            res = asyncio.run(env.step(text))
        else:
            res = env.step(text)
        out.append(("ok", res))
    except BaseException as e:  # noqa: BLE001 - the trajectory ends with the fault, counted
        out.append(("error", e))


def run_agent_rollouts(
    generate: Callable[[list[list[int]], SamplingParams], list[RolloutOutput]],
    starts: Sequence[tuple[list[int], list[dict[str, str]], dict[str, Any]]],
    make_env: Callable[[], Environment],
    assembler: TokenAssembler,
    params: SamplingParams,
    settings: AgentSettings,
    *,
    poll_s: float = 0.005,
) -> tuple[list[Trajectory], dict[str, float]]:
    """Runs one trajectory per entry of ``starts`` to its end.

    Args:
        generate: the rollout engine's ``generate`` (one sample per context).
        starts: ``(prompt_ids, prompt_messages, row)`` per trajectory (``row`` goes to the
            environment's ``reset``).
        make_env: a fresh environment.
        assembler: the token-exact assembly of turns and observations.
        params: the sampling of every turn (``n`` and ``max_new_tokens`` are set here).
        settings: the limits.

    Returns:
        The trajectories in the order of ``starts``, and the batch's metrics
        (:data:`AGENT_METRICS` and ``agent/info/<key>`` for the environments' numbers).
    """
    trajs: list[Trajectory] = []
    envs: list[Environment | None] = []
    counts = {"env_errors": 0, "env_timeouts": 0, "env_garbage": 0}
    waiting: list[int] = []  # trajectories waiting for the model
    stepping: dict[int, _Pending] = {}
    for i, (ids, messages, row) in enumerate(starts):
        t = Trajectory(prompt_ids=list(ids), messages=[dict(m) for m in messages])
        trajs.append(t)
        try:
            env = make_env()
            extra = check_observations(env.reset(dict(row)) or [])
        except Exception as e:  # noqa: BLE001 - a fault of this trajectory only
            _end(t, None, "env_garbage" if isinstance(e, TypeError) else "env_error",
                 settings, counts, repr(e))
            envs.append(None)
            continue
        envs.append(env)
        if extra:  # opening messages of the environment: part of the prompt
            t.messages.extend(extra)
            try:
                t.prompt_ids = assembler.encode_prompt(t.messages)
            except TemplateError as e:
                _end(t, env, "template", settings, counts, str(e))
                continue
            t.extended_prompt = True
            limit = settings.max_prompt_tokens
            if limit is not None and len(t.prompt_ids) > limit:
                _end(t, env, "env_error", settings, counts,
                     f"the environment's opening messages make the prompt "
                     f"{len(t.prompt_ids)} tokens, over data.max_prompt_len = {limit}")
                continue
        waiting.append(i)

    call = 0
    while waiting or stepping:
        if waiting:
            # One engine call per turn budget: a turn never runs past the trajectory's tokens
            # (nor the engine's context, which is sized for prompt + max_tokens).
            budgets: dict[int, list[int]] = {}
            for i in waiting:
                room = min(settings.max_tokens_per_turn, settings.max_tokens - len(trajs[i].ids))
                budgets.setdefault(room, []).append(i)
            waiting = []
            for room, batch in sorted(budgets.items(), reverse=True):
                outs = generate([trajs[i].context for i in batch],
                                turn_params(params, room, call))
                call += 1
                for i, out in zip(batch, outs, strict=True):
                    _after_turn(i, trajs[i], envs[i], out.samples[0], assembler, settings,
                                counts, stepping)
        now = time.monotonic()
        for i, pend in list(stepping.items()):
            t = trajs[i]
            if pend.result:
                del stepping[i]
                t.env_seconds += now - pend.started
                kind, value = pend.result[0]
                if kind == "error":
                    _end(t, pend.env, "env_error", settings, counts, repr(value))
                    continue
                try:
                    res = check_result(value)
                except TypeError as e:
                    _end(t, pend.env, "env_garbage", settings, counts, str(e))
                    continue
                t.reward += res.reward
                t.info = res.info
                if res.done:
                    _end(t, pend.env, "done", settings, counts)
                elif t.turns >= settings.max_turns:
                    _end(t, pend.env, "max_turns", settings, counts)
                else:
                    try:
                        obs = assembler.observation_ids(t, res.observations)
                    except TemplateError as e:
                        _end(t, pend.env, "template", settings, counts, str(e))
                        continue
                    if len(t.ids) + len(obs) >= settings.max_tokens:
                        _end(t, pend.env, "max_tokens", settings, counts)
                        continue
                    assembler.add_observations(t, res.observations, obs)
                    waiting.append(i)
            elif now - pend.started > settings.step_timeout_s:
                del stepping[i]
                t.env_seconds += now - pend.started
                _end(t, pend.env, "env_timeout", settings, counts,
                     f"no answer within {settings.step_timeout_s:g} s")
        if not waiting and stepping:
            time.sleep(poll_s)
    return trajs, _metrics(trajs, counts)


def _after_turn(i: int, t: Trajectory, env: Environment, s: Sample,
                assembler: TokenAssembler, settings: AgentSettings, counts: dict,
                stepping: dict[int, _Pending]) -> None:
    gen = list(s.token_ids)
    if len(gen) > settings.max_tokens - len(t.ids):
        raise RuntimeError(f"the rollout engine returned {len(gen)} tokens for a turn allowed "
                           f"{settings.max_tokens - len(t.ids)}")
    text = assembler.add_turn(t, gen, None if s.logprobs is None else list(s.logprobs))
    if s.finish_reason == "length":
        # the turn hit its budget without a stop token: the trajectory's, or the turn's own
        full = len(t.ids) >= settings.max_tokens
        _end(t, env, "max_tokens" if full else "turn_length", settings, counts)
        return
    pend = _Pending(t, env, started=time.monotonic())
    pend.thread = threading.Thread(target=_run_step, args=(env, text, pend.result),
                                   daemon=True, name=f"megarlhf-env-{i}")
    stepping[i] = pend
    pend.thread.start()


def _end(t: Trajectory, env: Environment | None, finish: str, settings: AgentSettings,
         counts: dict, why: str = "") -> None:
    t.finish = finish
    if finish in ("env_error", "env_timeout", "env_garbage", "template"):
        counts[{"env_error": "env_errors", "env_timeout": "env_timeouts",
                "env_garbage": "env_garbage", "template": "env_errors"}[finish]] += 1
        t.reward = settings.fault_reward
        t.info = dict(t.info, fault=why[:500])
    if env is not None and finish != "env_timeout":  # a hung env's thread may still run
        try:
            env.close()
        except Exception as e:  # noqa: BLE001 - counted: the trajectory itself is complete
            counts["env_errors"] += 1
            t.info = dict(t.info, close_error=repr(e)[:500])


def _metrics(trajs: list[Trajectory], counts: dict) -> dict[str, float]:
    n = max(1, len(trajs))

    def mean(xs) -> float:
        xs = list(xs)
        return float(sum(xs)) / max(1, len(xs))

    m = {
        "agent/turns_mean": mean(t.turns for t in trajs),
        "agent/tool_calls_mean": mean(float(t.info.get("tool_calls", 0) or 0) for t in trajs),
        "agent/tool_errors_mean": mean(float(t.info.get("tool_errors", 0) or 0) for t in trajs),
        "agent/generated_tokens_mean": mean(t.generated_tokens for t in trajs),
        "agent/observation_tokens_mean": mean(t.observation_tokens for t in trajs),
        "agent/env_seconds_mean": mean(t.env_seconds for t in trajs),
        "agent/truncated_frac": sum(t.finish in ("max_tokens", "turn_length", "max_turns")
                                    for t in trajs) / n,
        "agent/done_frac": sum(t.finish == "done" for t in trajs) / n,
        "agent/env_errors": float(counts["env_errors"]),
        "agent/env_timeouts": float(counts["env_timeouts"]),
        "agent/env_garbage": float(counts["env_garbage"]),
    }
    keys = sorted({k for t in trajs for k, v in t.info.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and k not in ("tool_calls", "tool_errors")})
    for k in keys:
        vals = [float(t.info[k]) for t in trajs if isinstance(t.info.get(k), (int, float))]
        m[f"agent/info/{k}"] = mean(vals)
    return m


def trajectory_outputs(trajs: Sequence[Trajectory], n: int) -> list[RolloutOutput]:
    """The trajectories as the engine's output shape: one :class:`RolloutOutput` per prompt
    (``n`` consecutive trajectories each), a :class:`Sample` per trajectory with its loss mask
    (generated tokens) and the environment's reward."""
    if len(trajs) % n:
        raise ValueError(f"{len(trajs)} trajectories are not groups of {n}")
    outs = []
    for k in range(0, len(trajs), n):
        group = trajs[k:k + n]
        samples = tuple(
            Sample(token_ids=tuple(t.ids), logprobs=tuple(t.logprobs),
                   finish_reason="stop" if t.finish == "done" else "length",
                   loss_mask=tuple(t.generated), reward=t.reward,
                   prompt_ids=tuple(t.prompt_ids) if t.extended_prompt else None)
            for t in group)
        outs.append(RolloutOutput(prompt_token_ids=tuple(group[0].prompt_ids),
                                  samples=samples))
    return outs
