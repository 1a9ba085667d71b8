"""Every patch megarlhf makes to megatron-core's internals, checked against the installed version.

megarlhf follows megatron-core ``WRITTEN_FOR`` (the version both machines install). Each item is
checked the first time it is used: what it replaces must exist with the signature it expects,
and megatron's own code must reach it by the name that is replaced (a module global read at
call time), else :class:`MegatronCompatError` names the item and the version it was written
for. ``tests/unit/test_compat_megatron.py`` checks each item against the installed megatron.

=================================  =============================================================
item                               why
=================================  =============================================================
token count (MoE, also on GPU)     ``get_tokens_per_expert_and_token_count`` (used by every router
                                   aux loss through ``router``'s global name) all-reduces its
                                   input in place and then reads the local token count from the
                                   now global tensor: with a padding mask under TP/CP > 1 the
                                   aux loss's scale is TP x CP too large (TP2 + SP moved the
                                   post-step log-probs 0.04 from the single-process run). The
                                   replacement reduces a copy.
expert bias padding (MoE)          ``TopKRouter._apply_expert_bias`` (sigmoid routing with
                                   expert bias: glm4_moe, deepseek_v3) masks padding with
                                   ``routing_map & ~padding_mask``: a ``(tokens, experts)`` map
                                   against a ``(tokens,)`` mask, which fails (or, with as many
                                   tokens as experts, masks the wrong axis). The replacement
                                   masks rows. Installed only where the source still has the
                                   line; a fixed megatron keeps its own.
MLA without TE (also on GPU)       ``multi_latent_attention.HAVE_TE`` is True whenever megatron's
                                   TE extension module imports - which it does without Transformer
                                   Engine (its classes become mocks) - and ``MultiLatentAttention``
                                   then calls ``isinstance(x, <mock>)``: TypeError at build. Set to
                                   False where ``transformer_engine`` is not importable.
router replay (MoE)                megarlhf's routing replay replaces a router's
                                   ``router_replay`` and takes megatron's instance out of the
                                   class-level ``RouterReplay.global_router_replay_instances``
                                   (megatron's own replay would act on it otherwise).
CPU: RNG helpers                   ``tensor_parallel.random._get_cuda_rng_state`` /
                                   ``_set_cuda_rng_state`` (the TP RNG tracker's access to the
                                   device generator) save and restore the CPU generator.
CPU: uneven gather/reduce-scatter  gloo has no all_gather of unequal blocks, which megatron's
                                   alltoall MoE dispatcher does over expert-TP ranks:
                                   ``mappings._gather_along_first_dim`` /
                                   ``_reduce_scatter_along_first_dim`` pad and cut.
CPU: MoE helpers                   ``moe_utils.te_general_gemm`` (defined only with Transformer
                                   Engine; the router tests it against None) is None;
                                   ``maybe_move_tensor_to_cpu`` converts CPU tensors too (it
                                   converted only CUDA ones, so the alltoall dispatcher's split
                                   sizes stayed tensors).
=================================  =============================================================
"""

from __future__ import annotations

import inspect

import torch

WRITTEN_FOR = "0.16.1"


class MegatronCompatError(RuntimeError):
    """megatron-core's internals are not what megarlhf was written against."""


def _fail(item: str, what: str) -> MegatronCompatError:
    import megatron.core

    return MegatronCompatError(
        f"megarlhf's megatron-core compatibility item '{item}' was written for megatron-core "
        f"{WRITTEN_FOR}; the installed {getattr(megatron.core, '__version__', '?')} differs: "
        f"{what}. Install megatron-core=={WRITTEN_FOR} (tools/install_cpu.sh, the Dockerfile)")


def callers(module, name: str) -> list[str]:
    """Functions and methods of ``module`` whose code reads the global ``name``."""
    out = []
    for n, obj in vars(module).items():
        if inspect.isfunction(obj) and obj.__module__ == module.__name__ \
                and name in obj.__code__.co_names:
            out.append(n)
        elif inspect.isclass(obj) and obj.__module__ == module.__name__:
            for mn, m in vars(obj).items():
                f = m.__func__ if isinstance(m, (staticmethod, classmethod)) else m
                f = getattr(f, "__wrapped__", f)
                if inspect.isfunction(f) and name in f.__code__.co_names:
                    out.append(f"{n}.{mn}")
    return out


def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def _expect(item: str, module, name: str, params: list[str], used_by: str) -> None:
    fn = getattr(module, name, None)
    if not callable(fn):
        raise _fail(item, f"{module.__name__}.{name} is gone")
    if _params(getattr(fn, "_megarlhf_original", fn))[: len(params)] != params:
        raise _fail(item, f"{module.__name__}.{name} takes {_params(fn)}, not {params}")
    if used_by not in callers(module, name):
        raise _fail(item, f"{module.__name__}.{used_by} no longer calls {name} by its "
                          "module name")


# ---------------------------------------------------------------------------- token count
def fix_token_count() -> None:
    """Installs the token-count fix (idempotent; see the module docstring)."""
    from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region
    from megatron.core.transformer.moe import moe_utils, router

    if getattr(router.get_tokens_per_expert_and_token_count, "_megarlhf_fixed", False):
        return
    _expect("token count", router, "get_tokens_per_expert_and_token_count",
            ["routing_map", "reduce_group", "topk", "with_padding_mask"],
            "TopKRouter._apply_aux_loss")
    original = router.get_tokens_per_expert_and_token_count

    def get_tokens_per_expert_and_token_count(routing_map, reduce_group, topk=None,
                                              with_padding_mask=False):
        local_tokens_per_expert = routing_map.sum(dim=0)
        global_tokens_per_expert = reduce_from_tensor_model_parallel_region(
            local_tokens_per_expert.clone(), reduce_group)
        if with_padding_mask:
            local_num_tokens = local_tokens_per_expert.sum() / topk
            total_num_tokens = global_tokens_per_expert.sum() / topk
        else:
            local_num_tokens = routing_map.shape[0]
            total_num_tokens = local_num_tokens * reduce_group.size()
        return global_tokens_per_expert, local_num_tokens, total_num_tokens

    get_tokens_per_expert_and_token_count._megarlhf_fixed = True
    get_tokens_per_expert_and_token_count._megarlhf_original = original
    router.get_tokens_per_expert_and_token_count = get_tokens_per_expert_and_token_count
    moe_utils.get_tokens_per_expert_and_token_count = get_tokens_per_expert_and_token_count


# ---------------------------------------------------------------------- expert bias padding
_BIAS_BUG = "routing_map = routing_map & (~padding_mask)"


def fix_expert_bias_padding() -> None:
    """Installs the expert-bias padding fix where megatron still has the bug (idempotent)."""
    from megatron.core.transformer.moe.router import TopKRouter

    current = TopKRouter.__dict__.get("_apply_expert_bias")
    if getattr(current, "_megarlhf_fixed", False):
        return
    if current is None or "TopKRouter.routing" not in _method_callers(TopKRouter,
                                                                      "_apply_expert_bias"):
        raise _fail("expert bias padding", "TopKRouter.routing no longer calls "
                    "_apply_expert_bias")
    original = getattr(current, "__wrapped__", None) or getattr(current, "_torchdynamo_orig_callable",
                                                                 None) or current
    try:
        source = inspect.getsource(original)
    except (OSError, TypeError) as e:
        raise _fail("expert bias padding", f"the source of TopKRouter._apply_expert_bias cannot "
                    f"be read ({e})") from None
    if _BIAS_BUG not in source:
        return  # fixed upstream: megatron's own code masks correctly
    if _params(original) != ["self", "routing_map", "padding_mask"]:
        raise _fail("expert bias padding", f"TopKRouter._apply_expert_bias takes "
                    f"{_params(original)}")

    def _apply_expert_bias(self, routing_map, padding_mask=None):
        if self.enable_expert_bias and torch.is_grad_enabled():
            with torch.no_grad():
                if padding_mask is not None:
                    routing_map = routing_map & (~padding_mask.reshape(-1, 1))
                self.local_tokens_per_expert += routing_map.sum(dim=0)

    _apply_expert_bias._megarlhf_fixed = True
    _apply_expert_bias._megarlhf_original = current
    TopKRouter._apply_expert_bias = _apply_expert_bias


def _method_callers(cls, name: str) -> list[str]:
    out = []
    for mn, m in vars(cls).items():
        f = getattr(m, "__wrapped__", m)
        if inspect.isfunction(f) and name in f.__code__.co_names:
            out.append(f"{cls.__name__}.{mn}")
    return out


# -------------------------------------------------------------------------- MLA without TE
def fix_mla_without_te() -> None:
    """Clears ``multi_latent_attention.HAVE_TE`` where Transformer Engine is not importable."""
    import importlib.util

    from megatron.core.transformer import multi_latent_attention as mla

    if importlib.util.find_spec("transformer_engine") is not None:
        return
    if not hasattr(mla, "HAVE_TE"):
        raise _fail("MLA without TE", "multi_latent_attention.HAVE_TE is gone")
    if "MultiLatentAttention.__init__" not in callers(mla, "HAVE_TE"):
        raise _fail("MLA without TE", "MultiLatentAttention.__init__ no longer reads HAVE_TE")
    mla.HAVE_TE = False


# -------------------------------------------------------------------------- router replay
def replace_router_replay(router, replay) -> None:
    """``router``'s replay becomes ``replay``; megatron's own instance leaves the global list
    its class keeps (see the module docstring)."""
    from megatron.core.transformer.moe.router_replay import RouterReplay

    instances = getattr(RouterReplay, "global_router_replay_instances", None)
    if not isinstance(instances, list):
        raise _fail("router replay", "RouterReplay.global_router_replay_instances is not a list")
    if not hasattr(router, "router_replay"):
        raise _fail("router replay", f"{type(router).__name__} has no router_replay")
    old = router.router_replay
    if old in instances:
        instances.remove(old)
    router.router_replay = replay


# ------------------------------------------------------------------------------------- CPU
def _cpu_get_rng_state(device="cuda", *args, **kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device=-1, *args, **kwargs) -> None:
    torch.set_rng_state(new_state)


def _cpu_move_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
    """``moe_utils.maybe_move_tensor_to_cpu`` for tensors that already live on the CPU."""
    if as_numpy and torch.is_tensor(tensor):
        return tensor.detach().cpu().numpy()
    return tensor


def _gather_first_dim_uneven(orig):
    """``mappings._gather_along_first_dim`` with unequal blocks on gloo: pad each block to the
    largest, gather the padded blocks, cut the padding out; equal blocks take megatron's path."""

    def gather(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return orig(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(n) for n in output_split_sizes]
        m = max(sizes)
        padded = torch.zeros((m,) + tuple(input_.shape[1:]), dtype=input_.dtype)
        padded[: input_.shape[0]] = input_
        out = torch.empty((m * len(sizes),) + tuple(input_.shape[1:]), dtype=input_.dtype)
        torch.distributed.all_gather_into_tensor(out, padded, group=group)
        return torch.cat([out[i * m: i * m + n] for i, n in enumerate(sizes)], dim=0)

    gather._megarlhf_original = orig
    return gather


def _reduce_scatter_first_dim_uneven(orig):
    """``mappings._reduce_scatter_along_first_dim`` with unequal blocks on gloo (the backward of
    the gather above): all-reduce the whole tensor, keep this rank's block."""

    def reduce_scatter(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return orig(input_, group, input_split_sizes, use_global_buffer)
        sizes = [int(n) for n in input_split_sizes]
        total = input_.contiguous().clone()
        torch.distributed.all_reduce(total, group=group)
        start = sum(sizes[: group.rank()])
        return total[start: start + sizes[group.rank()]].contiguous()

    reduce_scatter._megarlhf_original = orig
    return reduce_scatter


def check_cpu_items() -> None:
    """The checks of the CPU items (see the module docstring); raises on the first mismatch."""
    from megatron.core.tensor_parallel import mappings
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    _expect("CPU: RNG helpers", mrandom, "_get_cuda_rng_state", ["device"],
            "CudaRNGStatesTracker.add")
    _expect("CPU: RNG helpers", mrandom, "_set_cuda_rng_state", ["new_state", "device"],
            "CudaRNGStatesTracker.add")
    _expect("CPU: uneven gather/reduce-scatter", mappings, "_gather_along_first_dim",
            ["input_", "group", "output_split_sizes", "use_global_buffer"],
            "_GatherFromSequenceParallelRegion.forward")
    _expect("CPU: uneven gather/reduce-scatter", mappings, "_reduce_scatter_along_first_dim",
            ["input_", "group", "input_split_sizes", "use_global_buffer"],
            "_ReduceScatterToSequenceParallelRegion.forward")
    _expect("CPU: MoE helpers", token_dispatcher, "maybe_move_tensor_to_cpu",
            ["tensor", "as_numpy", "record_stream"],
            "MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize")
    if "RouterGatingLinearFunction.forward" not in callers(moe_utils, "te_general_gemm"):
        raise _fail("CPU: MoE helpers", "moe_utils.RouterGatingLinearFunction no longer reads "
                    "te_general_gemm")


def install_cpu() -> None:
    """The CPU items (see the module docstring); called once per process by
    :func:`megarlhf.platform.cpu_compat.install`."""
    from megatron.core.tensor_parallel import mappings
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    check_cpu_items()
    mrandom._get_cuda_rng_state = _cpu_get_rng_state
    mrandom._set_cuda_rng_state = _cpu_set_rng_state
    mappings._gather_along_first_dim = _gather_first_dim_uneven(mappings._gather_along_first_dim)
    mappings._reduce_scatter_along_first_dim = _reduce_scatter_first_dim_uneven(
        mappings._reduce_scatter_along_first_dim)
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    moe_utils.maybe_move_tensor_to_cpu = _cpu_move_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = _cpu_move_to_cpu
