"""A weighted sum of reward sources, e.g. ``{"verifier": 1.0, "rm": 0.5}``."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from megarlhf.rewards.base import RewardFn, check_batch, check_rewards


class RewardMixture:
    """``r = sum_k w_k * r_k`` over named sources; itself a :class:`RewardFn`.

    Sources with weight 0 are not called. Weights may be negative (a penalty source), must be
    finite numbers, and not all zero.

    Args:
        sources: name -> any ``RewardFn``-like callable ``(prompts, responses, metadata)``.
        weights: name -> weight; exactly the names of ``sources``.
    """

    def __init__(self, sources: Mapping[str, RewardFn], weights: Mapping[str, float]):
        validate_weights(weights, sources)
        for name, fn in sources.items():
            if not callable(fn):
                raise TypeError(f"reward source {name!r} is not callable: {fn!r}")
        self.sources = dict(sources)
        self.weights = {k: float(v) for k, v in weights.items()}

    def score_components(self, prompts: Sequence[Any], responses: Sequence[str],
                         metadata: Sequence[Mapping[str, Any]] | None = None
                         ) -> tuple[list[float], dict[str, list[float]]]:
        """The mixed reward and each source's raw reward (for logging)."""
        metadata = check_batch(prompts, responses, metadata)
        n = len(responses)
        parts = {}
        total = [0.0] * n
        for name, w in self.weights.items():
            if w == 0.0:
                continue
            r = check_rewards(self.sources[name](prompts, responses, metadata), n,
                              f"reward source {name!r}")
            parts[name] = r
            total = [t + w * x for t, x in zip(total, r)]
        return total, parts

    def __call__(self, prompts, responses, metadata=None) -> list[float]:
        return self.score_components(prompts, responses, metadata)[0]


def validate_weights(weights: Mapping[str, float],
                     sources: Mapping[str, Any] | None = None) -> None:
    """Raise ValueError (saying what to change) unless ``weights`` is a usable mixture."""
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError(f"reward.sources must be a non-empty mapping name -> weight, "
                         f"got {weights!r}")
    for name, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"reward.sources.{name} must be a finite number, got {w!r}")
    if all(w == 0 for w in weights.values()):
        raise ValueError("reward.sources are all zero; give at least one source a weight")
    if sources is not None:
        missing = sorted(set(weights) - set(sources))
        unused = sorted(set(sources) - set(weights))
        if missing:
            raise ValueError(f"reward.sources names {missing}, which are not reward sources; "
                             f"the sources are {sorted(sources)}")
        if unused:
            raise ValueError(f"reward sources {unused} have no weight; add them to "
                             f"reward.sources (0 to disable)")
