"""Builders for the models every role runs, all on megatron-core's GPTModel.

* ``head="lm"``: a causal LM (actor, reference): logits over the (TP-sharded, padded) vocabulary.
* ``head="scalar"``: the same backbone with the LM head replaced by a scalar head (critic: a
  value per token; reward model: the score read at the last response token; PRM: read at each
  step-delimiter token). The head is a plain linear layer replicated on every TP rank, applied
  to the final hidden states (gathered from the sequence-parallel region when SP is on).

A model is a list of chunks: one per virtual pipeline stage (a single chunk without VPP). The
layer spec is Transformer Engine's when TE is importable (and ``transformer_impl`` allows it),
megatron's local spec otherwise (always on CPU).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from megarlhf.config.schema import ModelConfig
from megarlhf.models.arch import load_hf_config
from megarlhf.models.families import ArchSpec, arch_spec, hf_inv_freq
from megarlhf.parallel.layout import ParallelContext

logger = logging.getLogger(__name__)

Head = Literal["lm", "scalar"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class ModelBuildError(ValueError):
    """The model cannot be built as configured; the message says what to change."""


def te_status() -> tuple[bool, str]:
    """Whether Transformer Engine is usable here, and if not why (one phrase)."""
    import importlib.util

    if importlib.util.find_spec("transformer_engine") is None:
        return False, "is not installed"
    try:
        import transformer_engine  # noqa: F401
    except Exception as e:  # noqa: BLE001 - reported: a broken install (e.g. another torch)
        return False, f"is installed but does not import ({type(e).__name__}: {e})"
    if not torch.cuda.is_available():
        return False, "needs a CUDA device and there is none"
    return True, ""


def te_available() -> bool:
    return te_status()[0]


def use_transformer_engine(model_cfg: ModelConfig) -> bool:
    """Whether the model is built with Transformer Engine's layer spec.

    ``transformer_impl: auto`` takes TE where it is usable. On a CUDA machine where it is not,
    the model is built with megatron's local layers and a warning says what that costs (no
    fused attention, no FP8: more activation memory than ``megarlhf plan`` assumed for auto);
    on CPU the local layers are the only ones, silently.
    """
    if model_cfg.transformer_impl == "local":
        return False
    usable, why = te_status()
    if model_cfg.transformer_impl == "transformer_engine":
        if not usable:
            raise ModelBuildError(
                f"model.transformer_impl=transformer_engine but Transformer Engine {why}; "
                "install it (the Dockerfile's NGC base has it) or set "
                "model.transformer_impl=auto")
        return True
    if not usable and torch.cuda.is_available() and not _warned:
        _warned.append(True)
        logger.warning(
            "model.transformer_impl=auto: Transformer Engine %s, so megatron's local layers are "
            "built: no fused attention (every layer stores its attention scores: more "
            "activation memory than `megarlhf plan` estimated for auto), no FP8. Install TE "
            "(the Dockerfile) or set model.transformer_impl=local to plan for these layers", why)
    return usable


_warned: list[bool] = []


def check_fp8(model_cfg: ModelConfig) -> None:
    """Refuses FP8 where Transformer Engine or an FP8-capable GPU (sm_89+) is missing."""
    if model_cfg.fp8 is None:
        return
    if not te_available():
        raise ModelBuildError(
            f"model.fp8={model_cfg.fp8} needs Transformer Engine and a CUDA GPU; neither is "
            "usable here. Set model.fp8=null (or run on an H100 with TE installed)"
        )
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        raise ModelBuildError(
            f"model.fp8={model_cfg.fp8} needs an FP8-capable GPU (compute capability >= 8.9, e.g. "
            f"H100); this GPU is sm_{major}{minor}. Set model.fp8=null"
        )
    if model_cfg.transformer_impl == "local":
        raise ModelBuildError("model.fp8 needs model.transformer_impl=auto or transformer_engine")


def transformer_config(spec: ArchSpec, model_cfg: ModelConfig, ctx: ParallelContext,
                       *, te: bool, init_weights: bool, cpu: bool):
    """The megatron TransformerConfig for ``spec`` on ``ctx``'s layout."""
    from megatron.core.transformer.transformer_config import (
        MLATransformerConfig,
        TransformerConfig,
    )

    lay = ctx.layout
    dtype = torch.float32 if cpu else _DTYPES[model_cfg.dtype]
    kw: dict[str, Any] = dict(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        ffn_hidden_size=spec.ffn_hidden_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_query_groups,
        kv_channels=spec.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=spec.norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=spec.qkv_bias,
        qk_layernorm=spec.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=spec.init_std,
        tensor_model_parallel_size=lay.tp,
        pipeline_model_parallel_size=lay.pp,
        virtual_pipeline_model_parallel_size=lay.vpp if lay.vpp > 1 else None,
        context_parallel_size=lay.cp,
        sequence_parallel=lay.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=cpu,
        perform_initialization=init_weights,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        attention_softmax_in_fp32=True,
        # Losses are normalized by a global token/sequence count computed by the driver, so
        # megatron must not rescale them per micro-batch nor average grads over DP (see engine).
        calculate_per_token_loss=True,
        # Micro-batches of one step may differ in length (packing, dynamic batching); the
        # interleaved schedule does not support it, so the engine pads to one shape there.
        variable_seq_lengths=lay.pp > 1 and lay.vpp == 1,
        # Batched p2p issues "send to prev" and "send to next" in one batch; with pp=2 both go to
        # the same peer and are matched by issue order, which swaps activations and gradients in
        # the interleaved schedule. Unbatched p2p puts the two directions on different
        # communicators (megatron's even/odd scheme).
        batch_p2p_comm=lay.vpp == 1,
        # megatron refuses variable lengths with its default (allgather) MoE dispatcher.
        moe_token_dispatcher_type="alltoall",
    )
    if spec.moe is not None:
        kw.update(moe_kwargs(spec, model_cfg, lay, te=te))
    if spec.mla is not None:
        ml = spec.mla
        kw.update(
            multi_latent_attention=True, q_lora_rank=ml.q_lora_rank,
            kv_lora_rank=ml.kv_lora_rank, qk_head_dim=ml.qk_nope_head_dim,
            qk_pos_emb_head_dim=ml.qk_rope_head_dim, v_head_dim=ml.v_head_dim,
            # The local core attention views its output as kv_channels * heads.
            kv_channels=ml.v_head_dim,
            # The latent norms come from the layer spec; with the config flag megatron would sum
            # q_layernorm's gradient over TP by name, but MLA's is complete on every rank already.
            qk_layernorm=False,
            **dict(ml.rope))
    if model_cfg.recompute == "full":
        kw.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif model_cfg.recompute == "selective":
        kw.update(recompute_granularity="selective")
    if model_cfg.fp8 is not None:
        check_fp8(model_cfg)
        kw.update(fp8=model_cfg.fp8, fp8_recipe="delayed")
    return (MLATransformerConfig if spec.mla is not None else TransformerConfig)(**kw)


def moe_kwargs(spec: ArchSpec, model_cfg: ModelConfig, lay, *, te: bool) -> dict[str, Any]:
    """TransformerConfig fields of an MoE family (see :mod:`megarlhf.models.families`).

    Routing as transformers computes it: a softmax over the router's fp32 logits and the top-k.
    With renormalised top-k (``norm_topk_prob``; always for Mixtral) that is megatron's default
    order - top-k of the logits, then a softmax over the k - which equals "softmax, top-k,
    divide by the sum"; without it, softmax over all experts first (``moe_router_pre_softmax``)
    and the k probabilities as they are.
    """
    mo = spec.moe
    coeff = mo.aux_loss_coeff if model_cfg.moe_aux_loss_coeff is None \
        else model_cfg.moe_aux_loss_coeff
    if model_cfg.moe_token_dispatcher == "allgather" and lay.pp > 1:
        raise ModelBuildError(
            "model.moe_token_dispatcher=allgather does not support the variable micro-batch "
            "lengths of pipeline parallelism; use alltoall (it runs on CPU too)")
    kw: dict[str, Any] = {}
    if mo.score_function == "sigmoid":
        # DeepSeek-V3 routing (see families): sigmoid scores, top-k on score + expert bias, the
        # chosen scores renormalised (megatron always does for sigmoid, k > 1), times the
        # routed scaling factor. The bias moves by ``rate * sign(mean load - load)`` after every
        # optimizer step (finalize_model_grads); rate 0 keeps it as loaded.
        kw.update(moe_router_score_function="sigmoid", moe_router_pre_softmax=False,
                  moe_router_enable_expert_bias=mo.expert_bias,
                  moe_router_bias_update_rate=float(model_cfg.moe_expert_bias_update_rate),
                  moe_router_topk_scaling_factor=mo.routed_scaling
                  if mo.routed_scaling != 1.0 else None)
        if mo.num_groups > 1:
            kw.update(moe_router_num_groups=mo.num_groups, moe_router_group_topk=mo.group_topk)
    else:
        kw.update(moe_router_score_function="softmax",
                  moe_router_pre_softmax=not mo.norm_topk_prob)
    if mo.shared_ffn_hidden_size:
        kw.update(moe_shared_expert_intermediate_size=mo.shared_ffn_hidden_size)
    if mo.first_dense_layers:
        kw.update(moe_layer_freq=[0 if i < mo.first_dense_layers else 1
                                  for i in range(spec.num_layers)])
    return dict(
        **kw,
        num_moe_experts=mo.num_experts,
        moe_ffn_hidden_size=mo.ffn_hidden_size,
        moe_router_topk=mo.topk,
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="aux_loss" if coeff > 0 else "none",
        moe_aux_loss_coeff=float(coeff),
        moe_token_dispatcher_type=model_cfg.moe_token_dispatcher,
        moe_grouped_gemm=te,
        moe_permute_fusion=False,
        moe_router_fusion=False,
        moe_enable_routing_replay=model_cfg.moe_routing_replay,
        expert_model_parallel_size=lay.ep,
        expert_tensor_parallel_size=lay.expert_tp,
    )


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm for megatron's local layer spec, usable with sequence parallelism.

    The local spec builds its norms with ``WrappedTorchNorm``, which refuses
    ``sequence_parallel`` outright. Under SP a norm sees only its TP rank's share of the sequence,
    so its weight gradient is partial: marked ``sequence_parallel`` it is summed over the TP
    group by ``finalize_model_grads`` (as megatron's own SP norms are). Same math otherwise.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        super().__init__(hidden_size, eps=eps)
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))


def _stage_layers(config, vp_stage) -> range:
    """Global (0-based) numbers of the layers this pipeline stage / virtual chunk builds."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    first = get_transformer_layer_offset(config, vp_stage=vp_stage)
    return range(first, first + get_num_layers_to_build(config, vp_stage=vp_stage))


def _local_layer_spec(spec: ArchSpec, config, vp_stage):
    """megatron's local layer spec (MoE layers with ``SequentialMLP``); a block spec when the
    layers differ (leading dense layers) or with SP, whose norms are then
    :class:`SequenceParallelRMSNorm` (final norm included)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    def layer_spec(moe: bool):
        mla = spec.mla is not None
        layer = get_gpt_layer_local_spec(
            num_experts=spec.moe.num_experts if moe else None,
            moe_grouped_gemm=False, normalization="RMSNorm",
            qk_layernorm=spec.qk_norm or mla, multi_latent_attention=mla)
        if mla:
            from megarlhf.models.mla import mla_core_attention

            layer.submodules.self_attention.submodules.core_attention = mla_core_attention()
        if config.sequence_parallel:
            sub = layer.submodules
            sub.input_layernorm = SequenceParallelRMSNorm
            sub.pre_mlp_layernorm = SequenceParallelRMSNorm
            if mla:
                # The latent norms see this rank's share of the sequence: partial gradients,
                # summed over TP by finalize_model_grads as SP norms.
                attn = sub.self_attention.submodules
                if spec.mla.q_lora_rank is not None:
                    attn.q_layernorm = SequenceParallelRMSNorm
                attn.kv_layernorm = SequenceParallelRMSNorm
            elif spec.qk_norm:
                # q/k norms act on whole (all-gathered) sequences; megatron sums their gradients
                # over TP by name (qk_layernorm), so they need no mark - any norm class without
                # the SP refusal will do.
                sub.self_attention.submodules.q_layernorm = SequenceParallelRMSNorm
                sub.self_attention.submodules.k_layernorm = SequenceParallelRMSNorm
        return layer

    if spec.mla is not None:
        from megarlhf.compat import megatron as megatron_compat

        megatron_compat.fix_mla_without_te()
    mixed = spec.moe is not None and spec.moe.first_dense_layers > 0
    if not mixed and not config.sequence_parallel:
        return layer_spec(spec.moe is not None)
    specs = {moe: layer_spec(moe) for moe in {spec.is_moe_layer(i)
                                              for i in _stage_layers(config, vp_stage)}}
    layers = [specs[spec.is_moe_layer(i)] for i in _stage_layers(config, vp_stage)]
    if not config.sequence_parallel:
        from megatron.core.transformer.transformer_block import LayerNormImpl

        # The final norm megatron builds for a single layer spec.
        return TransformerBlockSubmodules(layer_specs=layers, layer_norm=LayerNormImpl)
    return TransformerBlockSubmodules(layer_specs=layers, layer_norm=SequenceParallelRMSNorm)


def _te_layer_spec(spec: ArchSpec, config, vp_stage):
    """Transformer Engine's layer spec (grouped experts); a block spec of dense and MoE layers
    when the family has leading dense layers."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    def layer_spec(moe: bool):
        return get_gpt_layer_with_transformer_engine_spec(
            num_experts=spec.moe.num_experts if moe else None, moe_grouped_gemm=moe,
            qk_layernorm=spec.qk_norm or spec.mla is not None,
            multi_latent_attention=spec.mla is not None)

    if spec.moe is None or not spec.moe.first_dense_layers:
        return layer_spec(spec.moe is not None)
    from megatron.core.extensions.transformer_engine import TENorm

    specs = {moe: layer_spec(moe) for moe in (False, True)}
    return TransformerBlockSubmodules(
        layer_specs=[specs[spec.is_moe_layer(i)] for i in _stage_layers(config, vp_stage)],
        layer_norm=TENorm)


class ScalarHead(torch.nn.Module):
    """A linear hidden -> 1 head, replicated on TP ranks, with ColumnParallelLinear's call shape.

    Called as ``head(hidden (s, b, h), weight=None, runtime_gather_output=None)`` and returns
    ``(values (s, b, 1), None)`` so GPTModel's post-processing can use it unchanged.
    """

    def __init__(self, hidden_size: int, sequence_parallel: bool, tp_group, dtype, seed: int):
        super().__init__()
        # Identical on every TP rank: drawn from a dedicated generator, not the TP-forked RNG.
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(1, hidden_size, generator=g) / math.sqrt(hidden_size + 1)
        self.weight = torch.nn.Parameter(w.to(dtype))
        self.sequence_parallel = sequence_parallel
        self._tp_group = tp_group

    def forward(self, hidden, weight=None, runtime_gather_output=None):
        if self.sequence_parallel:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            hidden = gather_from_sequence_parallel_region(hidden, group=self._tp_group)
        out = torch.matmul(hidden, self.weight.t())  # (s, b, 1)
        return out, None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        sd = {"weight": self.weight}
        return make_sharded_tensors_for_checkpoint(sd, prefix, {}, sharded_offsets)


@dataclass
class ModelBundle:
    """A role's megatron model on this rank, and what was needed to build it."""

    chunks: list[torch.nn.Module]  # one per VPP chunk; DDP-wrapped when built for training
    spec: ArchSpec
    config: Any  # megatron TransformerConfig
    head: Head
    padded_vocab_size: int
    te: bool
    ctx: ParallelContext

    def unwrapped(self) -> list[torch.nn.Module]:
        """The GPTModel of each chunk, without DDP / Float16Module wrappers."""
        out = []
        for c in self.chunks:
            while hasattr(c, "module") and not hasattr(c, "decoder"):
                c = c.module
            out.append(c)
        return out


def build_model(model_cfg: ModelConfig, ctx: ParallelContext, *, head: Head = "lm",
                for_training: bool = False, init_weights: bool = True, seed: int = 1234,
                use_distributed_optimizer: bool = True) -> ModelBundle:
    """Builds this rank's chunks of the model described by ``model_cfg``.

    Args:
        model_cfg: the role's model config (architecture from ``hf_dir`` or ``arch``).
        ctx: the role's parallel context (megatron's groups initialised for its layout).
        head: ``"lm"`` or ``"scalar"``.
        for_training: wrap each chunk in megatron's DistributedDataParallel (grad buffers).
        init_weights: initialise weights randomly; pass False when they will be loaded.
        seed: seed of the scalar head's initialisation.
        use_distributed_optimizer: DDP buffer layout for megatron's DistributedOptimizer.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_model import GPTModel

    from megarlhf.platform import current_platform

    platform = current_platform()
    cpu = not platform.is_cuda
    spec = arch_spec(load_hf_config(model_cfg))
    if head == "scalar" and spec.tie_word_embeddings:
        # A scalar model has no LM head to tie.
        spec = _untied(spec)
    te = use_transformer_engine(model_cfg)
    if model_cfg.fp8 is not None:
        check_fp8(model_cfg)
    lay = ctx.layout
    if lay.cp > 1:
        raise ModelBuildError(
            f"context parallelism (cp={lay.cp}) is not supported by megarlhf's engine yet: "
            "splitting sequences over CP ranks is not implemented; use cp=1")
    if spec.num_layers % (lay.pp * lay.vpp):
        raise ModelBuildError(
            f"{spec.num_layers} layers are not divisible by pp*vpp = {lay.pp * lay.vpp}")
    if spec.moe is not None and spec.moe.num_experts % lay.ep:
        raise ModelBuildError(f"{spec.moe.num_experts} experts are not divisible by ep={lay.ep}")
    if spec.mla is not None and te and for_training and lay.tp > 1 \
            and not lay.sequence_parallel:
        # megatron's MLA never sums the shared rope key's gradient over TP (Megatron-LM#1699);
        # with SP, Transformer Engine's spec does it in the sequence all-gather's backward.
        raise ModelBuildError(
            f"multi-latent attention trained at tp={lay.tp} with Transformer Engine needs "
            "sequence parallelism (without it megatron-core 0.16.1 drops part of the rope key's "
            "gradient); set parallel.sequence_parallel=true")
    config = transformer_config(spec, model_cfg, ctx, te=te, init_weights=init_weights, cpu=cpu)
    padded_vocab = spec.padded_vocab_size(lay.tp, model_cfg.vocab_multiple)
    inv_freq = hf_inv_freq(spec)

    chunks = []
    for vp in range(lay.vpp):
        vp_stage = vp if lay.vpp > 1 else None
        layer_spec = (_te_layer_spec if te else _local_layer_spec)(spec, config, vp_stage)
        pre = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        post = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        m = GPTModel(
            config=config,
            transformer_layer_spec=layer_spec,
            vocab_size=padded_vocab,
            max_sequence_length=spec.max_position_embeddings,
            pre_process=pre,
            post_process=post,
            parallel_output=True,
            share_embeddings_and_output_weights=spec.tie_word_embeddings and head == "lm",
            position_embedding_type="rope",
            rotary_percent=spec.rotary_percent,
            rotary_base=int(spec.rope_theta) if float(spec.rope_theta).is_integer()
            else spec.rope_theta,
            pg_collection=ctx.pg_collection,
            vp_stage=vp_stage,
        )
        if inv_freq is not None:
            m.rotary_pos_emb.inv_freq = inv_freq.to(m.rotary_pos_emb.inv_freq.device)
        if head == "scalar" and post:
            m.output_layer = ScalarHead(spec.hidden_size, lay.sequence_parallel, ctx.tp_group,
                                        config.params_dtype, seed)
            if platform.is_cuda:
                m.output_layer.cuda()
        if platform.is_cuda:
            m.cuda(torch.cuda.current_device())
        _ensure_tp_attributes(m)
        chunks.append(m)

    if config.bf16 or config.fp16:
        from megatron.core.transformer.module import Float16Module

        chunks = [Float16Module(config, c) for c in chunks]

    if for_training:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=use_distributed_optimizer,
            check_for_nan_in_grad=False,
        )
        chunks = [
            DistributedDataParallel(config=config, ddp_config=ddp_config, module=c,
                                    disable_bucketing=i > 0, pg_collection=ctx.pg_collection)
            for i, c in enumerate(chunks)
        ]
    return ModelBundle(chunks=chunks, spec=spec, config=config, head=head,
                       padded_vocab_size=padded_vocab, te=te, ctx=ctx)


def _ensure_tp_attributes(model: torch.nn.Module) -> None:
    """Marks TP-sharded weights as such even when initialisation was skipped.

    megatron-core 0.16 sets ``tensor_model_parallel`` / ``partition_dim`` on a parallel layer's
    weight only inside its initialisers, so a model built with ``perform_initialization=False``
    (weights to be loaded) would count every shard as a TP duplicate: the grad norm (and so grad
    clipping) would miss all shards but TP rank 0's.
    """
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
        set_tensor_model_parallel_attributes,
    )

    for mod in model.modules():
        if isinstance(mod, (ColumnParallelLinear, VocabParallelEmbedding)):
            dim = 0
        elif isinstance(mod, RowParallelLinear):
            dim = 1
        else:
            continue
        w = getattr(mod, "weight", None)
        if w is not None and not getattr(w, "tensor_model_parallel", False):
            for attr in ("tensor_model_parallel", "partition_dim", "partition_stride"):
                if hasattr(w, attr):
                    delattr(w, attr)
            set_tensor_model_parallel_attributes(w, True, dim, 1)


def _untied(spec: ArchSpec) -> ArchSpec:
    from dataclasses import replace

    return replace(spec, tie_word_embeddings=False)
