"""Reward mixtures and the RewardFn protocol (megarlhf/rewards/mixture.py, base.py)."""

import math

import pytest

from megarlhf.rewards import RewardFn, RewardMixture, batched
from megarlhf.rewards.math_verify import MathVerifier


def const(v):
    return lambda prompts, responses, metadata: [v] * len(responses)


def test_weighted_sum_and_components():
    """If this fails, a mixed reward (e.g. verifier 1.0 + RM 0.5) is not the weighted sum of
    its sources, or the per-source values logged beside it are wrong."""
    rm = batched(lambda p, r, m: len(r))  # any RewardFn-like callable, e.g. the RM scorer
    mix = RewardMixture({"verifier": MathVerifier(), "rm": rm}, {"verifier": 1.0, "rm": 0.5})
    assert isinstance(mix, RewardFn)
    responses = ["answer: 3", "answer: 4"]
    meta = [{"answer": "3"}, {"answer": "3"}]
    total, parts = mix.score_components([None, None], responses, meta)
    assert parts == {"verifier": [1.0, 0.0], "rm": [9.0, 9.0]}
    assert total == [1.0 + 4.5, 0.0 + 4.5] == mix([None, None], responses, meta)


def test_zero_weight_source_is_not_called():
    """If this fails, a disabled (weight 0) source still runs (e.g. an expensive RM forward)."""
    def boom(prompts, responses, metadata):
        raise AssertionError("called")

    mix = RewardMixture({"a": const(2.0), "b": boom}, {"a": 1.0, "b": 0})
    assert mix([None], ["x"], None) == [2.0]


@pytest.mark.parametrize("weights,match", [
    ({}, "non-empty"),
    ({"a": 1.0}, r"sources \['b'\] have no weight"),
    ({"a": 1.0, "b": 1.0, "c": 1.0}, r"names \['c'\]"),
    ({"a": float("nan"), "b": 1.0}, "reward.sources.a must be a finite number"),
    ({"a": True, "b": 1.0}, "reward.sources.a must be a finite number"),
    ({"a": "1", "b": 1.0}, "reward.sources.a must be a finite number"),
    ({"a": 0, "b": 0.0}, "all zero"),
])
def test_weight_validation(weights, match):
    """If this fails, a misspelt, missing or non-numeric reward weight is accepted at config
    time and the run trains on a different reward than intended."""
    with pytest.raises(ValueError, match=match):
        RewardMixture({"a": const(1.0), "b": const(1.0)}, weights)
    with pytest.raises(TypeError, match="not callable"):
        RewardMixture({"a": 3}, {"a": 1.0})


def test_bad_source_output_is_caught():
    """If this fails, a source returning too few rewards or NaN corrupts training silently."""
    short = lambda p, r, m: [1.0]  # noqa: E731
    with pytest.raises(ValueError, match="'s' returned 1 rewards for 2 samples"):
        RewardMixture({"s": short}, {"s": 1.0})([None, None], ["a", "b"])
    nan = lambda p, r, m: [math.nan] * len(r)  # noqa: E731
    with pytest.raises(ValueError, match="non-finite"):
        RewardMixture({"s": nan}, {"s": 1.0})([None], ["a"])
    # Negative weights (penalties) are allowed.
    assert RewardMixture({"a": const(1.0), "len": const(2.0)}, {"a": 1.0, "len": -0.25})(
        [None], ["a"]) == [0.5]
