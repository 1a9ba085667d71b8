"""The training engine around one megatron model: scoring and training through the pipeline schedules.

One engine per model role on every rank of the role. It plugs megarlhf's computations into
megatron's pipeline-schedule contract ``forward_step(data_iterator, model) -> (output, loss_fn)``
so the same code runs without pipelining, with 1F1B and with the interleaved (virtual) schedule:

* :meth:`MegatronEngine.forward` — forward-only scoring: per-token log-probs and entropy of the
  given tokens (through the vocabulary-parallel core, never gathering the vocabulary) for LM
  heads, per-token values for scalar heads;
* :meth:`MegatronEngine.train_step` — one optimizer step over a batch: the caller's loss function
  receives the per-token outputs of each micro-batch (with gradients) and returns a loss that is
  already normalised by a *global* count (see ``megarlhf.rl.losses.aggregate``), so summing over
  micro-batches and data-parallel ranks gives the exact global loss. Megatron is configured not
  to rescale (``calculate_per_token_loss``) nor to average gradients over data parallelism.
* :meth:`offload` / :meth:`onload` move weights, gradients and optimizer state to host memory
  and back so roles can share a GPU.

Mixture-of-experts models: :mod:`megarlhf.engine.moe` scales megatron's load-balancing aux
loss to the same global normalisation, adds per-layer router metrics to a step's metrics and,
with ``model.moe_routing_replay``, replays the batch's ``routed_experts``.

Every rank of the role calls the same method with the same batch (the data-parallel shard of
this rank, see :meth:`TokenBatch.shard`); results are returned on every rank.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from megarlhf.config.schema import OptimizerConfig
from megarlhf.engine.batch import (
    MicroBatch,
    TokenBatch,
    make_micro_batches,
    pad_micro_batches_uniform,
)
from megarlhf.engine.loss_fns import loss_needs, make_loss_fn
from megarlhf.engine.moe import MoEHooks
from megarlhf.engine.vocab_parallel import vocab_parallel_logprobs_entropy
from megarlhf.models.builder import ModelBundle
from megarlhf.parallel.layout import uses_gloo_groups
from megarlhf.platform import current_platform

LossFn = Callable[[dict[str, Tensor], MicroBatch], tuple[Tensor, dict[str, Tensor]]]


@dataclass
class StepResult:
    """What one training step reports (identical on every rank of the role)."""

    metrics: dict[str, float]  # additive metrics summed over micro-batches and DP ranks
    grad_norm: float
    lr: float
    num_micro_batches: int
    seconds: float
    skipped: bool = False  # the optimizer skipped the step (fp16 overflow / non-finite grads)


class MegatronEngine:
    """Scoring and training of one role's model on this rank.

    Args:
        bundle: this rank's model (built with ``for_training=True`` when ``optimizer`` is given).
        optimizer: optimizer config; None for frozen roles (reference, reward model scoring).
        total_steps: optimizer steps of the job (the LR schedule's decay length by default).
        micro_batch_size: sequences per micro-batch (unpacked mode).
        max_tokens_per_micro_batch: token budget per micro-batch (packed mode); overrides the
            micro-batch size when set.
        pad_id: token id used for padding.
    """

    def __init__(self, bundle: ModelBundle, optimizer: OptimizerConfig | None = None, *,
                 total_steps: int = 1, micro_batch_size: int = 1,
                 max_tokens_per_micro_batch: int | None = None, pad_id: int = 0):
        self.bundle = bundle
        self.ctx = bundle.ctx
        self.config = bundle.config
        self.micro_batch_size = micro_batch_size
        self.max_tokens = max_tokens_per_micro_batch
        self.pad_id = pad_id
        self.optimizer = None
        self.scheduler = None
        self._offloaded: list[tuple[Any, Tensor]] | None = None
        self.moe = None
        if bundle.spec.moe is not None:
            self.moe = MoEHooks(bundle)
        if optimizer is not None:
            self._build_optimizer(optimizer, total_steps)

    # ------------------------------------------------------------------ set-up
    def _build_optimizer(self, cfg: OptimizerConfig, total_steps: int) -> None:
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig as MOptimizerConfig
        from megatron.core.optimizer import get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        c = self.config
        mcfg = MOptimizerConfig(
            optimizer=cfg.name,
            lr=cfg.lr,
            min_lr=cfg.min_lr,
            weight_decay=cfg.weight_decay,
            adam_beta1=cfg.adam_beta1,
            adam_beta2=cfg.adam_beta2,
            adam_eps=cfg.adam_eps,
            clip_grad=cfg.clip_grad,
            bf16=c.bf16,
            fp16=c.fp16,
            params_dtype=c.params_dtype,
            use_distributed_optimizer=cfg.use_distributed_optimizer,
            # fp16: dynamic loss scaling; bf16 / fp32 need none.
            initial_loss_scale=2.0 ** 16 if c.fp16 else None,
        )
        # megatron's own process groups (set up by initialize_parallel); passing pg_collection
        # would disable the gloo groups the DistributedOptimizer uses for checkpointing.
        self.optimizer = get_megatron_optimizer(mcfg, self.bundle.chunks,
                                                use_gloo_process_groups=uses_gloo_groups())
        decay = cfg.lr_decay_steps or max(total_steps, 1)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0 if cfg.lr_warmup_steps > 0 else cfg.lr,
            max_lr=cfg.lr,
            min_lr=cfg.min_lr,
            lr_warmup_steps=cfg.lr_warmup_steps,
            lr_decay_steps=max(decay, cfg.lr_warmup_steps + 1),
            lr_decay_style=cfg.lr_decay_style,
            start_wd=cfg.weight_decay,
            end_wd=cfg.weight_decay,
            wd_incr_steps=max(decay, 1),
            wd_incr_style="constant",
        )
        c.grad_scale_func = self.optimizer.scale_loss

        def finalize(model, num_tokens=None, **kwargs):
            # Losses arrive already divided by the global normaliser; megatron must only sum
            # gradients over DP (and sync embeddings / SP norms), never divide by a token count.
            return finalize_model_grads(model, None, **kwargs)

        c.finalize_model_grads_func = finalize

    @property
    def is_lm(self) -> bool:
        return self.bundle.head == "lm"

    # ------------------------------------------------------------------ micro-batches
    def micro_batches(self, batch: TokenBatch, group_size: int = 1) -> list[MicroBatch]:
        lay = self.ctx.layout
        pad_multiple = lay.tp if lay.sequence_parallel else 1
        if lay.cp > 1:
            pad_multiple = max(pad_multiple, 2 * lay.cp)
        mult = lay.pp if lay.vpp > 1 else 1

        def make(min_count: int = 1) -> list[MicroBatch]:
            if self.max_tokens is not None:
                return make_micro_batches(batch, max_tokens=self.max_tokens,
                                          pad_multiple=pad_multiple, pad_id=self.pad_id,
                                          micro_batch_multiple=mult, group_size=group_size,
                                          min_micro_batches=min_count)
            return make_micro_batches(batch, micro_batch_size=self.micro_batch_size,
                                      pad_multiple=pad_multiple, pad_id=self.pad_id,
                                      micro_batch_multiple=mult, group_size=group_size,
                                      min_micro_batches=min_count)

        mbs = make()
        shape = None
        if self.moe is not None and lay.ep > 1 and lay.dp * lay.cp > 1:
            # An expert-parallel group spans data-parallel ranks, and every MoE layer exchanges
            # tokens across it: its ranks must run the same number of micro-batches (empty
            # fillers make up the difference) and, with the allgather dispatcher, the same
            # shapes (it gathers equal-sized blocks).
            t = torch.tensor([len(mbs), max(m.input_ids.shape[0] for m in mbs),
                              max(m.input_ids.shape[1] for m in mbs)], device=self._device())
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX,
                                         group=self.ctx.dp_cp_group)
            count, rows, length = (int(x) for x in t.tolist())
            if count > len(mbs):
                mbs = make(count)
            if self.config.moe_token_dispatcher_type == "allgather":
                shape = (rows, length)
        if lay.vpp > 1 or shape is not None:
            # The interleaved schedule exchanges fixed shapes (variable lengths unsupported).
            mbs = pad_micro_batches_uniform(mbs, self.pad_id, shape=shape)
        return mbs

    # ------------------------------------------------------------------ the schedule
    def _forward_step(self, loss_impl, data_iterator, model):
        mb: MicroBatch = next(data_iterator)
        kwargs = {}
        attention_mask = mb.attention_mask
        if mb.packed and self.bundle.te:
            from megatron.core.packed_seq_params import PackedSeqParams

            cu = mb.cu_seqlens.to(mb.input_ids.device if torch.cuda.is_available() else "cpu")
            kwargs["packed_seq_params"] = PackedSeqParams(
                qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                max_seqlen_q=mb.max_seqlen, max_seqlen_kv=mb.max_seqlen)
            attention_mask = None
        if self.moe is not None:
            self.moe.before_forward(mb, model)
            pad = self.moe.padding_mask(mb, model)
            if pad is not None:
                kwargs["padding_mask"] = pad.to(self._device())
        dev = self._device()
        ids = mb.input_ids.to(dev)
        pos = mb.position_ids.to(dev)
        if attention_mask is not None:
            attention_mask = attention_mask.to(dev)
        out = model(ids, pos, attention_mask, **kwargs)
        return out, partial(loss_impl, mb)

    def _device(self):
        return current_platform().device

    def _outputs(self, output: Tensor, mb: MicroBatch, temperature: float,
                 want_entropy: bool) -> dict[str, Tensor]:
        """Per-token outputs (b, s), aligned with the tokens, from the last stage's output."""
        if self.is_lm:
            ids = mb.input_ids.to(output.device)
            logits = output[:, :-1]  # (b, s-1, V/tp): predicts tokens 1..s-1
            lp, ent = vocab_parallel_logprobs_entropy(
                logits, ids[:, 1:], self.ctx.tp_group if self.ctx.layout.tp > 1 else None,
                temperature=temperature, vocab_size=self.bundle.spec.vocab_size,
                compute_entropy=want_entropy)
            out = {"logp": F.pad(lp, (1, 0))}  # (b, s)
            if want_entropy:
                out["entropy"] = F.pad(ent, (1, 0))
            if mb.packed:
                # The first token of each packed sequence was "predicted" from the previous
                # sequence's last token: meaningless, zero it like position 0 of a row.
                keep = torch.ones_like(out["logp"], dtype=torch.bool)
                for _, row, start, _ in mb.placement:
                    keep[row, start] = False
                out = {k: v * keep for k, v in out.items()}
            return out
        return {"values": output[..., 0].float()}  # (b, s)

    def _run(self, mbs: list[MicroBatch], forward_only: bool, loss_impl) -> list[Any]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        lay = self.ctx.layout
        fb = get_forward_backward_func()
        if lay.vpp > 1:
            data = [iter(mbs) for _ in self.bundle.chunks]
            model = self.bundle.chunks
        else:
            data = iter(mbs)
            model = self.bundle.chunks[0]
        seq = max(m.input_ids.shape[1] for m in mbs)
        mbsz = max(m.input_ids.shape[0] for m in mbs)
        return fb(
            forward_step_func=partial(self._forward_step, loss_impl),
            data_iterator=data,
            model=model,
            num_microbatches=len(mbs),
            seq_length=seq,
            micro_batch_size=mbsz,
            forward_only=forward_only,
        )

    def _broadcast_from_last_stage(self, obj: Any) -> Any:
        if self.ctx.layout.pp == 1:
            return obj
        src = self.ctx.pp_stage_rank(self.ctx.layout.pp - 1)
        box = [obj if self.ctx.is_last_stage else None]
        torch.distributed.broadcast_object_list(box, src=src, group=self.ctx.pp_group)
        return box[0]

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def forward(self, batch: TokenBatch, *, temperature: float = 1.0,
                entropy: bool = False) -> dict[str, Tensor]:
        """Per-token outputs for ``batch`` (forward only), returned on every rank.

        Returns (all ``(B, S)`` float32, zero at padding and at position 0):
            LM head: ``logp`` (log p(x_t | x_<t) under ``logits / temperature``) and, with
            ``entropy=True``, ``entropy`` of that distribution. Scalar head: ``values``.
        """
        self._check_onloaded()
        for c in self.bundle.chunks:
            c.eval()
        mbs = self.micro_batches(batch)

        def loss_impl(mb, output):
            out = self._outputs(output, mb, temperature, entropy)
            return torch.zeros((), device=output.device), torch.tensor(1), {
                k: v.detach().cpu() for k, v in out.items()}

        if self.moe is not None:
            self.moe.begin(mbs, training=False)
        stored = self._run(mbs, True, loss_impl)
        if self.moe is not None:
            self.moe.end_forward()
        result = None
        if self.ctx.is_last_stage:
            B, S = batch.input_ids.shape
            keys = stored[0].keys() if stored else []
            result = {k: torch.zeros((B, S), dtype=torch.float32) for k in keys}
            for mb, d in zip(mbs, stored):
                for k, v in d.items():
                    mb.unpack(v, result[k])
            for k in result:
                result[k] *= batch.attention_mask
        return self._broadcast_from_last_stage(result)

    # ------------------------------------------------------------------ training
    def train_step(self, batch: TokenBatch, loss_fn: LossFn, *, temperature: float = 1.0,
                   entropy: bool = False, group_size: int = 1) -> StepResult:
        """One optimizer step on ``batch`` (this rank's data-parallel shard).

        ``loss_fn(outputs, micro_batch) -> (loss, metrics)`` gets the per-token outputs of a
        micro-batch (``logp``/``entropy`` or ``values``, ``(b, s)`` with gradients) and the
        micro-batch (its ``fields`` hold the batch's per-token and per-sequence data, packed the
        same way). The loss and every metric must be normalised by global counts so that sums
        over micro-batches and data-parallel ranks are the global values. ``group_size``
        consecutive sequences stay in one micro-batch (reward-model pairs, DPO groups).
        """
        if self.optimizer is None:
            raise RuntimeError("this engine has no optimizer (a frozen role); build it with one")
        self._check_onloaded()
        t0 = time.perf_counter()
        for c in self.bundle.chunks:
            c.train()
            c.zero_grad_buffer()
        self.optimizer.zero_grad()
        mbs = self.micro_batches(batch, group_size)

        def loss_impl(mb, output):
            out = self._outputs(output, mb, temperature, entropy)
            if not mb.placement:  # an empty filler micro-batch: no loss, keep the graph
                return output.sum() * 0.0, torch.tensor(1), {}
            loss, metrics = loss_fn(out, mb)
            return loss, torch.tensor(1), {k: v.detach().float().cpu() for k, v in
                                           metrics.items()}

        if self.moe is not None:
            self.moe.begin(mbs, training=True)
        stored = self._run(mbs, False, loss_impl)
        moe_metrics = self.moe.end() if self.moe is not None else {}
        metrics: dict[str, float] | None = None
        if self.ctx.is_last_stage:
            keys = sorted({k for d in stored for k in d})
            local = torch.tensor([sum(float(d.get(k, 0.0)) for d in stored) for k in keys],
                                 dtype=torch.float64)
            if self.ctx.layout.dp * self.ctx.layout.cp > 1 and keys:
                torch.distributed.all_reduce(local, group=self.ctx.dp_cp_group)
            metrics = dict(zip(keys, local.tolist()))
        metrics = self._broadcast_from_last_stage(metrics)
        ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=1)
        lr = self.optimizer.param_groups[0]["lr"]
        metrics = dict(metrics or {}, **moe_metrics)  # router metrics: already global
        return StepResult(metrics=metrics, grad_norm=float(grad_norm or 0.0), lr=float(lr),
                          num_micro_batches=len(mbs), seconds=time.perf_counter() - t0,
                          skipped=not ok)

    def train(self, batch: TokenBatch, spec) -> StepResult:
        """One optimizer step with the loss described by ``spec`` (see engine.loss_fns)."""
        return self.train_step(batch, make_loss_fn(spec), **loss_needs(spec))

    # ------------------------------------------------------------------ offload / onload
    def _offloadable_tensors(self) -> list[Tensor]:
        tensors: list[Tensor] = []
        for c in self.bundle.chunks:
            buffers = getattr(c, "buffers", None)
            if buffers is not None and not callable(buffers):
                for b in buffers:
                    # Without the DistributedOptimizer megatron keeps no contiguous param buffer
                    # (param_data is None): the parameters are separate tensors.
                    if b.param_data is not None:
                        tensors.append(b.param_data)
                    else:
                        tensors.extend(p.data for p in b.params)
                    tensors.append(b.grad_data)
            else:
                tensors.extend(p.data for p in c.parameters())
        if self.optimizer is not None:
            for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
                inner = getattr(opt, "optimizer", None)
                if inner is not None:
                    for state in inner.state.values():
                        tensors.extend(v for v in state.values() if torch.is_tensor(v)
                                       and v.numel() > 1)
                    for g in inner.param_groups:
                        tensors.extend(p.data for p in g["params"])
                for attr in ("shard_fp32_from_float16_groups", "fp32_from_float16_groups"):
                    for group in getattr(opt, attr, []) or []:
                        tensors.extend(p.data for p in group if p is not None)
        return tensors

    @torch.no_grad()
    def offload(self) -> int:
        """Moves weights, grads and optimizer state to host memory; returns bytes moved.

        Each distinct storage is copied to (pinned, on CUDA) host memory and the device storage
        is resized to zero; views into it (parameters inside megatron's DDP buffers, optimizer
        shards) stay valid and come back with :meth:`onload`.
        """
        if self._offloaded is not None:
            # Only the weights came back (onload(weights_only=True), a weight sync reads them
            # and changes nothing): drop them again, their host copies are still current.
            for st, host, weight in self._offloaded:
                if st.nbytes() and weight:
                    st.resize_(0)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return 0
        seen: dict[int, Any] = {}
        for t in self._offloadable_tensors():
            st = t.untyped_storage()
            if st.nbytes() == 0 or st.data_ptr() in seen:
                continue
            seen[st.data_ptr()] = st
        weights = {p.data.untyped_storage().data_ptr() for c in self.bundle.chunks
                   for p in c.parameters()}
        saved = []
        pin = torch.cuda.is_available()
        total = 0
        for ptr, st in seen.items():
            host = torch.empty(st.nbytes(), dtype=torch.uint8, pin_memory=pin)
            host.untyped_storage().copy_(st)
            total += st.nbytes()
            saved.append((st, host, ptr in weights))
            st.resize_(0)
        self._offloaded = saved
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return total

    @torch.no_grad()
    def onload(self, weights_only: bool = False) -> int:
        """Restores what :meth:`offload` moved; returns bytes moved.

        Args:
            weights_only: bring back the model's weights only (gradients and optimizer state
                stay in host memory): what a weight sync needs, for a colocated actor whose
                full state would not fit next to the rollout engine's weights. The engine
                counts as offloaded until a full ``onload()``; ``offload()`` drops the weights
                again without copying (they did not change).
        """
        if self._offloaded is None:
            return 0
        total = 0
        for st, host, weight in self._offloaded:
            if st.nbytes() or (weights_only and not weight):
                continue  # back already, or not asked for
            st.resize_(host.numel())
            st.copy_(host.untyped_storage())
            total += host.numel()
        if not weights_only:
            self._offloaded = None
        return total

    @property
    def offloaded(self) -> bool:
        return self._offloaded is not None

    def _check_onloaded(self) -> None:
        if self._offloaded is not None:
            raise RuntimeError("the engine's model is offloaded to host memory; call onload() "
                               "before scoring or training")
