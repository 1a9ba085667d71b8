"""Rollout engines behind one interface (:class:`RolloutEngine`): vLLM, and transformers to debug.

``make_rollout_engine("hf", model=...)`` or ``make_rollout_engine("vllm", model=...)``; see
:mod:`megarlhf.rollout.base` for the sampling parameters, the outputs, the log-prob definition
shared by every engine and the weight-update contract. Nothing here imports vLLM: only
:mod:`megarlhf.rollout.vllm_engine` does, inside its functions.
"""

from __future__ import annotations

from typing import Any

from megarlhf.config.validate import auto_rollout_engine
from megarlhf.rollout.base import (
    RolloutEngine,
    RolloutOutput,
    Sample,
    SamplingParams,
    WeightManifest,
    WeightSyncError,
    WeightUpdateStats,
    hf_weight_manifest,
    token_logprobs,
)

ROLLOUT_ENGINE_KINDS = ("hf", "vllm")

__all__ = [
    "ROLLOUT_ENGINE_KINDS",
    "RolloutEngine",
    "RolloutOutput",
    "Sample",
    "SamplingParams",
    "WeightManifest",
    "WeightSyncError",
    "WeightUpdateStats",
    "default_rollout_kind",
    "hf_weight_manifest",
    "make_rollout_engine",
    "token_logprobs",
]


def default_rollout_kind(model: Any = None, cpu: bool = False) -> str:
    """What ``rollout.engine: auto`` means on this machine for ``model`` (HF config fields or
    directory): :func:`megarlhf.config.validate.auto_rollout_engine`."""
    return auto_rollout_engine(model, cpu=cpu)


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
