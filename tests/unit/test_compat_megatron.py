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


def test_expert_bias_padding_fix_masks_rows_and_is_checked(monkeypatch):
    """Broken: megatron 0.16.1's expert-bias load count (sigmoid families) fails on padded
    micro-batches, or counts padding, or the fix is installed on a megatron whose method has
    another shape, or over a megatron that fixed it."""
    import torch
    from megatron.core.transformer.moe.router import TopKRouter

    original = TopKRouter.__dict__["_apply_expert_bias"]
    try:
        compat.fix_expert_bias_padding()
        fixed = TopKRouter.__dict__["_apply_expert_bias"]
        assert fixed._megarlhf_fixed
        compat.fix_expert_bias_padding()  # idempotent
        assert TopKRouter.__dict__["_apply_expert_bias"] is fixed

        class R:
            enable_expert_bias = True
            local_tokens_per_expert = torch.zeros(3)

        r = R()
        routing = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 1, 0]], dtype=torch.bool)
        pad = torch.tensor([False, True, False])  # (tokens,): the second token is padding
        with torch.enable_grad():
            fixed(r, routing, pad)
        assert r.local_tokens_per_expert.tolist() == [2.0, 1.0, 1.0]
    finally:
        monkeypatch.setattr(TopKRouter, "_apply_expert_bias", original)
    monkeypatch.setattr(TopKRouter, "routing", lambda self, logits, padding_mask=None: None)
    with pytest.raises(compat.MegatronCompatError, match="'expert bias padding'"):
        compat.fix_expert_bias_padding()


def test_mla_without_te_item_is_checked(monkeypatch):
    """Broken: building multi-latent attention without Transformer Engine raises a TypeError
    in megatron (its mocked TE classes), or the item no longer finds what it sets."""
    from megatron.core.transformer import multi_latent_attention as mla

    monkeypatch.setattr(mla, "HAVE_TE", True)
    compat.fix_mla_without_te()
    assert mla.HAVE_TE is False
    monkeypatch.delattr(mla, "HAVE_TE")
    with pytest.raises(compat.MegatronCompatError, match="'MLA without TE'"):
        compat.fix_mla_without_te()
