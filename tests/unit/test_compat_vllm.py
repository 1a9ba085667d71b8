"""megarlhf.compat.vllm: every use of vLLM's internals is checked against the installed vLLM,
fails in one line naming the item and the version it was written for, and vLLM really goes
through what is patched. (Their effect on a real engine is tested end to end in
test_rollout_vllm_real.py and the dist/ray vLLM syncs: a stale tied lm_head, a partial layer, a
skipped tensor, unpacked CPU MoE experts.)
"""

import importlib

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (tools/install_cpu.sh installs it)")

from megarlhf.compat import vllm as compat  # noqa: E402


@pytest.fixture
def fresh(monkeypatch):
    """Checks run again (they are cached per process)."""
    monkeypatch.setattr(compat, "_CHECKED", {})
    yield
    compat._CHECKED.clear()


def test_checks_pass_on_the_pinned_vllm(fresh):
    """Broken: the installed vLLM is not what megarlhf's patches were written for."""
    assert vllm.__version__ == compat.PINNED_VLLM_VERSION
    got = compat.checked()
    assert set(got) >= {"layerwise", "experts_cls", "moe_method_cls", "shard_indices_cls"}


@pytest.mark.parametrize("module, attr, item", [
    ("vllm.model_executor.model_loader.reload.layerwise", "_layerwise_process",
     "layerwise process hook"),
    ("vllm.model_executor.model_loader.reload.layerwise", "get_layerwise_info",
     "reload bookkeeping"),
    ("vllm.model_executor.layers.fused_moe.experts.cpu_moe", "CPUUnquantizedExperts",
     "CPU MoE repack"),
])
def test_a_moved_symbol_fails_in_one_line(fresh, monkeypatch, module, attr, item):
    """Broken: a vLLM release that renames what megarlhf patches would fail silently (wrong
    log-probs, no error) instead of at import with the item and the version."""
    monkeypatch.delattr(importlib.import_module(module), attr)
    with pytest.raises(compat.VLLMCompatError) as e:
        compat.checked()
    msg = str(e.value)
    assert "\n" not in msg and f"'{item}'" in msg and compat.PINNED_VLLM_VERSION in msg


def test_a_changed_warning_text_fails(fresh, monkeypatch):
    """Broken: a reworded vLLM warning would no longer be filtered, silently."""
    monkeypatch.setattr(compat, "_RENDERER_MESSAGES", ("a message vLLM never logs",))
    with pytest.raises(compat.VLLMCompatError, match="expected warnings"):
        compat.checked()


def test_layerwise_hook_records_and_drops_the_old_packed_kernel(monkeypatch):
    """Broken: the hook would not see the layers an update processes (CPU MoE experts left
    unpacked), keep the old packed GEMM kernel alive while the layer is repacked (3 copies of
    the layer at once), or stay installed after the update."""
    from vllm.model_executor.model_loader.reload import layerwise

    seen = []
    monkeypatch.setattr(layerwise, "_layerwise_process",
                        lambda layer, info: seen.append(("cpu_linear" in layer.__dict__, info)))
    recorder = layerwise._layerwise_process
    rec = compat.ProcessedLayers(drop_packed_kernels=True)
    layer = torch.nn.Linear(2, 2)
    layer.cpu_linear = object()
    layerwise._layerwise_process(layer, "info")  # how vLLM reaches it (by the module's name)
    assert seen == [(False, "info")]  # dropped before vLLM reprocesses the layer
    assert rec.stop() == {id(layer)}
    assert layerwise._layerwise_process is recorder  # uninstalled


def test_loadable_numel_of_a_padded_vocab_embedding():
    """Broken: a complete update of a padded embedding would count as partial (and be put back
    to its old weights), or a partial one as complete."""
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        VocabParallelEmbeddingShardIndices,
    )

    layer = torch.nn.Module()
    layer.shard_indices = VocabParallelEmbeddingShardIndices(0, 256, 256, 256, 0, 250, 250, 250)
    layer.embedding_dim = 8
    assert compat.loadable_numel(layer, 256 * 8) == 250 * 8
    plain = torch.nn.Linear(3, 3)
    assert compat.loadable_numel(plain, 12) == 12


def test_factory_registration_is_once_and_checked():
    """Broken: megarlhf's backend is missing from vLLM's factory in a worker, or a second
    registration under its name with another class goes unnoticed."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    from megarlhf.rollout.vllm_transfer import MegarlhfWeightTransferEngine

    compat.register_weight_transfer_engine("megarlhf", MegarlhfWeightTransferEngine)  # again
    assert WeightTransferEngineFactory._registry["megarlhf"]() is MegarlhfWeightTransferEngine
    with pytest.raises(compat.VLLMCompatError, match="registered already"):
        compat.register_weight_transfer_engine("megarlhf", object)
