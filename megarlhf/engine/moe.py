"""The engine around megatron's MoE layers: aux-loss scaling, router metrics, routing replay.

One :class:`MoEHooks` per engine of an MoE model (``bundle.spec.moe`` set). The engine calls
:meth:`~MoEHooks.begin` before a step's schedule, :meth:`~MoEHooks.before_forward` in every
micro-batch's forward step and :meth:`~MoEHooks.end` after the schedule.

Load-balancing aux loss
    megatron's router adds ``coeff * aux_mb`` per layer and micro-batch (Switch-style:
    ``E * sum_e f_e * P_e``) through ``MoEAuxLossAutoScaler``. With ``calculate_per_token_loss``
    (which the engine sets: its losses arrive already divided by a global count) megatron also
    multiplies each micro-batch's aux loss by the router's token count ``n_mb`` and leaves the
    division by the step's token count to ``finalize_model_grads`` - a division the engine does
    not ask for (its ``finalize`` divides by nothing). So :meth:`begin` divides the coefficient
    by that count, ``N = sum over micro-batches and DP ranks of n_mb`` (tokens a router sees on
    one TP rank: ``b*s``, or ``b*s/tp`` with sequence parallelism), which makes the gradient
    that of ``coeff * sum_mb n_mb * aux_mb / N``: the token-weighted mean of the micro-batches'
    aux losses, whatever the micro-batching and the DP size. Padding tokens take no part: the
    engine passes megatron the micro-batch's padding mask (:meth:`MoEHooks.padding_mask`), so
    the routers leave them out of the aux loss (``f_e``, ``P_e`` and the token count megatron
    scales by), and ``N`` counts real tokens only.

Router metrics (per global layer ``L``, over the step's real tokens, every rank of the role)
    ``moe/layer_L/max_expert_load``  share of the step's (token, slot) assignments that went
    to the busiest expert (uniform routing: 1/E); ``moe/layer_L/load_imbalance`` busiest
    expert's tokens over the mean (1 = balanced, E = everything on one expert);
    ``moe/layer_L/aux_loss`` the layer's aux loss (without the coefficient), mean over the
    step's micro-batches, when the aux loss is on. ``moe/max_expert_load`` and
    ``moe/load_imbalance`` are the worst layer's, ``moe/aux_loss`` the mean over layers.

Routing replay (``model.moe_routing_replay``)
    The batch carries ``routed_experts``: integer ``(B, S, L, k)``, row ``[i, t, l]`` = the k
    experts (global ids) layer ``l`` chose for token ``t`` of sequence ``i`` when that token
    went through the rollout engine; ``-1`` anywhere in a row means "not known" (padding, a
    final token the engine sampled but never fed back) and that token routes itself. Each
    router of this rank then uses those experts instead of its top-k; the combine weights are
    still the router's own probabilities of the given experts (softmax over the k logits with
    renormalised top-k), so gradients reach the router as usual. It goes through megatron's
    hook for this (``moe_enable_routing_replay``: ``router.router_replay.get_replay_topk``),
    with a replay object per router of this model (megatron's keeps one process-wide list).
    Under full recomputation a router runs twice per micro-batch (the forward without
    gradients, the recompute in backward, in the same order): the recompute reuses the
    forward's experts, first in first out.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch

from megarlhf.compat import megatron as megatron_compat
from megarlhf.engine.batch import MicroBatch
from megarlhf.platform import current_platform

ROUTED_EXPERTS = "routed_experts"


class _Replay:
    """Stands in for megatron's ``RouterReplay`` on one router (duck-typed: ``get_replay_topk``).

    ``current``: the expert ids for the tokens of the micro-batch about to run, ``(n, k)`` in
    the router's token order, -1 rows route themselves; None routes every token normally.
    """

    def __init__(self, recompute: bool):
        self.recompute = recompute
        self.current: torch.Tensor | None = None
        self._backlog: deque = deque()

    def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None,
                        default_compute_topk=None):
        recomputing = self.recompute and torch.is_grad_enabled()
        if recomputing:
            target = self._backlog.popleft() if self._backlog else None
        else:
            target = self.current
            if self.recompute and _Replay.grad_step:
                self._backlog.append(target)  # for the recompute of this forward in backward
        probs, idx = default_compute_topk(scores, topk, num_groups=num_groups,
                                          group_topk=group_topk)
        if target is not None:
            target = target.to(scores.device)
            if target.shape != idx.shape:
                raise ValueError(
                    f"routing replay: {tuple(target.shape)} expert ids given for a router that "
                    f"routes {tuple(idx.shape)} (tokens, top-k) here")
            use = (target >= 0).all(dim=1, keepdim=True)
            idx = torch.where(use, target.long(), idx)
            probs = scores.gather(1, idx)
        return probs, idx

    grad_step = False  # a training step is running (set by MoEHooks.begin / end)

    def clear(self) -> None:
        self.current = None
        self._backlog.clear()


class MoEHooks:
    """Aux-loss scaling, router metrics and routing replay for one role's MoE model."""

    def __init__(self, bundle):
        from megatron.core.transformer.moe.router import TopKRouter

        megatron_compat.fix_token_count()  # the aux loss's token count (compat.megatron)
        if bundle.spec.moe.expert_bias:
            megatron_compat.fix_expert_bias_padding()  # expert loads without padding (compat)

        self.bundle = bundle
        self.ctx = bundle.ctx
        self.config = bundle.config
        self.spec = bundle.spec
        self.num_experts = self.spec.moe.num_experts
        self.topk = self.spec.moe.topk
        self.base_coeff = float(self.config.moe_aux_loss_coeff or 0.0)
        self.recompute = self.config.recompute_granularity == "full"
        self.sp_size = self.ctx.layout.tp if self.ctx.layout.sequence_parallel else 1
        # (chunk, global layer (0-based), router)
        self.routers: list[tuple[int, int, Any]] = []
        for ci, chunk in enumerate(bundle.unwrapped()):
            for layer in getattr(chunk.decoder, "layers", []):
                router = getattr(getattr(layer, "mlp", None), "router", None)
                if isinstance(router, TopKRouter):
                    self.routers.append((ci, layer.layer_number - 1, router))
        self.replay_enabled = bool(getattr(self.config, "moe_enable_routing_replay", False))
        self._replays: dict[int, _Replay] = {}
        if self.replay_enabled:
            for _, gl, router in self.routers:
                megatron_compat.replace_router_replay(
                    router, self._replays.setdefault(gl, _Replay(self.recompute)))
        self._chunk_of = {id(c): i for i, c in enumerate(bundle.chunks)}
        self._chunk_of.update({id(c): i for i, c in enumerate(bundle.unwrapped())})
        self._valid: dict[int, torch.Tensor | None] = {}  # chunk -> router-order token mask
        self._counts = torch.zeros(self.spec.num_layers, self.num_experts, dtype=torch.float64)
        self._micro_batches = 0
        self._counting = False
        for ci, gl, router in self.routers:
            router.register_forward_hook(self._make_hook(ci, gl))

    # ------------------------------------------------------------------ per step
    def begin(self, mbs: list[MicroBatch], training: bool) -> None:
        """Before a schedule: scale the aux-loss coefficient, reset the metrics."""
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

        self._counts.zero_()
        self._micro_batches = len(mbs)
        self._counting = training
        _Replay.grad_step = training
        for r in self._replays.values():
            r.clear()
        clear_aux_losses_tracker()
        if training and self.base_coeff > 0:
            n = torch.tensor([sum(_aux_tokens(m) for m in mbs) / self.sp_size],
                             dtype=torch.float64, device=_device())
            if self.ctx.layout.dp * self.ctx.layout.cp > 1:
                torch.distributed.all_reduce(n, group=self.ctx.dp_cp_group)
            self.config.moe_aux_loss_coeff = self.base_coeff / max(float(n), 1.0)

    def padding_mask(self, mb: MicroBatch, model) -> torch.Tensor | None:
        """``padding_mask`` for megatron's ``GPTModel.forward``: ``(b, s)`` bool, True where the
        micro-batch holds no token (its routers then leave the position out of the aux loss).
        None for an empty filler micro-batch (no real token at all: megatron's aux loss would
        divide by a token count of 0 and turn the step's gradients into NaN); its pad tokens
        are routed and counted as tokens, as :func:`_aux_tokens` says.

        megatron 0.16.1 scatters the mask over the sequence-parallel ranks only on the first
        pipeline stage (``GPTModel._preprocess``, ``pre_process``); a later stage's chunk gets
        it as passed, so there it is this TP rank's block of the sequence already.
        """
        real = _real_tokens(mb)
        if not bool(real.any()):
            return None
        pad = ~real
        chunk = self.bundle.unwrapped()[self._chunk_index(model)]
        if self.sp_size > 1 and not getattr(chunk, "pre_process", True):
            s = pad.shape[1] // self.sp_size
            r = self.ctx.tp_rank
            pad = pad[:, r * s: (r + 1) * s].contiguous()
        return pad

    def before_forward(self, mb: MicroBatch, model) -> None:
        """In a micro-batch's forward step: which tokens are real, and replay targets."""
        ci = self._chunk_index(model)
        self._valid[ci] = self._router_order(_real_tokens(mb))
        if not self.replay_enabled:
            return
        given = mb.fields.get(ROUTED_EXPERTS)
        if given is None:
            raise ValueError(
                f"model.moe_routing_replay is on but the batch has no {ROUTED_EXPERTS!r} field "
                "(B, S, num_layers, top-k expert ids from the rollout engine, -1 = route "
                "yourself); fill it, or turn routing replay off")
        for c, gl, _ in self.routers:
            if c != ci:
                continue
            rep = self._replays[gl]
            if given.dim() != 4 or given.shape[2] != self.spec.num_layers \
                    or given.shape[3] != self.topk:
                raise ValueError(
                    f"routing replay: batch field {ROUTED_EXPERTS!r} must be (B, S, "
                    f"num_layers={self.spec.num_layers}, top-k={self.topk}), got "
                    f"{tuple(given.shape)}")
            t = given[:, :, gl, :].clone()  # (b, s, k)
            t[~_real_tokens(mb)] = -1
            rep.current = self._router_order(t)

    def end(self) -> dict[str, float]:
        """After a training schedule (collective over the role): the step's router metrics."""
        from megatron.core.transformer.moe.moe_utils import (
            clear_aux_losses_tracker,
            get_moe_layer_wise_logging_tracker,
        )

        ctx = self.ctx
        lay = ctx.layout
        _Replay.grad_step = False
        self._counting = False
        if self.base_coeff > 0:
            self.config.moe_aux_loss_coeff = self.base_coeff
        counts = self._counts.clone()
        tracker = get_moe_layer_wise_logging_tracker().get("load_balancing_loss")
        aux = torch.zeros(self.spec.num_layers, dtype=torch.float64)
        has_aux = tracker is not None and self.base_coeff > 0
        if has_aux:
            v = tracker["values"].detach().double().cpu()
            aux[: v.numel()] += v[: aux.numel()]
        clear_aux_losses_tracker()
        data = torch.cat([counts.flatten(), aux]).to(_device())  # NCCL reduces device tensors
        # With SP each TP rank routed its share of the tokens (and holds a partial aux loss);
        # without it every TP rank routed all of them and holds the same numbers.
        if lay.tp > 1 and lay.sequence_parallel:
            torch.distributed.all_reduce(data, group=ctx.tp_group)
        buf = torch.cat([data, torch.tensor([float(self._micro_batches)], dtype=torch.float64,
                                            device=data.device)])
        if lay.dp * lay.cp > 1:
            torch.distributed.all_reduce(buf, group=ctx.dp_cp_group)
        n_mb_total = float(buf[-1])
        data = buf[:-1].contiguous()
        if lay.pp > 1:  # layers live on different stages (each ran the same micro-batches)
            torch.distributed.all_reduce(data, group=ctx.pp_group)
        data = data.cpu()
        E = self.num_experts
        L = self.spec.num_layers
        counts = data[: L * E].view(L, E)
        aux = data[L * E:]
        out: dict[str, float] = {}
        worst_load, worst_imb, aux_sum = 0.0, 0.0, 0.0
        for layer in range(L):
            c = counts[layer]
            total = float(c.sum())
            if total <= 0:
                continue
            load = float(c.max()) / total
            imb = float(c.max()) / (total / E)
            out[f"moe/layer_{layer}/max_expert_load"] = load
            out[f"moe/layer_{layer}/load_imbalance"] = imb
            worst_load, worst_imb = max(worst_load, load), max(worst_imb, imb)
            if has_aux:
                a = float(aux[layer]) / max(n_mb_total, 1.0)
                out[f"moe/layer_{layer}/aux_loss"] = a
                aux_sum += a
        if out:
            out["moe/max_expert_load"] = worst_load
            out["moe/load_imbalance"] = worst_imb
            if has_aux:
                out["moe/aux_loss"] = aux_sum / L
        return out

    def end_forward(self) -> None:
        """After a forward-only schedule: forget replay targets."""
        for r in self._replays.values():
            r.clear()

    # ------------------------------------------------------------------ helpers
    def _router_order(self, t: torch.Tensor) -> torch.Tensor:
        """``(b, s, ...)`` per-token values -> the order a router of this rank sees tokens:
        ``(s, b)`` flattened s-major, this TP rank's sequence block under SP."""
        t = t.transpose(0, 1)  # (s, b, ...)
        if self.sp_size > 1:
            s = t.shape[0] // self.sp_size
            r = self.ctx.tp_rank
            t = t[r * s: (r + 1) * s]
        return t.reshape((-1,) + tuple(t.shape[2:])).contiguous()

    def _chunk_index(self, model) -> int:
        """Which of the bundle's (virtual pipeline) chunks ``model`` is."""
        ci = self._chunk_of.get(id(model))
        if ci is None:
            raise RuntimeError(
                f"MoE hooks: the schedule ran a model object ({type(model).__name__}) that is "
                "none of this engine's chunks (wrapped or not); padding masks and routing "
                "replay would go to the wrong layers")
        return ci

    def _make_hook(self, chunk: int, layer: int):
        def hook(module, inputs, output):
            if not self._counting:
                return
            if self.recompute and torch.is_grad_enabled():
                return  # the recompute of a forward already counted
            routing_map = output[1].detach()
            valid = self._valid.get(chunk)
            if valid is not None:
                if valid.shape[0] != routing_map.shape[0]:
                    raise RuntimeError(
                        f"MoE router metrics: layer {layer} routed {routing_map.shape[0]} tokens "
                        f"but the micro-batch's token mask has {valid.shape[0]} (a layout the "
                        "router-order mask does not cover); the load metrics would count "
                        "padding as tokens")
                routing_map = routing_map[valid.to(routing_map.device)]
            self._counts[layer] += routing_map.sum(dim=0).to("cpu", torch.float64)
        return hook


def _device() -> torch.device:
    return current_platform().device


def _aux_tokens(mb: MicroBatch) -> int:
    """Tokens the routers count in ``mb``'s aux loss: its real tokens, or all of its positions
    for an empty filler micro-batch (see :meth:`MoEHooks.padding_mask`)."""
    n = int(_real_tokens(mb).sum())
    return n if n > 0 else mb.input_ids.numel()


def _real_tokens(mb: MicroBatch) -> torch.Tensor:
    """``(b, s)`` bool: positions holding a token of one of the micro-batch's sequences."""
    real = torch.zeros(mb.input_ids.shape, dtype=torch.bool)
    for _, row, start, n in mb.placement:
        real[row, start: start + n] = True
    return real
