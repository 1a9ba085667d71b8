"""The rollout-vs-actor log-prob check: thresholds by the policy's dtype (the fp32 defaults
would warn on every bf16 step), both the max and the mean, and the configured values winning."""

from types import SimpleNamespace

import pytest
import torch

from megarlhf.config.base import from_dict
from megarlhf.config.schema import LOGPROB_CHECK_DEFAULTS, JobConfig
from megarlhf.controller.rl import LogprobMismatchError, RLTrainer

pytestmark = pytest.mark.unit


def _check(dtype, diffs, **rollout):
    job = from_dict(JobConfig, {"kind": "grpo", "actor": {"model": {"arch": {
        "model_type": "llama"}, "dtype": dtype}}, "rollout": dict(rollout,
                                                                    logprob_check_action="stop")})
    fake = SimpleNamespace(job=job, warn=lambda msg: None)
    d = torch.tensor(diffs)
    return RLTrainer.check_logprobs(fake, d, torch.zeros_like(d), torch.ones_like(d).bool())


def test_bf16_gaps_pass_under_bf16_defaults_but_not_fp32():
    """Broken: a bf16 run stops (or warns) on every step for the numerics of bf16 alone, or an
    fp32 run lets through gaps that mean broken weights."""
    bf16_like = [0.004, 0.0007, 0.017, 0.002]  # measured on CPU (docs/benchmarks.md)
    assert _check("bf16", bf16_like)["rollout/logprob_diff_max"] == pytest.approx(0.017)
    with pytest.raises(LogprobMismatchError, match="mean"):
        _check("fp32", bf16_like)
    assert LOGPROB_CHECK_DEFAULTS["fp32"][0] < LOGPROB_CHECK_DEFAULTS["bf16"][0]


def test_stale_weights_are_caught_in_bf16_by_the_mean():
    """Broken: in bf16 the loose max threshold alone lets stale weights through."""
    with pytest.raises(LogprobMismatchError, match="mean"):
        _check("bf16", [0.2, 0.3, 0.1, 0.25])


def test_configured_thresholds_win():
    """Broken: a user's threshold is ignored for the dtype default."""
    with pytest.raises(LogprobMismatchError, match="max"):
        _check("bf16", [0.02, 0.001], logprob_check_threshold=0.01)
    _check("fp32", [0.5, 0.001], logprob_check_threshold=1.0, logprob_check_mean_threshold=1.0)
