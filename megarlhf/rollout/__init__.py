"""Rollout engines behind one interface (:class:`RolloutEngine`): vLLM on GPU, transformers on CPU.

``make_rollout_engine("hf", model=...)`` or ``make_rollout_engine("vllm", model=...)``; see
:mod:`megarlhf.rollout.base` for the sampling parameters, the outputs, the log-prob definition
shared by every engine and the weight-update contract. Nothing here imports vLLM: only
:mod:`megarlhf.rollout.vllm_engine` does, inside its functions.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from megarlhf.rollout.base import (
    RolloutEngine,
    RolloutOutput,
    Sample,
    SamplingParams,
    WeightUpdateStats,
    token_logprobs,
)

ROLLOUT_ENGINE_KINDS = ("hf", "vllm")

__all__ = [
    "ROLLOUT_ENGINE_KINDS",
    "RolloutEngine",
    "RolloutOutput",
    "Sample",
    "SamplingParams",
    "WeightUpdateStats",
    "default_rollout_kind",
    "make_rollout_engine",
    "token_logprobs",
]


def default_rollout_kind() -> str:
    """Return "vllm" where CUDA and vLLM are both present, else "hf" (the CPU default)."""
    if torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None:
        return "vllm"
    return "hf"


def make_rollout_engine(kind: str, **kwargs: Any) -> RolloutEngine:
    """Build a rollout engine.

    Args:
        kind: "hf" (:class:`~megarlhf.rollout.hf_engine.HFRolloutEngine`, keywords as its
            constructor: ``model`` = config dict / ``PretrainedConfig`` / local HF directory) or
            "vllm" (:meth:`~megarlhf.rollout.vllm_engine.VLLMRolloutEngine.create`: ``model`` =
            local HF directory, ``tensor_parallel_size``, ... ).
        kwargs: passed to the engine.
    """
    if kind == "hf":
        from megarlhf.rollout.hf_engine import HFRolloutEngine

        return HFRolloutEngine(**kwargs)
    if kind == "vllm":
        from megarlhf.rollout.vllm_engine import VLLMRolloutEngine

        return VLLMRolloutEngine.create(**kwargs)
    raise ValueError(f"rollout engine kind must be one of {ROLLOUT_ENGINE_KINDS}, got {kind!r}")
