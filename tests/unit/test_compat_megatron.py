"""megarlhf.compat.megatron and the torch-on-CPU redirection: every patch of a library's
internals is checked against the installed version (one line naming the item and the version it
was written for) and reached by the library's own code under the name that is replaced. (Their
effect is tested end to end: MoE aux-loss scaling and routing replay in tests/dist/test_moe.py,
the CPU path everywhere.)
"""

import importlib

import pytest

from megarlhf.compat import megatron as compat

pytestmark = pytest.mark.unit


def test_cpu_items_pass_on_the_pinned_megatron():
    """Broken: the installed megatron-core is not what the CPU redirection was written for."""
    import megatron.core

    assert megatron.core.__version__ == compat.WRITTEN_FOR
    compat.check_cpu_items()


@pytest.mark.parametrize("module, name, item", [
    ("megatron.core.tensor_parallel.random", "_get_cuda_rng_state", "CPU: RNG helpers"),
    ("megatron.core.tensor_parallel.mappings", "_gather_along_first_dim",
     "CPU: uneven gather/reduce-scatter"),
    ("megatron.core.transformer.moe.token_dispatcher", "maybe_move_tensor_to_cpu",
     "CPU: MoE helpers"),
])
def test_a_moved_symbol_fails_in_one_line(monkeypatch, module, name, item):
    """Broken: a megatron release that renames what megarlhf replaces would leave megatron's
    CUDA-only code in place (a crash deep in a run) or skip the fix silently."""
    monkeypatch.delattr(importlib.import_module(module), name)
    with pytest.raises(compat.MegatronCompatError) as e:
        compat.check_cpu_items()
    msg = str(e.value)
    assert "\n" not in msg and f"'{item}'" in msg and compat.WRITTEN_FOR in msg


def test_a_caller_that_stops_using_the_name_fails(monkeypatch):
    """Broken: megatron calling its own reference (not the module global) would bypass the
    replacement silently."""
    monkeypatch.setattr(compat, "callers", lambda module, name: [])
    with pytest.raises(compat.MegatronCompatError, match="no longer calls"):
        compat.check_cpu_items()


def test_megatron_reaches_the_replaced_names():
    """Broken: the callers megarlhf's replacements rely on no longer read the module global."""
    from megatron.core.tensor_parallel import mappings
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer.moe import router

    assert "_GatherFromSequenceParallelRegion.forward" in compat.callers(
        mappings, "_gather_along_first_dim")
    assert "CudaRNGStatesTracker.add" in compat.callers(mrandom, "_set_cuda_rng_state")
    assert "TopKRouter._apply_aux_loss" in compat.callers(
        router, "get_tokens_per_expert_and_token_count")


def test_token_count_fix_is_installed_once_and_checked(monkeypatch):
    """Broken: the MoE aux-loss token-count fix is not in place (the aux loss TP x CP too
    large with padding), or is installed on a megatron whose function has another shape."""
    from megatron.core.transformer.moe import moe_utils, router

    compat.fix_token_count()
    fixed = router.get_tokens_per_expert_and_token_count
    assert fixed._megarlhf_fixed and moe_utils.get_tokens_per_expert_and_token_count is fixed
    compat.fix_token_count()
    assert router.get_tokens_per_expert_and_token_count is fixed
    monkeypatch.setattr(router, "get_tokens_per_expert_and_token_count",
                        lambda routing_map, group: None)
    with pytest.raises(compat.MegatronCompatError, match="'token count'"):
        compat.fix_token_count()


def test_router_replay_leaves_megatrons_global_list():
    """Broken: megatron's own replay instance stays in its global list next to megarlhf's."""
    from megatron.core.transformer.moe.router_replay import RouterReplay

    class Router:
        router_replay = object()

    r = Router()
    RouterReplay.global_router_replay_instances.append(r.router_replay)
    mine = object()
    compat.replace_router_replay(r, mine)
    assert r.router_replay is mine
    assert all(x is not Router.router_replay for x in RouterReplay.global_router_replay_instances)


def test_torch_cpu_items_are_checked(monkeypatch):
    """Broken: a torch release without the autograd internals the CPU redirection starts
    backward passes with would fail deep in a training step instead of at start."""
    import torch

    from megarlhf.platform import cpu_compat

    cpu_compat.check_torch_items()
    monkeypatch.delattr(torch.autograd.graph, "_engine_run_backward")
    with pytest.raises(cpu_compat.TorchCompatError, match="_engine_run_backward"):
        cpu_compat.check_torch_items()


def test_auto_layers_without_transformer_engine_on_a_gpu_warn(monkeypatch, caplog):
    """Broken: under transformer_impl auto a GPU machine whose Transformer Engine is missing or
    broken builds megatron's local layers silently (more activation memory than planned, no
    FP8); on CPU the local layers are expected and say nothing."""
    import logging

    import torch

    from megarlhf.config.schema import ModelConfig
    from megarlhf.models import builder

    cfg = ModelConfig(arch={"model_type": "llama"})
    monkeypatch.setattr(builder, "_warned", [])
    with caplog.at_level(logging.WARNING, logger="megarlhf.models.builder"):
        assert builder.use_transformer_engine(cfg) is False  # this box: no CUDA, no TE
        assert caplog.records == []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(builder, "te_status",
                            lambda: (False, "is installed but does not import (OSError: x)"))
        assert builder.use_transformer_engine(cfg) is False
    (rec,) = caplog.records
    assert "does not import" in rec.getMessage() and "local layers" in rec.getMessage()
