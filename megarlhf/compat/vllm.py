"""Every use megarlhf makes of vLLM's internals, in one place, checked against the installed vLLM.

megarlhf follows vLLM ``PINNED_VLLM_VERSION`` (the same release on GPU and in its CPU build).
Public API (``vllm.LLM``, ``SamplingParams``, the weight-transfer API) is used as documented;
what is listed here reaches past it. Each item is checked when this module is imported (the
first time a process builds a vLLM engine or a vLLM worker loads megarlhf's weight-transfer
engine): what it touches must exist with the shape it expects, else :class:`VLLMCompatError`
names the item and the vLLM version it was written for. ``tests/unit/test_compat_vllm.py``
proves, item by item, that vLLM really goes through the patched symbol, so a release that
moves it fails a test, not a run.

=============================  =================================================================
item                           why
=============================  =================================================================
layerwise process hook         vLLM's layer-wise reload processes a layer through the module
                               global ``layerwise._layerwise_process`` once all of its weights
                               arrived; we wrap it to learn which layers were processed (CPU
                               MoE repack, below) and, on CPU, to drop the layer's old packed
                               GEMM kernel (``cpu_linear``) first: vLLM replaces it anyway, but
                               only after packing the new weights, so the layer briefly existed
                               three times (1.03B model: 293 -> 147 MiB peak in the worker).
reload bookkeeping             ``LayerReloadingInfo.load_numel`` / ``load_numel_total`` /
                               ``loaded_weights`` (read to find layers that received only part
                               of their weights; reset so vLLM puts their old weights back; the
                               buffered loader calls show which streamed tensors a loader took).
vocab padding                  ``VocabParallelEmbedding.shard_indices`` / ``embedding_dim``: an
                               embedding's rows are padded, so a complete update loads fewer
                               elements than the layer holds.
CPU MoE repack                 vLLM's unquantized MoE method runs its experts kernel's
                               ``process_weights_after_loading`` only the first time; the CPU
                               kernel (``CPUUnquantizedExperts``) prepacks the expert weights
                               there, so after an update it would read the new, unpacked
                               weights as packed (0.04-0.6 nats off, no error): we rerun it.
expected warnings              vLLM logs, on every engine start and weight update, warnings
                               that say nothing wrong about how megarlhf uses it (a tokenizer it
                               was told not to load; the rotary embedding "failed to load"
                               weights it does not have): filtered by their text.
=============================  =================================================================
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch

PINNED_VLLM_VERSION = "0.32.0"


class VLLMCompatError(RuntimeError):
    """vLLM's internals are not what megarlhf was written against."""


def _fail(item: str, what: str) -> VLLMCompatError:
    import vllm

    return VLLMCompatError(
        f"megarlhf's vLLM compatibility item '{item}' was written for vLLM {PINNED_VLLM_VERSION}; "
        f"the installed vLLM {getattr(vllm, '__version__', '?')} differs: {what}. Install vLLM "
        f"{PINNED_VLLM_VERSION} (tools/install_cpu.sh, the gpu extra or the Dockerfile)")


def _names_used(fn) -> set[str]:
    return set(fn.__code__.co_names)


def _check() -> dict[str, Any]:
    """Checks every item; returns the objects the patches use."""
    from vllm.model_executor.layers.fused_moe.experts import cpu_moe
    from vllm.model_executor.layers.fused_moe import unquantized_fused_moe_method as moe_method
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        VocabParallelEmbedding,
        VocabParallelEmbeddingShardIndices,
    )
    from vllm.model_executor.model_loader.reload import layerwise
    from vllm.model_executor.model_loader.reload.types import LayerReloadingInfo
    from vllm.renderers import base as renderers_base

    # layerwise process hook: called by name from the loader wrapper and the finalizer.
    process = getattr(layerwise, "_layerwise_process", None)
    if not callable(process) or list(inspect.signature(process).parameters) != ["layer", "info"]:
        raise _fail("layerwise process hook", "layerwise._layerwise_process(layer, info) is gone")
    for caller in ("make_online_process_loader", "finalize_layerwise_processing"):
        fn = getattr(layerwise, caller, None)
        inner = [c for c in (fn.__code__.co_consts if fn else ()) if inspect.iscode(c)]
        used = (_names_used(fn) if fn else set()).union(*(set(c.co_names) for c in inner))
        if "_layerwise_process" not in used:
            raise _fail("layerwise process hook",
                        f"layerwise.{caller} no longer calls _layerwise_process by name")
    if not callable(getattr(layerwise, "get_layerwise_info", None)):
        raise _fail("reload bookkeeping", "layerwise.get_layerwise_info is gone")
    fields = getattr(LayerReloadingInfo, "__dataclass_fields__", {})
    for f in ("load_numel", "load_numel_total", "loaded_weights"):
        if f not in fields:
            raise _fail("reload bookkeeping", f"LayerReloadingInfo has no field {f!r}")
    # vocab padding
    for attr in ("num_org_elements", "num_added_elements"):
        if not isinstance(getattr(VocabParallelEmbeddingShardIndices, attr, None), property):
            raise _fail("vocab padding", f"VocabParallelEmbeddingShardIndices.{attr} is gone")
    init_src = inspect.getsource(VocabParallelEmbedding.__init__)
    if "self.shard_indices" not in init_src or "self.embedding_dim" not in init_src:
        raise _fail("vocab padding", "VocabParallelEmbedding no longer sets shard_indices / "
                    "embedding_dim")
    # CPU MoE repack: the skip we work around, and the kernel class whose method we rerun.
    setup = getattr(moe_method.UnquantizedFusedMoEMethod, "_setup_kernel", None)
    if setup is None or "is_weight_update" not in inspect.getsource(setup):
        raise _fail("CPU MoE repack", "UnquantizedFusedMoEMethod._setup_kernel no longer skips "
                    "the experts' process_weights_after_loading on weight updates")
    experts_cls = getattr(cpu_moe, "CPUUnquantizedExperts", None)
    if experts_cls is None or not callable(getattr(experts_cls, "process_weights_after_loading",
                                                   None)):
        raise _fail("CPU MoE repack", "cpu_moe.CPUUnquantizedExperts."
                    "process_weights_after_loading is gone")
    # expected warnings: the messages must still be what the filter drops.
    renderer_src = inspect.getsource(renderers_base)
    for msg in _RENDERER_MESSAGES:
        if msg not in renderer_src:
            raise _fail("expected warnings", f"vllm.renderers.base no longer logs {msg!r}")
    if _LAYERWISE_MESSAGE not in inspect.getsource(layerwise):
        raise _fail("expected warnings", f"layerwise no longer logs {_LAYERWISE_MESSAGE!r}")
    return dict(layerwise=layerwise, experts_cls=experts_cls,
                moe_method_cls=moe_method.UnquantizedFusedMoEMethod,
                shard_indices_cls=VocabParallelEmbeddingShardIndices)


_RENDERER_MESSAGES = ("Chat template warmup failed", "because tokenizer is not initialized")
_LAYERWISE_MESSAGE = "%s: Failed to load weights"
_CHECKED: dict[str, Any] = {}


def checked() -> dict[str, Any]:
    """Runs the checks once per process (see the module docstring)."""
    if not _CHECKED:
        _CHECKED.update(_check())
    return _CHECKED


# ------------------------------------------------------------------------- layerwise hook
class ProcessedLayers:
    """Records the layers vLLM's layer-wise reload processed while installed (and on CPU drops a
    layer's old packed GEMM kernel just before it is reprocessed); :meth:`stop` uninstalls.
    ``on_process(layer, info)`` runs first (the layer's buffered loader calls are in
    ``info.loaded_weights``)."""

    def __init__(self, drop_packed_kernels: bool, on_process=None):
        layerwise = checked()["layerwise"]
        self._module = layerwise
        self._original = layerwise._layerwise_process
        self.layers: set[int] = set()

        def process(layer, info, _original=self._original, _seen=self.layers,
                    _drop=drop_packed_kernels, _on=on_process):
            _seen.add(id(layer))
            if _on is not None:
                _on(layer, info)
            if _drop:
                # Processing sets a new one; a layer whose processing fails is broken either
                # way (vLLM has already replaced its tensors) and the update raises.
                layer.__dict__.pop("cpu_linear", None)
            return _original(layer, info)

        layerwise._layerwise_process = process

    def stop(self) -> set[int]:
        self._module._layerwise_process = self._original
        return self.layers


def record_processed_layers(on_process=None) -> ProcessedLayers:
    from vllm.platforms import current_platform

    return ProcessedLayers(drop_packed_kernels=current_platform.is_cpu(), on_process=on_process)


def buffers_loads(param: torch.Tensor) -> bool:
    """Whether ``param``'s weight loader is the layer-wise reload's buffering wrapper (its
    loads are replayed when the layer completes) rather than a loader that copies at once."""
    return getattr(getattr(param, "weight_loader", None), "__name__", "") == \
        "online_process_loader"


def buffered_tensors(info) -> list[torch.Tensor]:
    """The tensors a layer's buffered loader calls hold (``info.loaded_weights``: the
    arguments vLLM's weight loaders were called with, replayed when the layer completes)."""
    out = []
    for _name, bound in info.loaded_weights:
        for value in bound.arguments.values():
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
                out.append(value)
    return out


def pending_layer_infos(model: torch.nn.Module) -> list:
    """Every layer's reload bookkeeping that still buffers loader calls."""
    layerwise = checked()["layerwise"]
    out = []
    for layer in model.modules():
        info = layerwise.get_layerwise_info(layer)
        if info.loaded_weights:
            out.append(info)
    return out


# ------------------------------------------------------------------------ reload bookkeeping
def incomplete_layers(model: torch.nn.Module) -> list[str]:
    """Layers that received only part of their weights in this update, reset so that vLLM's
    finalize puts their previous weights back (it would otherwise process them with the
    unloaded part uninitialised: garbage or NaN, measured; no error)."""
    layerwise = checked()["layerwise"]
    out = []
    for name, layer in model.named_modules():
        info = layerwise.get_layerwise_info(layer)
        total = loadable_numel(layer, info.load_numel_total)
        if total is not None and 0 < info.load_numel < total:
            out.append(f"{name} ({info.load_numel} of {total} elements)")
            info.load_numel = 0
            info.loaded_weights = []
    return out


def loadable_numel(layer: torch.nn.Module, total: int | None) -> int | None:
    """Elements a complete update loads into ``layer``: vLLM's layer size, except for vocab
    embeddings, whose rows are padded (to a multiple of 64) beyond the real vocabulary."""
    idx = getattr(layer, "shard_indices", None)
    if total is None or idx is None:
        return total
    if not isinstance(idx, checked()["shard_indices_cls"]):
        raise _fail("vocab padding", f"{type(layer).__name__}.shard_indices is a "
                    f"{type(idx).__name__}")
    return min(total, (idx.num_org_elements + idx.num_added_elements) * layer.embedding_dim)


# --------------------------------------------------------------------------- CPU MoE repack
def prepack_reloaded_cpu_experts(model: torch.nn.Module, processed: set[int]) -> int:
    """Reruns the CPU experts kernel's prepacking for the MoE layers this update reprocessed
    (vLLM's CPU platform only); returns how many. A reprocessed unquantized MoE layer whose
    kernel is not vLLM's CPU experts kernel is an error (its weights would be read unpacked)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return 0
    c = checked()
    n = 0
    for module in model.modules():
        if id(module) not in processed:
            continue
        method = getattr(module, "quant_method", None)
        if not isinstance(method, c["moe_method_cls"]):
            continue
        experts = getattr(getattr(method, "moe_kernel", None), "fused_experts", None)
        if not isinstance(experts, c["experts_cls"]):
            raise _fail("CPU MoE repack", f"an unquantized MoE layer runs "
                        f"{type(experts).__name__}, not CPUUnquantizedExperts")
        experts.process_weights_after_loading(module)
        n += 1
    return n


# --------------------------------------------------------------------- factory registration
def register_weight_transfer_engine(name: str, engine_cls: type) -> None:
    """Registers a worker-side weight-transfer engine with vLLM's factory, once per process
    (``register_engine`` refuses a second registration; whether one happened is read from the
    factory's registry, checked here to be the dict vLLM 0.32 keeps)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    registry = getattr(WeightTransferEngineFactory, "_registry", None)
    if not isinstance(registry, dict):
        raise _fail("factory registration", "WeightTransferEngineFactory._registry is gone")
    if name not in registry:
        WeightTransferEngineFactory.register_engine(name, engine_cls)
    elif registry[name]() is not engine_cls:
        raise VLLMCompatError(f"vLLM weight-transfer backend {name!r} is registered already, "
                              f"to {registry[name]()!r}")


# ------------------------------------------------------------------------ expected warnings
class ExpectedWarningsFilter(logging.Filter):
    """Drops the vLLM warnings listed in the module docstring (by their text)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if msg == _LAYERWISE_MESSAGE:
            return record.args != ("RotaryEmbedding",)
        return not any(m in msg for m in _RENDERER_MESSAGES)


def quiet_expected_warnings() -> None:
    checked()
    for name in ("vllm.renderers.base", "vllm.model_executor.model_loader.reload.layerwise"):
        lg = logging.getLogger(name)
        if not any(isinstance(f, ExpectedWarningsFilter) for f in lg.filters):
            lg.addFilter(ExpectedWarningsFilter())
