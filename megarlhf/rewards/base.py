"""The reward-function protocol: batched, pure Python, one float per (prompt, response)."""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable


@runtime_checkable
class RewardFn(Protocol):
    """A batched reward source.

    ``prompts[i]`` (text or chat messages), ``responses[i]`` (the generated text) and
    ``metadata[i]`` (the prompt row's extra fields: ``answer``, ``test_cases``, ``id``, ...)
    describe sample i; the result holds one finite float per sample, in order.
    """

    def __call__(self, prompts: Sequence[Any], responses: Sequence[str],
                 metadata: Sequence[Mapping[str, Any]]) -> list[float]: ...


def check_rewards(rewards: Sequence[float], n: int, name: str = "reward") -> list[float]:
    """``rewards`` as a list of n finite floats, or a ValueError naming the source."""
    out = [float(r) for r in rewards]
    if len(out) != n:
        raise ValueError(f"{name} returned {len(out)} rewards for {n} samples")
    bad = [i for i, r in enumerate(out) if not math.isfinite(r)]
    if bad:
        raise ValueError(f"{name} returned non-finite rewards at samples {bad[:8]}")
    return out


def check_batch(prompts: Sequence[Any], responses: Sequence[str],
                metadata: Sequence[Mapping[str, Any]] | None) -> Sequence[Mapping[str, Any]]:
    """Check that the three lists line up; ``None`` metadata means empty dicts."""
    if metadata is None:
        metadata = [{}] * len(responses)
    if not len(prompts) == len(responses) == len(metadata):
        raise ValueError(f"reward batch: {len(prompts)} prompts, {len(responses)} responses, "
                         f"{len(metadata)} metadata entries; they must have equal lengths")
    return metadata


def batched(fn: Callable[[Any, str, Mapping[str, Any]], float]) -> RewardFn:
    """Make a batched :class:`RewardFn` from a per-sample ``fn(prompt, response, metadata)``."""

    def reward(prompts, responses, metadata=None):
        metadata = check_batch(prompts, responses, metadata)
        return [float(fn(p, r, m)) for p, r, m in zip(prompts, responses, metadata)]

    reward.__name__ = getattr(fn, "__name__", "reward")
    return reward
