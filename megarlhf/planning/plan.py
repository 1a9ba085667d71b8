"""``megarlhf plan``: the placement and a per-GPU memory estimate of every role, before launch.

Model sizes come from the HF config (``hf_dir``'s config.json or ``model.arch``); no weight is
read. All numbers are per GPU, for the most loaded pipeline stage, in GiB (2^30 bytes).

Parameters per GPU (megatron's sharding)
    A layer has ``q, o: h*a*d`` each, ``k, v: h*g*d`` each (GQA, ``g`` query groups), the
    SwiGLU MLP ``3*h*F``, qkv bias ``a*d + 2*g*d`` (when present), two RMSNorms ``2*h`` and
    qk-norms ``2*d`` (when present). Linear weights are split over TP, norms replicated; a
    stage holds ``L / pp`` layers. Stage 0 also holds the word embedding ``Vp*h/tp`` (``Vp`` =
    vocab padded to a multiple of ``vocab_multiple * tp``); the last stage the final norm ``h``
    and the LM head ``Vp*h/tp`` (untied, or tied with ``pp > 1``: megatron keeps a copy there)
    or a scalar head ``h``.

Multi-head latent attention (DeepSeek-V3; ``n`` heads, ``q_lora`` / ``kv_lora`` latent ranks,
``dn`` / ``dr`` / ``dv`` per-head no-RoPE / RoPE / value dims) replaces q, k, v, o by
    ``q_a_proj h*q_lora`` + ``q_a_layernorm q_lora`` + ``q_b_proj q_lora*n*(dn+dr)`` (or
    ``q_proj h*n*(dn+dr)`` without a query latent), ``kv_a_proj_with_mqa h*(kv_lora+dr)`` +
    ``kv_a_layernorm kv_lora`` + ``kv_b_proj kv_lora*n*(dn+dv)``, ``o_proj n*dv*h``. The up-
    projections and ``o_proj`` are split over TP; the two down-projections (``q_a``, ``kv_a``)
    are replicated on every TP rank in Transformer Engine's layer spec (what GPUs build,
    ``transformer_impl`` auto / transformer_engine) and split by rows in megatron's local spec;
    the latent norms are replicated.

DeepSeek-V3-lineage MoE models (glm4_moe, deepseek_v3)
    The first ``first_k_dense_replace`` layers have a dense SwiGLU MLP of width
    ``intermediate_size`` (split over TP, no experts, no router); the rest are MoE layers
    (below) that also hold shared experts, a dense MLP ``3*h*F_s`` split over TP
    (``F_s = n_shared_experts * moe_intermediate_size``), and the router's expert bias, an fp32
    buffer of ``E`` (replicated; 4 bytes each, no grads or optimizer state). A stage's layers
    are counted one by one, so the stage holding the dense layers (stage 0, or with ``vpp`` the
    first chunk's stage) has fewer expert parameters and more dense ones than the others.
    Multi-token-prediction layers are not built (their tensors are carried on disk): not counted.

Bytes per parameter (``P`` = the stage's parameters; ``d`` = DP*CP, the group megatron's
DistributedOptimizer shards over)
    weights: 2 (bf16/fp16) or 4 (fp32). Trained roles add: grads 4 (megatron DDP's grad buffer
    with ``grad_reduce_in_fp32``), and optimizer state = fp32 main params 4 (not for fp32 models)
    + Adam moments 8 (SGD momentum 4), divided by ``d`` with the DistributedOptimizer. For bf16
    + Adam + DistributedOptimizer that is megatron's ``6 + 12/d`` bytes per parameter (18 without
    it). Frozen roles (reference, scoring reward model) hold weights only.

Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models", generalised to GQA and SwiGLU; bf16 activations)
    Per layer and micro-batch of ``b`` sequences of ``s`` tokens (``s / cp`` per CP rank)::

        A = s*b*h * ( u + (c - u)/t  +  5*a*s/(h*t) )      bytes
        c = 4 (two norm inputs) + 3 + 4*a*d/h + 4*g*d/h (attention: qkv input, q, k, v, context,
            dropout mask) + 3 + 8*F/h (SwiGLU MLP: fc1 input, gate/up outputs, SiLU, product,
            dropout mask)
        u = 10 without sequence parallelism (norm inputs, qkv and fc1 inputs, two dropout masks
            are not split over TP); 0 with it

    which is the paper's ``34 + 5*a*s/h`` for a GPT layer (``g*d = a*d = h``, ``F = 4h``, GeLU
    counted as 4F/h). The ``5*a*s/h`` softmax/score term is dropped with selective
    recomputation and with fused (flash) attention, i.e. whenever Transformer Engine is used
    (``model.transformer_impl`` auto or transformer_engine; only ``local`` stores scores).
    Full recomputation keeps each layer's input ``2*s*b*h`` (``/t`` with SP) plus one layer's
    ``A`` (the stage's largest) while it is recomputed. megarlhf trains with dropout 0, so the
    masks make this slightly conservative.

    Multi-head latent attention (an estimate built the same way, not a published formula): the
    attention term becomes ``3 + 4*n*(dn+dr)/h + 4*n*dv/h`` (down-projection input and dropout
    mask; q and k of ``dn+dr`` per head; v and the context of ``dv`` per head; split over TP
    with the heads, so for ``dn+dr = dv = d`` it is the GQA term with ``g = a``), plus the
    latents ``(4*q_lora + 2*(kv_lora+dr) + 2*kv_lora)/h`` (the query latent and its norm's
    output, the kv down-projection's output and the kv latent norm's output) counted whole on
    every TP rank: Transformer Engine computes them with the replicated down-projections and
    the up-projections take them gathered over the sequence, so this is an upper bound.

Mixture-of-experts layers (``E`` experts of width ``F_e``, top-``k``; megatron's expert layout:
``ep`` expert-parallel x ``etp`` expert-tensor-parallel ranks, ``edp = tp*cp*dp/(ep*etp)``)
    A layer's MLP is a router ``E*h`` (fp32 in megatron, replicated; counted at the model's
    bytes like the norms) and ``E`` experts of ``3*h*F_e``; a GPU holds ``E/ep`` experts, each
    split over ``etp``: ``3*h*F_e*E/(ep*etp)`` expert parameters per layer. Expert parameters
    are replicated over ``edp`` (not DP*CP), so the DistributedOptimizer shards their state over
    ``edp``: bytes per expert parameter ``w + 4 + (4 + 8)/edp`` (bf16, Adam).
    Activations: the dense MLP term ``3 + 8*F/h`` becomes ``3 + 8*E/h + k*(4 + 8*F_e/(h*etp))``
    (router input and dropout mask; fp32 router logits and probabilities; per routed copy of a
    token: the dispatched input, the expert's gate/up outputs, SiLU and product, the expert
    output before the weighted combine), assuming balanced routing (each rank's experts get
    its share of the routed tokens; a skewed router needs more). With SP the MoE term is split
    over TP like the rest (each TP rank routes its share of the sequence). Shared experts add
    ``8*F_s/(h*t)`` (their gate/up outputs, SiLU and product; their input is the router's). The
    leading dense layers of the DeepSeek-V3 lineage use the dense formula with their own ``F``.

    Pipeline stage ``i`` of a training step holds ``min(pp - i, micro-batches)`` micro-batches in
    flight (1F1B), times ``1 + (pp-1)/(pp*vpp)`` with the interleaved schedule; each of
    ``L / pp`` layers. The last stage adds the logits ``s*b*Vp/t * 6`` bytes (bf16 logits and
    fp32 log-softmax work/gradient). Scoring (forward only) holds one layer's ``A`` plus logits.

Rollout engine
    vLLM takes ``gpu_memory_utilization * gpu_memory_gib`` of each of its GPUs: weights (bf16,
    ``params * 2 / rollout.tp``), a fixed 2 GiB for its profiled activations and CUDA graphs, and
    the rest as KV cache, ``2 * L * ceil(g / tp) * d * 2`` bytes per token per GPU; it must hold
    at least one sequence of ``data.max_prompt_len + rollout.max_new_tokens`` tokens. With
    multi-head latent attention vLLM caches the compressed latent, ``L * (kv_lora + dr) * 2``
    bytes per token, whole on every TP rank (not split by heads), and keeps MLA's two
    down-projections whole on every TP rank too (counted on top of ``params * 2 / tp``; the
    norms and routers it also replicates are under 0.1% and left out). The expert bias is fp32
    on every path. The transformers engine (``rollout.engine=hf``) holds fp32 weights and the
    KV cache of its batch (MLA: every head's keys and values after the up-projection,
    ``n*(dn+dr+dv)`` per token and layer).

Weight sync (actor -> rollout engine, megarlhf/weights/transfer.py)
    Owners: TP rank 0 of each pipeline stage, and under expert parallelism every expert-
    parallel rank of the stage (``pp * ep`` owners, ``pp`` for a dense model); each sends its
    share ``S_k ~ B / owners`` of the model's ``B`` bytes (rollout dtype; the expert bias
    fp32) in buckets of ``rollout.weight_sync_bucket_mib / owners``. During a sync a GPU holds:

    * colocated with the rollout (CUDA IPC): the actor's weights (its gradients and optimizer
      state stay offloaded), one bucket of the actor (every rank gets every bucket: vLLM's
      worker on each GPU reads it from the trainer rank on the same GPU), vLLM's weights (its
      KV cache still asleep) and the bucket's tensors vLLM copies out;
    * split: on the rollout's GPUs vLLM's whole share plus ``rollout.weight_sync_bucket_mib``
      of received buckets (one per owner in flight); on the actor's GPUs its resident state
      plus one bucket.

    Seconds, at the stated bandwidths (``NVLINK_GB_S`` per GPU and direction, ``IB_GB_S`` per
    node): the gather inside a stage ``S_k (tp-1)/tp / NVLink``; the wire ``B / IB`` (every
    receiving node gets every byte once: NCCL's broadcast crosses each node once; colocated,
    the owners' broadcast over the trainer's world does the same) or, within one node,
    ``B / NVLink``; control round trips (``CONTROL_RTT_S`` each: start, update, finish, and with
    CUDA IPC one update per bucket, so larger buckets pay off there); vLLM's reload is not
    modelled. The previous path (every byte through one
    host process and Ray's object store to each replica) is printed beside it:
    ``B (1 + replicas) / HOST_GB_S``.

Colocation
    Roles sharing GPUs take turns. For each role's phase the GPU holds: the active role's whole
    footprint (state + activations; the rollout's whole share), the *resident* state (weights,
    grads, optimizer) of every colocated role with ``offload: false``, nothing of roles with
    ``offload: true`` (their state waits in pinned host memory; the host total per node is
    printed) and nothing of a colocated rollout engine (it sleeps between generations), plus
    1 GiB per process on the GPU (CUDA context, NCCL buffers, allocator slack). Every phase must
    fit ``cluster.gpu_memory_gib``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from megarlhf.config.base import ConfigError
from megarlhf.config.schema import JobConfig, ModelConfig, OptimizerConfig
from megarlhf.config.validate import (
    active_roles,
    global_batch_sequences,
    sequence_tokens,
    trained_roles,
)
from megarlhf.models.arch import load_hf_config
from megarlhf.models.builder import te_status
from megarlhf.models.families import arch_spec
from megarlhf.parallel.layout import ParallelLayout
from megarlhf.planning.placement import (
    RL_KINDS,
    PlacementPlan,
    format_runs,
    format_slots,
    plan_placement,
)

GIB = 2**30
PROCESS_OVERHEAD_GIB = 1.0
VLLM_WORKSPACE_GIB = 2.0
# Bandwidths of the weight-sync cost model (H100 nodes): NVLink 4 per GPU and direction,
# 8 x 400 Gb/s InfiniBand per node, one host process copying through shared memory.
NVLINK_GB_S = 450.0
IB_GB_S = 400.0
HOST_GB_S = 20.0
# One control round trip (driver -> trainer rank 0 -> replica actor -> vLLM's workers and back):
# the demo's whole sync, three of them, takes 0.028 s on CPU (docs/benchmarks.md).
CONTROL_RTT_S = 0.01
# Published weight-sync times of peers (the issue that asked for this model quotes them).
PEER_SYNC_FIGURES = (
    "NeMo-RL DeepSeek-V3 refit 2.4-2.8 s (H100, shard-to-shard NCCL)",
    "verl Qwen3-30B-A3B on 4x8 H100 ~6-7 s (checkpoint engine)",
    "slime GLM-4.5 355B 48 s",
    "Moonshot checkpoint-engine 1T ~20 s",
)
_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


class PlanError(ConfigError):
    """The job does not fit the cluster; the message names the role, estimate, limit and fix."""


# ------------------------------------------------------------------------------ model shape
@dataclass(frozen=True)
class ModelShape:
    """The numbers of an architecture the estimate needs.

    MoE models: ``ffn`` is an expert's width; the first ``first_dense_layers`` layers have a
    dense MLP of width ``dense_ffn`` instead (DeepSeek-V3 lineage), and every MoE layer may add
    shared experts (a dense MLP of width ``shared_ffn``) and an fp32 expert bias of ``E``.
    ``mla``: multi-head latent attention ``(q_lora_rank or None, kv_lora_rank,
    qk_nope_head_dim, qk_rope_head_dim, v_head_dim)`` instead of GQA; ``te``: Transformer
    Engine's layer spec (there MLA's two down-projections are replicated over TP; in megatron's
    local spec they are split by rows).
    """

    num_layers: int
    hidden: int
    ffn: int
    heads: int
    kv_groups: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool
    qk_norm: bool
    num_experts: int = 0  # 0: dense; else MoE layers' MLPs are MoE and ``ffn`` an expert's width
    topk: int = 0
    dense_ffn: int = 0  # the leading dense layers' MLP width (MoE models with dense layers)
    first_dense_layers: int = 0
    shared_ffn: int = 0  # shared experts' width in every MoE layer (0: none)
    expert_bias: bool = False  # an fp32 buffer of E per MoE layer (weights only: no grads)
    mla: tuple[int | None, int, int, int, int] | None = None
    te: bool = True

    @staticmethod
    def from_model(model: ModelConfig) -> "ModelShape":
        """Reads the HF config (config.json or ``arch``); no weights."""
        s = arch_spec(load_hf_config(model))
        mo, ml = s.moe, s.mla
        dense = bool(mo and mo.first_dense_layers)
        return ModelShape(
            s.num_layers, s.hidden_size, mo.ffn_hidden_size if mo else s.ffn_hidden_size,
            s.num_attention_heads, s.num_query_groups, s.head_dim, s.vocab_size,
            s.tie_word_embeddings, s.qkv_bias, s.qk_norm,
            num_experts=mo.num_experts if mo else 0, topk=mo.topk if mo else 0,
            dense_ffn=s.ffn_hidden_size if dense else 0,
            first_dense_layers=mo.first_dense_layers if mo else 0,
            shared_ffn=mo.shared_ffn_hidden_size if mo else 0,
            expert_bias=bool(mo and mo.expert_bias),
            mla=(ml.q_lora_rank, ml.kv_lora_rank, ml.qk_nope_head_dim, ml.qk_rope_head_dim,
                 ml.v_head_dim) if ml else None,
            te=model.transformer_impl != "local")

    def is_moe_layer(self, layer: int) -> bool:
        """Whether global layer ``layer`` (0-based) has the MoE block."""
        return bool(self.num_experts) and layer >= self.first_dense_layers

    @property
    def moe_layers(self) -> int:
        return self.num_layers - self.first_dense_layers if self.num_experts else 0

    def mla_down_params(self) -> int:
        """MLA's two down-projections (``q_a_proj``, ``kv_a_proj_with_mqa``) of one layer."""
        if self.mla is None:
            return 0
        ql, kvl, _, dr, _ = self.mla
        return self.hidden * (ql or 0) + self.hidden * (kvl + dr)

    def attention_params(self) -> tuple[int, int]:
        """``(split over TP, replicated)`` attention parameters of one layer (with its input
        norm; MLA: the latent norms, and the down-projections where TE replicates them)."""
        h = self.hidden
        if self.mla is not None:
            ql, kvl, dn, dr, dv = self.mla
            n = self.heads
            split = (ql * n * (dn + dr) if ql else h * n * (dn + dr))  # q_b_proj / q_proj
            split += kvl * n * (dn + dv) + n * dv * h  # kv_b_proj, o_proj
            rep = h + (ql or 0) + kvl  # input norm, q_a / kv_a latent norms
            if self.te:
                rep += self.mla_down_params()
            else:
                split += self.mla_down_params()
            return split, rep
        a, g, d = self.heads, self.kv_groups, self.head_dim
        split = 2 * h * a * d + 2 * h * g * d
        if self.qkv_bias:
            split += a * d + 2 * g * d
        return split, h + (2 * d if self.qk_norm else 0)

    def layer_params(self, moe_layer: bool | None = None) -> tuple[int, int]:
        """``(split over TP, replicated)`` parameters of one layer (experts and the expert-bias
        buffer excluded); ``moe_layer`` None: an MoE layer for an MoE model."""
        moe_layer = bool(self.num_experts) and (moe_layer is None or moe_layer)
        h = self.hidden
        split, replicated = self.attention_params()
        replicated += h  # the pre-MLP norm
        if moe_layer:
            replicated += self.num_experts * h  # the router
            split += 3 * h * self.shared_ffn  # shared experts: a dense MLP split over TP
        else:
            split += 3 * h * (self.dense_ffn if self.num_experts else self.ffn)
        return split, replicated

    def expert_layer_params(self) -> int:
        """Expert parameters of one MoE layer (all experts), split over ep*etp ranks."""
        return 3 * self.hidden * self.ffn * self.num_experts

    def bias_layer_params(self) -> int:
        """The fp32 expert-bias buffer of one MoE layer (replicated; no grads or optimizer)."""
        return self.num_experts if self.expert_bias else 0

    def padded_vocab(self, tp: int, multiple: int) -> int:
        m = multiple * tp
        return -(-self.vocab // m) * m

    def total_params(self, head: str = "lm") -> int:
        """Parameters of the whole model (HF count: unpadded vocabulary, one tied copy; expert
        biases included; multi-token-prediction layers, not built, excluded)."""
        n = self.vocab * self.hidden + self.hidden
        for layer in range(self.num_layers):
            moe = self.is_moe_layer(layer)
            n += sum(self.layer_params(moe))
            if moe:
                n += self.expert_layer_params() + self.bias_layer_params()
        if head == "lm":
            n += 0 if self.tied else self.vocab * self.hidden
        else:
            n += self.hidden
        return n

    def bias_params(self) -> int:
        """The expert-bias buffers of the whole model (fp32 on every path)."""
        return self.moe_layers * self.bias_layer_params()

    def rollout_replicated_params(self) -> int:
        """Parameters vLLM replicates on every TP rank beyond the norms and routers (which the
        estimate leaves split, under 0.1%): MLA's down-projections (ReplicatedLinear)."""
        return self.num_layers * self.mla_down_params()

    def kv_elements_per_token(self, tp: int, engine: str = "vllm") -> int:
        """KV-cache elements one GPU of a rollout replica stores per token (all layers).

        GQA: keys and values of ``ceil(g / tp)`` groups. MLA in vLLM: the compressed latent
        ``kv_lora_rank + qk_rope_head_dim``, one copy per TP rank (not split by heads); the
        transformers engine caches every head's keys and values after the up-projection."""
        if self.mla is not None:
            _, kvl, dn, dr, dv = self.mla
            if engine == "vllm":
                return self.num_layers * (kvl + dr)
            return self.num_layers * math.ceil(self.heads / tp) * (dn + dr + dv)
        return 2 * self.num_layers * math.ceil(self.kv_groups / tp) * self.head_dim


def stage_layers(shape: ModelShape, layout: ParallelLayout) -> list[list[int]]:
    """The global layers each pipeline stage holds (with ``vpp`` chunks: chunk ``v`` of stage
    ``i`` is the model's chunk ``v * pp + i``)."""
    pp, vpp = layout.pp, layout.vpp
    per = shape.num_layers // (pp * vpp)
    return [[(v * pp + i) * per + k for v in range(vpp) for k in range(per)]
            for i in range(pp)]


def stage_params(shape: ModelShape, head: str, layout: ParallelLayout,
                 vocab_multiple: int = 128) -> list[int]:
    """Parameters on one GPU of each pipeline stage, experts and expert-bias buffers excluded
    (see :func:`stage_expert_params`, :func:`stage_buffer_params`)."""
    tp, pp = layout.tp, layout.pp
    per_layer = {}
    for moe in (False, True):
        split, rep = shape.layer_params(moe)
        per_layer[moe] = split // tp + rep
    emb = shape.padded_vocab(tp, vocab_multiple) * shape.hidden // tp
    out = []
    for i, layers in enumerate(stage_layers(shape, layout)):
        n = sum(per_layer[shape.is_moe_layer(layer)] for layer in layers)
        if i == 0:
            n += emb
        if i == pp - 1:
            n += shape.hidden  # final norm
            if head == "lm":
                n += emb if (not shape.tied or pp > 1) else 0
            else:
                n += shape.hidden  # scalar head, replicated
        out.append(n)
    return out


def stage_expert_params(shape: ModelShape, layout: ParallelLayout) -> list[int]:
    """Expert parameters on one GPU of each pipeline stage (0 for dense models and for the
    stage's dense layers)."""
    per_gpu = shape.expert_layer_params() // (layout.ep * layout.expert_tp)
    return [sum(shape.is_moe_layer(layer) for layer in layers) * per_gpu
            for layers in stage_layers(shape, layout)]


def stage_buffer_params(shape: ModelShape, layout: ParallelLayout) -> list[int]:
    """Expert-bias elements on one GPU of each pipeline stage (fp32, replicated, no grads)."""
    return [sum(shape.is_moe_layer(layer) for layer in layers) * shape.bias_layer_params()
            for layers in stage_layers(shape, layout)]


def state_bytes(params: int, dtype: str, optimizer: OptimizerConfig | None,
                dp_cp: int) -> tuple[float, float, float]:
    """``(weights, grads, optimizer)`` bytes for ``params`` parameters on one GPU."""
    w = params * _DTYPE_BYTES[dtype]
    if optimizer is None:
        return float(w), 0.0, 0.0
    grads = params * 4
    main = 0 if dtype == "fp32" else 4
    moments = 8 if optimizer.name == "adam" else 4
    opt = params * (main + moments)
    if optimizer.use_distributed_optimizer:
        opt /= dp_cp
    return float(w), float(grads), float(opt)


def layer_activation_bytes(shape: ModelShape, s: int, b: int, layout: ParallelLayout, *,
                           recompute: str, flash: bool, moe_layer: bool | None = None) -> float:
    """``A``: one layer's stored activations for one micro-batch on one GPU (see module doc);
    ``moe_layer`` None: an MoE layer for an MoE model, else the layer's kind."""
    h, a, g, d = shape.hidden, shape.heads, shape.kv_groups, shape.head_dim
    t, cp = layout.tp, layout.cp
    s_loc = s / cp
    u = 0.0 if layout.sequence_parallel else 10.0
    moe_layer = bool(shape.num_experts) and (moe_layer is None or moe_layer)
    latent = 0.0  # MLA's latents: not split over TP
    if shape.mla is not None:
        ql, kvl, dn, dr, dv = shape.mla
        attn = 3 + 4 * a * (dn + dr) / h + 4 * a * dv / h
        latent = (4 * (ql or 0) + 2 * (kvl + dr) + 2 * kvl) / h
    else:
        attn = 3 + 4 * a * d / h + 4 * g * d / h
    if moe_layer:
        E, k, et = shape.num_experts, shape.topk, layout.expert_tp
        c = 4 + attn
        moe = 3 + 8 * E / h + k * (4 + 8 * shape.ffn / (h * et))
        per = u + (c - u) / t + (moe / t if layout.sequence_parallel else moe)
        per += 8 * shape.shared_ffn / (h * t)  # shared experts: a TP-split dense MLP
    else:
        F = shape.dense_ffn if shape.num_experts else shape.ffn
        c = 4 + attn + (3 + 8 * F / h)
        per = u + (c - u) / t
    per += latent
    if not flash and recompute == "none":
        per += 5 * a * s / (h * t)
    return s_loc * b * h * per


def logits_bytes(shape: ModelShape, s: int, b: int, layout: ParallelLayout,
                 vocab_multiple: int) -> float:
    return s / layout.cp * b * shape.padded_vocab(layout.tp, vocab_multiple) / layout.tp * 6


# ------------------------------------------------------------------------------ estimates
@dataclass
class StageMemory:
    stage: int
    params: int  # on one GPU of the stage, experts included
    weights: float
    grads: float
    optimizer: float
    activations: float
    expert_params: int = 0  # of which expert parameters (state sharded over edp)
    buffer_params: int = 0  # of which expert-bias buffers (fp32 weights only)

    @property
    def resident(self) -> float:
        return self.weights + self.grads + self.optimizer

    @property
    def total(self) -> float:
        return self.resident + self.activations


@dataclass
class RoleEstimate:
    """One trainer role's memory per GPU (worst pipeline stage)."""

    role: str
    layout: ParallelLayout
    head: str
    trained: bool
    offload: bool
    model_params: int
    seq_len: int
    micro_batch: tuple[int, int]  # (sequences, tokens each)
    in_flight: int
    stages: list[StageMemory]
    recompute: str
    flash: bool

    @property
    def worst(self) -> StageMemory:
        return max(self.stages, key=lambda st: st.total)

    @property
    def active(self) -> float:
        return self.worst.total

    @property
    def resident(self) -> float:
        return max(st.resident for st in self.stages)


@dataclass
class RolloutEstimate:
    engine: str
    replicas: int
    tp: int
    seq_len: int
    model_params: int
    share: float  # bytes per GPU the engine takes while generating
    weights: float
    kv: float
    kv_tokens: float  # per replica

    @property
    def active(self) -> float:
        return self.share


@dataclass
class SyncEstimate:
    """One weight sync (see the module docstring)."""

    total_bytes: float  # the model in the rollout dtype
    owners: int
    bucket_bytes: float  # per owner
    colocated: bool
    multi_node: bool
    gather_s: float
    wire_s: float
    previous_s: float  # every byte through one host process (the path before)
    replicas: int
    control_s: float = 0.0  # control round trips (CUDA IPC: one per bucket)

    @property
    def seconds(self) -> float:
        return self.gather_s + self.wire_s + self.control_s


@dataclass
class Phase:
    pool: int
    active: str
    parts: dict[str, float]  # what is on the GPU, by name
    limit: float

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.limit


@dataclass
class Plan:
    job: JobConfig
    placement: PlacementPlan
    roles: dict[str, RoleEstimate]
    rollout: RolloutEstimate | None
    phases: list[Phase]
    problems: list[str] = field(default_factory=list)
    host_bytes_per_node: dict[int, float] = field(default_factory=dict)
    sync: SyncEstimate | None = None

    @property
    def fits(self) -> bool:
        return not self.problems


def _seq_len(job: JobConfig) -> int:
    return sequence_tokens(job)[0]


def _role_model(job: JobConfig, name: str) -> ModelConfig:
    rc = active_roles(job)[name]
    return job.role_model(name) if rc.model is None else rc.model


def _flash(model: ModelConfig) -> bool:
    return model.transformer_impl != "local"


def estimate_role(job: JobConfig, name: str) -> RoleEstimate:
    """Memory of trainer role ``name`` per GPU, per pipeline stage."""
    rc = active_roles(job)[name]
    model = job.role_model(name) if rc.model is None else rc.model
    shape = ModelShape.from_model(model)
    head = "scalar" if name in ("critic", "reward_model") or job.kind == "rm" else "lm"
    lay = rc.layout()
    trained = name in trained_roles(job)
    opt = rc.optimizer if trained else None
    seq = _seq_len(job)
    if rc.max_tokens_per_micro_batch is not None:
        b, s = 1, rc.max_tokens_per_micro_batch
        n_mb = lay.pp  # unknown before packing; assume the pipeline fills
    else:
        b, s = rc.micro_batch_size_per_rank, seq
        n_mb = max(1, global_batch_sequences(job) // (lay.dp * b)) if trained else lay.pp
    a_layer = {moe: layer_activation_bytes(shape, s, b, lay, recompute=model.recompute,
                                           flash=_flash(model), moe_layer=moe)
               for moe in (False, True)}
    logits = logits_bytes(shape, s, b, lay, model.vocab_multiple) if head == "lm" else 0.0
    inter = 1 + (lay.pp - 1) / (lay.pp * lay.vpp) if lay.vpp > 1 else 1.0
    stages = []
    experts = stage_expert_params(shape, lay)
    buffers = stage_buffer_params(shape, lay)
    layers_of = stage_layers(shape, lay)
    for i, p in enumerate(stage_params(shape, head, lay, model.vocab_multiple)):
        w, g, o = state_bytes(p, model.dtype, opt, lay.dp * lay.cp)
        we, ge, oe = state_bytes(experts[i], model.dtype, opt, lay.edp)
        w, g, o = w + we + 4 * buffers[i], g + ge, o + oe  # expert bias: fp32, no grads
        last = i == lay.pp - 1
        acts = [a_layer[shape.is_moe_layer(layer)] for layer in layers_of[i]]
        if trained:
            flight = min(lay.pp - i, n_mb) * inter
            if model.recompute == "full":
                kept = 2 * s / lay.cp * b * shape.hidden / (
                    lay.tp if lay.sequence_parallel else 1)
                act = len(acts) * kept * flight + max(acts)
            else:
                act = sum(acts) * flight
        else:
            act = max(acts)  # forward only: one layer's tensors at a time
        act += logits if last else 0.0
        stages.append(StageMemory(i, p + experts[i] + buffers[i], w, g, o, act, experts[i],
                                  buffers[i]))
    return RoleEstimate(name, lay, head, trained, rc.offload, shape.total_params(head), seq,
                        (b, s), min(lay.pp, n_mb), stages, model.recompute, _flash(model))


def rollout_weight_bytes(shape: ModelShape, tp: int, dtype_bytes: int) -> float:
    """One rollout GPU's weights: the model split over ``tp`` at ``dtype_bytes``, plus what the
    engine replicates on every TP rank (MLA's down-projections), the expert bias in fp32."""
    bias = shape.bias_params()
    rep = shape.rollout_replicated_params()
    split = shape.total_params("lm") - bias
    return (split * dtype_bytes / tp + rep * dtype_bytes * (tp - 1) / tp + bias * 4)


def estimate_rollout(job: JobConfig) -> RolloutEstimate:
    r = job.rollout
    model = job.actor.model
    shape = ModelShape.from_model(model)
    seq = _seq_len(job)
    params = shape.total_params("lm")
    replicas = r.num_replicas
    if r.engine == "hf":
        weights = rollout_weight_bytes(shape, r.tp, 4)
        rows = min(64, max(1, job.batch.rollout_prompts_global * job.batch.n_samples_per_prompt
                           // max(replicas, 1)))
        per_token = shape.kv_elements_per_token(r.tp, "hf") * 4
        kv = rows * seq * per_token
        return RolloutEstimate("hf", replicas, r.tp, seq, params, weights + kv, weights, kv,
                               kv / per_token)
    share = r.gpu_memory_utilization * job.cluster.gpu_memory_gib * GIB
    weights = rollout_weight_bytes(shape, r.tp, _DTYPE_BYTES.get(model.dtype, 2))
    kv = share - weights - VLLM_WORKSPACE_GIB * GIB
    per_token = shape.kv_elements_per_token(r.tp, "vllm") * 2
    return RolloutEstimate("vllm", replicas, r.tp, seq, params, share, weights, kv,
                           max(kv, 0.0) / per_token)


def estimate_sync(job: JobConfig, placement: PlacementPlan, actor: RoleEstimate,
                  rollout: RolloutEstimate) -> SyncEstimate:
    """The weight sync's bytes, owners, buckets and seconds (see the module docstring)."""
    model = job.actor.model
    shape = ModelShape.from_model(model)
    wire_bytes = _DTYPE_BYTES.get(model.dtype, 2) if rollout.engine == "vllm" else 4
    bias = shape.bias_params()  # the expert bias travels in fp32 on every path
    total = float(shape.total_params("lm") - bias) * wire_bytes + bias * 4.0
    lay = actor.layout
    owners = lay.pp * (lay.ep if shape.num_experts else 1)
    colocated = placement.role("actor").pool == placement.role("rollout").pool
    budget = job.rollout.weight_sync_bucket_mib * 2**20
    # CUDA IPC (colocated on GPUs) has one bucket in flight; broadcasts one per owner
    # (megarlhf.weights.transfer._bucket_bound).
    ipc = colocated and job.cluster.device != "cpu"
    bucket = float(budget) if ipc else float(max(1, budget // owners))
    nodes = set(placement.role("actor").nodes) | set(placement.role("rollout").nodes)
    multi = len(nodes) > 1
    share = total / owners
    gather = share * (lay.tp - 1) / lay.tp / (NVLINK_GB_S * 1e9)
    wire = total / ((IB_GB_S if multi else NVLINK_GB_S) * 1e9)
    previous = total * (1 + rollout.replicas) / (HOST_GB_S * 1e9)
    # start, update, finish; with CUDA IPC one update (a round trip) per bucket
    control = CONTROL_RTT_S * (2 + (math.ceil(total / bucket) if ipc else 1))
    return SyncEstimate(total, owners, bucket, colocated, multi, gather, wire, previous,
                        rollout.replicas, control)


def _advice(est: RoleEstimate, resident_others: list[str]) -> str:
    """What to change when ``est``'s phase does not fit (most effective first)."""
    n, w = est.role, est.worst
    tips = []
    if resident_others:
        tips.append(f"set offload: true on {', '.join(resident_others)}")
    if est.trained and w.optimizer > 0.25 * w.total:
        tips.append(f"give {n} more GPUs (the DistributedOptimizer shards its "
                    f"{w.optimizer / GIB:.1f} GiB of optimizer state over DP)")
    tips.append(f"raise {n}.parallel.tp or {n}.parallel.pp (TP{est.layout.tp}/PP{est.layout.pp} "
                "now)")
    if est.trained and w.activations > 0.2 * w.total:
        if est.recompute != "full":
            tips.append(f"set {n}.model.recompute="
                        f"{'selective' if est.recompute == 'none' else 'full'}")
        tips.append(f"lower {n}.micro_batch_size_per_rank or {n}.max_tokens_per_micro_batch")
        if est.layout.tp > 1 and not est.layout.sequence_parallel:
            tips.append(f"set {n}.parallel.sequence_parallel=true")
    elif not est.trained and w.activations > 0.2 * w.total:
        tips.append(f"lower {n}.micro_batch_size_per_rank or {n}.max_tokens_per_micro_batch")
    return "; ".join(tips)


def make_plan(job: JobConfig, *, overhead_gib: float = PROCESS_OVERHEAD_GIB) -> Plan:
    """Placement, per-role estimates and per-phase GPU totals of ``job`` (raises nothing on
    misfit: see ``Plan.problems``; :func:`check_plan` raises)."""
    placement = plan_placement(job)
    roles = {n: estimate_role(job, n) for n in placement.roles if n != "rollout"}
    rollout = estimate_rollout(job) if "rollout" in placement.roles else None
    limit = job.cluster.gpu_memory_gib * GIB
    phases: list[Phase] = []
    problems: list[str] = []
    if rollout is not None and rollout.engine == "vllm":
        share = rollout.share / GIB
        if rollout.kv <= 0:
            problems.append(
                f"rollout does not fit: vLLM's share of each GPU is {share:.1f} GiB "
                f"(rollout.gpu_memory_utilization={job.rollout.gpu_memory_utilization} x "
                f"{job.cluster.gpu_memory_gib} GiB) but its weights take "
                f"{rollout.weights / GIB:.1f} GiB per GPU at rollout.tp={rollout.tp} plus "
                f"{VLLM_WORKSPACE_GIB:g} GiB workspace; raise rollout.tp or "
                "rollout.gpu_memory_utilization")
        elif rollout.kv_tokens < rollout.seq_len:
            problems.append(
                f"rollout does not fit: its KV cache ({rollout.kv / GIB:.2f} GiB per GPU) holds "
                f"{rollout.kv_tokens:.0f} tokens per replica, less than one sequence of "
                f"{rollout.seq_len} ({sequence_tokens(job)[1].split(' = ')[0]}); raise "
                "rollout.gpu_memory_utilization or rollout.tp")
    for pool in placement.pools:
        members = pool.roles
        shared = len(members) > 1
        for active in members:
            parts: dict[str, float] = {}
            if active == "rollout":
                parts["rollout (generating)"] = rollout.active
            else:
                parts[f"{active} (active)"] = roles[active].active
            for other in members:
                if other == active or other == "rollout":
                    continue  # a colocated rollout engine sleeps outside generation
                if not roles[other].offload:
                    parts[f"{other} (resident)"] = roles[other].resident
            parts[f"{len(members)} CUDA contexts"] = overhead_gib * GIB * len(members)
            ph = Phase(pool.index, active, parts, limit)
            phases.append(ph)
            if ph.fits:
                continue
            resident = [o for o in members if o not in (active, "rollout")
                        and not roles[o].offload]
            parts_txt = " + ".join(f"{k} {v / GIB:.1f}" for k, v in parts.items())
            if active == "rollout":
                fix = (f"lower rollout.gpu_memory_utilization"
                       + (f" or set offload: true on {', '.join(resident)}" if resident else ""))
            else:
                fix = _advice(roles[active], resident)
            where = f" (colocated with {', '.join(o for o in members if o != active)})" \
                if shared else ""
            problems.append(
                f"{active} does not fit{where}: its phase needs {ph.total / GIB:.1f} GiB per GPU "
                f"({parts_txt}) but cluster.gpu_memory_gib = {job.cluster.gpu_memory_gib:g}; "
                f"{fix}")
    sync = None
    if rollout is not None and "actor" in roles:
        sync = estimate_sync(job, placement, roles["actor"], rollout)
        bare = sorted(set(placement.role("rollout").slots) - set(placement.role("actor").slots),
                      key=lambda x: (x.node, x.gpu))
        if sync.colocated and bare and job.cluster.device != "cpu":
            problems.append(
                f"the weight sync cannot reach the rollout GPUs {format_slots(tuple(bare))}: "
                "colocated on GPUs it hands each bucket to a rollout worker from the actor rank "
                "on the same GPU (CUDA IPC), and those GPUs hold no actor rank; give the actor "
                f"as many GPUs as the rollout (actor.num_gpus = {job.rollout.num_gpus}) or use "
                "cluster.placement: split")
        _sync_phases(job, placement, roles, rollout, sync, overhead_gib, limit, phases,
                     problems)
    host: dict[int, float] = {}
    for name, est in roles.items():
        if est.offload:
            for slot in placement.roles[name].slots:
                host[slot.node] = host.get(slot.node, 0.0) + est.resident
    return Plan(job, placement, roles, rollout, phases, problems, host, sync)


def _sync_phases(job, placement, roles, rollout, sync, overhead_gib, limit, phases, problems):
    """The weight sync's phase on the actor's pool (and the rollout's, when split)."""
    actor = roles["actor"]
    pools = [placement.role("actor").pool]
    if not sync.colocated:
        pools.append(placement.role("rollout").pool)
    for pool_index in pools:
        pool = placement.pools[pool_index]
        parts: dict[str, float] = {}
        if "actor" in pool.roles:
            if sync.colocated and actor.offload:
                parts["actor weights"] = max(st.weights for st in actor.stages)
            else:
                parts["actor (resident)"] = actor.resident
            parts["bucket (trainer)"] = sync.bucket_bytes
        if "rollout" in pool.roles:
            if sync.colocated:
                parts["vLLM weights" if rollout.engine == "vllm" else "rollout weights"] = \
                    rollout.weights
                parts["bucket (rollout copy)"] = sync.bucket_bytes
            else:
                parts["rollout (awake)"] = rollout.share
                parts["buckets in flight (rollout)"] = job.rollout.weight_sync_bucket_mib * 2**20
        for other in pool.roles:
            if other not in ("actor", "rollout") and not roles[other].offload:
                parts[f"{other} (resident)"] = roles[other].resident
        parts[f"{len(pool.roles)} CUDA contexts"] = overhead_gib * GIB * len(pool.roles)
        ph = Phase(pool_index, "weight sync", parts, limit)
        phases.append(ph)
        if ph.fits:
            continue
        parts_txt = " + ".join(f"{k} {v / GIB:.1f}" for k, v in parts.items())
        fix = ("lower rollout.weight_sync_bucket_mib, raise rollout.tp (vLLM's weights per "
               "GPU) or actor.parallel.pp / ep (the actor's weights per GPU)")
        if not actor.offload and sync.colocated:
            fix = "set offload: true on actor (a sync then brings back its weights only); " + fix
        problems.append(
            f"the weight sync does not fit (pool {pool_index}): it needs {ph.total / GIB:.1f} GiB "
            f"per GPU ({parts_txt}) but cluster.gpu_memory_gib = {job.cluster.gpu_memory_gib:g}; "
            f"{fix}")


def format_sync(sync: SyncEstimate) -> list[str]:
    """The weight sync's cost model, beside the peers' published figures."""
    gb = 1e9
    how = ("CUDA IPC on each GPU after a broadcast of each bucket over the actor's ranks"
           if sync.colocated else "a broadcast from each owner to every rollout worker")
    link = f"IB {IB_GB_S:g} GB/s per node" if sync.multi_node else \
        f"NVLink {NVLINK_GB_S:g} GB/s per GPU"
    return [
        f"weight sync: {sync.total_bytes / gb:.1f} GB per update from {sync.owners} owner "
        f"rank(s) sending {sync.total_bytes / sync.owners / gb:.2f} GB each concurrently "
        f"(buckets of {sync.bucket_bytes / 2**20:.0f} MiB), {how}",
        f"  per link: each receiving node takes {sync.total_bytes / gb:.1f} GB once; each owner "
        f"gathers {sync.total_bytes / sync.owners / gb:.2f} GB over NVLink inside its stage",
        f"  estimate: {sync.seconds:.2f} s (gather {sync.gather_s:.2f} + wire {sync.wire_s:.2f} "
        f"at {link} + control {sync.control_s:.2f} at {CONTROL_RTT_S * 1e3:.0f} ms a round "
        f"trip{', one per bucket' if sync.colocated and sync.bucket_bytes else ''}; vLLM's "
        f"reload not modelled); the previous path (every byte through one host process to "
        f"{sync.replicas} replica(s) at ~{HOST_GB_S:g} GB/s): ~{sync.previous_s:.0f} s",
        "  published: " + "; ".join(PEER_SYNC_FIGURES),
    ]


def check_plan(job: JobConfig) -> Plan:
    """:func:`make_plan`, raising :class:`PlanError` when something does not fit."""
    plan = make_plan(job)
    if not plan.fits:
        raise PlanError("the job does not fit the GPUs:\n  - " + "\n  - ".join(plan.problems))
    return plan


# ------------------------------------------------------------------------------ printing
def _g(x: float) -> str:
    return f"{x / GIB:.1f}"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def _bytes_per_param(job: JobConfig, name: str, est: RoleEstimate) -> str:
    """``weights 2 + grads 4 + optimizer 12/2 = 12 bytes per parameter`` for one role."""
    rc = active_roles(job)[name]
    dtype = (job.role_model(name) if rc.model is None else rc.model).dtype
    w = _DTYPE_BYTES[dtype]
    if not est.trained:
        return f"weights {w} ({dtype}) bytes per parameter, frozen (no grads or optimizer)"
    opt = rc.optimizer
    main = 0 if dtype == "fp32" else 4
    moments = 8 if opt.name == "adam" else 4
    d = est.layout.dp * est.layout.cp
    if opt.use_distributed_optimizer:
        o = f"{main + moments}/{d}"
        total = w + 4 + (main + moments) / d
        how = f"DistributedOptimizer over DP*CP = {d}"
    else:
        o = f"{main + moments}"
        total = w + 4 + main + moments
        how = "not sharded"
    text = (f"weights {w} ({dtype}) + grads 4 (fp32 DDP buffer) + optimizer {o} (fp32 main "
            f"params {main} + {opt.name} state {moments}, {how}) = {total:g} bytes per parameter")
    n_exp = est.worst.expert_params
    if n_exp and opt.use_distributed_optimizer:
        e = est.layout.edp
        text += (f"; its {_count(n_exp)} expert parameters per GPU (EP{est.layout.ep}/ETP"
                 f"{est.layout.expert_tp}) shard the optimizer over expert-DP = {e}: "
                 f"{w + 4 + (main + moments) / e:g} bytes each")
    return text


def _table(rows: list[list[str]], right: set[int] = frozenset()) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.rjust(widths[i]) if i in right else c.ljust(widths[i])
                             for i, c in enumerate(r)).rstrip() for r in rows]


def node_rows(plan: Plan) -> list[list[str]]:
    """One row per (logical node, role): which ranks (rollout: replicas) of the role it holds,
    and their pipeline stages / data-parallel replicas / context-parallel ranks."""
    pl, rows = plan.placement, []
    for node in pl.nodes:
        for name in pl.roles:
            units = pl.units_on(name, node)
            if not units:
                continue
            rp = pl.roles[name]
            gpus = "GPU" + ("s " if len(rp.slots) > 1 else " ") + format_runs(sorted(
                {s.gpu for s in rp.slots if s.node == node}))
            if name == "rollout":
                what = f"replica{'s' if len(units) > 1 else ''} {format_runs(units)}"
                where = f"TP{rp.tp} each"
            else:
                layout = plan.roles[name].layout
                what = f"rank{'s' if len(units) > 1 else ''} {format_runs(units)}"
                coords = [layout.coords(r) for r in units]
                parts = [f"{k} {format_runs(sorted({c[k] for c in coords}))}"
                         for k, size in (("pp", layout.pp), ("dp", layout.dp), ("cp", layout.cp))
                         if size > 1]
                where = ", ".join(parts) or "the whole role"
                if 0 in units:
                    where += "; rendezvous (rank 0)"
            rows.append([f"n{node}", name, gpus, what, where])
    return rows


def format_plan(plan: Plan) -> str:
    """The plan as printed by ``megarlhf plan``."""
    job, pl = plan.job, plan.placement
    out = [f"# {job.kind} job {job.name!r}: {job.cluster.num_nodes} node(s) x "
           f"{job.cluster.gpus_per_node} GPUs of {job.cluster.gpu_memory_gib:g} GiB",
           pl.describe(), "", "roles:"]
    rows = [["role", "model", "GPUs", "layout", "colocated with", "offload"]]
    for name, rp in pl.roles.items():
        if name == "rollout":
            r = job.rollout
            model = _count(plan.rollout.model_params)
            layout = f"{plan.rollout.engine} TP{r.tp} x {r.num_replicas} replicas"
            off = "sleeps" if pl.colocated_with(name) else "-"
        else:
            est = plan.roles[name]
            model = f"{_count(est.model_params)} {est.head}"
            layout = est.layout.describe()
            off = "yes" if est.offload else "no"
        rows.append([name, model, format_slots(rp.slots), layout,
                     ", ".join(pl.colocated_with(name)) or "-", off])
    out += _table(rows)
    if len(pl.nodes) > 1:
        out += ["", "ranks per node (rank r of a role on its GPU r, TP fastest, then CP, DP, PP; "
                    "each role's rank 0 hosts its rendezvous):"]
        out += _table(node_rows(plan))
    out += ["", "memory per GPU, GiB (worst pipeline stage; formulas: megarlhf/planning/plan.py)"]
    rows = [["role", "params/GPU", "weights", "grads", "optim", "activ", "total", "micro-batch"]]
    for name, est in plan.roles.items():
        w = est.worst
        b, s = est.micro_batch
        mb = (f"{b} x {s} tok, {est.in_flight} in flight, recompute {est.recompute}"
              f"{', flash attn' if est.flash else ''}" if est.trained
              else f"{b} x {s} tok, forward only")
        rows.append([name, _count(w.params), _g(w.weights), _g(w.grads), _g(w.optimizer),
                     _g(w.activations), _g(w.total), mb])
    if plan.rollout is not None:
        r = plan.rollout
        if r.engine == "vllm":
            note = (f"vLLM share = weights + {VLLM_WORKSPACE_GIB:g} workspace + KV "
                    f"{_g(max(r.kv, 0))} (~{r.kv_tokens / 1e3:.0f}k tokens per replica, "
                    f"{r.kv_tokens / r.seq_len:.0f} sequences of {r.seq_len})")
        else:
            note = f"transformers engine: weights + KV {_g(r.kv)}"
        rows.append(["rollout", _count(int(r.model_params / r.tp)), _g(r.weights), "-", "-",
                     "-", _g(r.share), note])
    out += _table(rows, right={1, 2, 3, 4, 5, 6})
    for name, est in plan.roles.items():
        out.append(f"  {name}: {_bytes_per_param(job, name, est)}")
    auto = [n for n in plan.roles if _role_model(job, n).transformer_impl == "auto"]
    if auto:
        usable, why = te_status()
        if not usable:
            out.append(
                f"  note: {', '.join(auto)} use model.transformer_impl=auto, estimated with "
                f"Transformer Engine's fused attention (the GPU image has TE; here TE {why}). "
                "Where TE is missing at run time megatron's local layers are built (with a "
                "warning) and every layer stores its attention scores: plan with "
                "<role>.model.transformer_impl=local for that case")
    out += ["", f"phases (what one GPU holds while a role works; limit "
                f"{job.cluster.gpu_memory_gib:g} GiB):"]
    rows = []
    for ph in plan.phases:
        parts = " + ".join(f"{k} {_g(v)}" for k, v in ph.parts.items())
        rows.append([f"pool {ph.pool}", ph.active, _g(ph.total),
                     "ok" if ph.fits else "DOES NOT FIT", parts])
    out += _table(rows, right={2})
    if plan.sync is not None:
        out += [""] + format_sync(plan.sync)
    if plan.host_bytes_per_node:
        vals = sorted(plan.host_bytes_per_node.items())
        if len({round(b) for _, b in vals}) == 1:
            host = f"n{vals[0][0]}-{vals[-1][0]}: {_g(vals[0][1])} each" if len(vals) > 1 \
                else f"n{vals[0][0]}: {_g(vals[0][1])}"
        else:
            host = ", ".join(f"n{n}: {_g(b)}" for n, b in vals)
        out.append(f"  host memory (pinned) for offloaded roles, GiB per node: {host}")
    out.append("")
    if plan.fits:
        peak = max((ph.total for ph in plan.phases), default=0.0)
        out.append(f"fits: peak {_g(peak)} of {job.cluster.gpu_memory_gib:g} GiB per GPU")
    else:
        out.append("DOES NOT FIT:")
        out += [f"  - {p}" for p in plan.problems]
    return "\n".join(out)
