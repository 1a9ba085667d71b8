"""The vLLM side of megarlhf's weight-transfer backend, registered with vLLM's factory.

vLLM 0.32 builds a worker's weight-transfer engine from ``WeightTransferConfig(backend=...)``
through ``WeightTransferEngineFactory`` and drives it with the worker methods
``init_weight_transfer_engine`` / ``start_weight_update`` / ``update_weights`` /
``finish_weight_update`` (``vllm/v1/worker/gpu_worker.py``; vLLM's ``CPUWorker`` inherits them).
This module registers :class:`MegarlhfWeightTransferEngine` as backend ``"megarlhf"`` when it is
imported — in every vLLM worker process, because the worker extension class below
(``worker_extension_cls``) lives here and vLLM imports it before it loads the model and creates
the engine.

The trainer side, the wire and the transfer spec are in :mod:`megarlhf.weights.transfer`: each
owner rank of the trainer broadcasts its share on a group of its own; this engine joins every
owner's group and loads buckets as they arrive, from all owners at once. On top of vLLM's own
reload (``initialize_layerwise_reload`` at start, ``finalize_layerwise_reload`` at finish: the
lifecycle of vLLM's NCCL and IPC engines) it checks what vLLM does not:

* every streamed tensor must be taken by one of vLLM's weight loaders (a name vLLM's model
  does not route is silently skipped by ``load_weights``): reported at finish;
* a layer that received only part of its weights is put back to its previous weights and
  reported (vLLM would process it with the rest uninitialised);
* a tied ``lm_head`` gets the embedding too (vLLM 0.32's layer-wise reload does not carry a new
  embedding into a tied ``lm_head``: measured 0.19 nats off after an update);
* on CPU, reloaded MoE experts are repacked (:mod:`megarlhf.compat.vllm`).

Delta sync (``rollout.weight_sync_delta``, :mod:`megarlhf.weights.delta`): the worker keeps a
host copy of every tensor it last received, applies each owner's patches to it, checks the
owners' checksums, and loads the updated tensors through the same layer-wise reload as a full
sync (vLLM's in-place ``load_checkpoint_weight_patches`` is not usable on its CPU worker, whose
linear weights are prepacked for its GEMM kernels; see that module).

The report of the last update (vLLM's parameters no tensor wrote, tensors and bytes received,
time waiting for the wire and loading) is read with ``collective_rpc("megarlhf_weight_report")``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

from megarlhf.compat import vllm as compat
from megarlhf.weights.transfer import (
    BACKEND_NAME,
    ReceiveStats,
    TransferSpec,
    WeightTransferError,
    decode_ipc,
    delta_mirror_for,
    open_receiver_wires,
    receive_all,
    receive_ipc,
)

TIED_EMBEDDING_NAME = "model.embed_tokens.weight"


@dataclass
class MegarlhfInitInfo(WeightTransferInitInfo):
    """The rendezvous, sent once by the trainer's rank 0 (or by the engine for a local sender).

    Attributes:
        rendezvous: ``[host, port]`` of each owner's group, in owner order.
        world_size: members of each group (1 owner + every rollout worker of every replica).
        rank_offset: this replica's first rank in each group (its workers follow).
        wire: "gloo" or "nccl".
        timeout_s: a silent peer fails the update after this long.
        workers_per_replica: the replica's workers (TP x PP), for the rank computation.
    """

    rendezvous: list = field(default_factory=list)
    world_size: int = 0
    rank_offset: int = 1
    wire: str = "gloo"
    timeout_s: float = 600.0
    workers_per_replica: int = 1


@dataclass
class MegarlhfUpdateInfo(WeightTransferUpdateInfo):
    """One ``update_weights`` call: what arrives (a :class:`TransferSpec` as a dict) and the
    weight version it belongs to."""

    spec: dict = field(default_factory=dict)
    version: int | None = None
    ipc_handles: bytes | None = None  # wire "ipc": the trainer ranks' handles of the bucket
    delta: dict | None = None  # delta sync: {"base": version the patches apply to, or None}


class _Consumption:
    """Which streamed tensors one of vLLM's weight loaders took.

    vLLM's ``load_weights`` silently skips names it does not route to a parameter. Under the
    layer-wise reload every loader call is buffered in its layer's ``loaded_weights`` until the
    layer completes; a tensor that appears there (itself, or a view vLLM derived from it: the
    same storage, inside its bytes) was taken. Read when a layer is processed (the reload hook)
    and, for layers still buffering, at the end of the update.
    """

    def __init__(self):
        self.pending: dict[int, tuple[str, torch.Tensor]] = {}  # id -> (name, tensor)
        self._spans: dict[int, list[tuple[int, int, int]]] = {}  # storage -> (start, end, id)

    def add(self, pairs: list[tuple[str, torch.Tensor]]) -> None:
        for name, t in pairs:
            if id(t) in self.pending:
                continue
            self.pending[id(t)] = (name, t)
            start = t.storage_offset() * t.element_size()
            self._spans.setdefault(t.untyped_storage().data_ptr(), []).append(
                (start, start + t.numel() * t.element_size(), id(t)))

    def taken(self, tensors) -> None:
        for x in tensors:
            spans = self._spans.get(x.untyped_storage().data_ptr())
            if not spans:
                continue
            at = x.storage_offset() * x.element_size()
            for start, end, key in spans:
                if start <= at < end or (start == end == at):
                    self.pending.pop(key, None)

    def unconsumed(self) -> list[str]:
        return sorted(name for name, _ in self.pending.values())


class MegarlhfWeightTransferEngine(WeightTransferEngine[MegarlhfInitInfo, MegarlhfUpdateInfo]):
    """vLLM worker side of backend ``"megarlhf"`` (see the module docstring)."""

    init_info_cls = MegarlhfInitInfo
    update_info_cls = MegarlhfUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, config, vllm_config, device, model):
        super().__init__(config, vllm_config, device, model)
        self.wires: list = []
        self.wire: str | None = None
        self.timeout_s = 600.0
        self.rank = -1
        self.report: dict[str, Any] | None = None
        self._active = False
        from megarlhf.weights.delta import DeltaMirror

        self.mirror = DeltaMirror()  # delta sync: the tensors last received (host)
        self._mirror_version: int | None = None  # the version being received into it

    # ------------------------------------------------------------------ rendezvous
    def init_transfer_engine(self, init_info: MegarlhfInitInfo) -> None:
        self.shutdown()  # a new trainer (or a local sender) replaces the previous groups
        pc = self.parallel_config
        self.rank = (init_info.rank_offset + pc.data_parallel_index * pc.world_size + pc.rank)
        if not 0 < self.rank < init_info.world_size:
            raise ValueError(f"megarlhf weight transfer: worker rank {self.rank} is outside the "
                             f"groups of {init_info.world_size}")
        self.timeout_s = float(init_info.timeout_s)
        self.mirror.drop()  # a new trainer: its first sync is full
        self.wire = init_info.wire
        if init_info.wire != "ipc":
            self.wires = open_receiver_wires(init_info.rendezvous, self.rank,
                                             init_info.world_size, init_info.wire,
                                             self.timeout_s)

    # ------------------------------------------------------------------ one update
    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        compat.quiet_expected_warnings()  # this runs in vLLM's worker process
        initialize_layerwise_reload(self.model)
        self._loaded: set[str] = set()
        self._consumption = _Consumption()
        self._processed = compat.record_processed_layers(
            on_process=lambda layer, info: self._consumption.taken(
                compat.buffered_tensors(info)))
        self._received = ReceiveStats()
        self._tied = bool(getattr(self.model_config.hf_config, "tie_word_embeddings", False))
        self._active = True
        self._mirror_version = None
        self.report = None

    def receive_weights(self, update_info: MegarlhfUpdateInfo) -> None:
        if not self._active:
            raise RuntimeError("megarlhf weight transfer: update_weights before "
                               "start_weight_update")
        if self.wire is None:
            raise RuntimeError("megarlhf weight transfer: update_weights before "
                               "init_weight_transfer_engine")
        spec = TransferSpec.from_dict(update_info.spec)
        where = f"vLLM worker (transfer rank {self.rank}), weight version {update_info.version}"
        mirror = delta_mirror_for({"delta": update_info.delta} if update_info.delta is not None
                                  else {}, self.mirror, where)
        if mirror is not None:
            if self.wire == "ipc":
                raise WeightTransferError(f"{where}: a delta sync over the CUDA IPC wire")
            if not mirror.tensors:  # the first (full) sync of a delta run fills the copy
                from megarlhf.weights.delta import check_host_room

                check_host_room(spec.total_bytes, "a copy of the whole model", where)
            self._mirror_version = update_info.version
            try:
                stats = receive_all(spec, self.wires, self._load, device=self.device,
                                    timeout_s=self.timeout_s, where=where, delta=mirror)
            except BaseException:
                mirror.drop()  # partly updated: the next sync must be full
                self._mirror_version = None
                raise
        elif self.wire == "ipc":
            stats = receive_ipc(spec, decode_ipc(update_info.ipc_handles), self._load,
                                device=self.device)
        else:
            self.mirror.drop()  # a full sync without delta: the copy is stale now
            stats = receive_all(spec, self.wires, self._load, device=self.device,
                                timeout_s=self.timeout_s, where=where)
        r = self._received
        r.tensors += stats.tensors
        r.bytes += stats.bytes
        r.buckets += stats.buckets
        r.seconds += stats.seconds
        r.wait_s += stats.wait_s
        r.load_s += stats.load_s
        r.buffer_bytes = max(r.buffer_bytes, stats.buffer_bytes)

    def _load(self, pairs: list[tuple[str, torch.Tensor]]) -> None:
        if self._tied:
            extra = [("lm_head.weight", t) for n, t in pairs if n == TIED_EMBEDDING_NAME]
            pairs = list(pairs) + extra
        self._consumption.add(pairs)
        try:
            loaded = self.model.load_weights(weights=pairs)
        except Exception as e:
            raise WeightTransferError(
                f"vLLM could not load the weight bucket {[n for n, _ in pairs][:8]}: {e!r}"
            ) from e
        loaded = set(loaded or ())
        self._loaded.update(loaded)
        # Parameters the layer-wise reload does not track (glm4_moe's expert bias, attached to
        # its gate after construction) are loaded at once by vLLM's default loader, not
        # buffered: taken if the live parameter now holds exactly what was streamed.
        for name, t in pairs:
            if name not in loaded:
                continue
            module, _, leaf = name.rpartition(".")
            p = getattr(self.model.get_submodule(module), leaf, None)
            if isinstance(p, torch.Tensor) and p.device.type != "meta" \
                    and not compat.buffers_loads(p) \
                    and p.shape == t.shape \
                    and torch.equal(p.data, t.to(device=p.device, dtype=p.dtype)):
                self._consumption.taken([t])

    def finish_weight_update(self) -> None:
        """Processes the loaded layers (a layer that got only part of its weights is put back
        as it was). The report, read with ``megarlhf_weight_report``, lists those layers and
        any tensor no loader took; the engine (:meth:`megarlhf.rollout.vllm_engine.
        VLLMRolloutEngine.finish_weight_update`) fails the update on either."""
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        t0 = time.perf_counter()
        model = self.model
        consumption = getattr(self, "_consumption", _Consumption())
        for info in compat.pending_layer_infos(model):  # taken, layers not yet processed
            consumption.taken(compat.buffered_tensors(info))
        incomplete = compat.incomplete_layers(model)
        processed = getattr(self, "_processed", None)
        try:
            finalize_layerwise_reload(model, self.model_config)
        finally:
            done = processed.stop() if processed is not None else set()
            self._processed = None
            self._active = False
            if self._mirror_version is not None:  # the copy now holds this version
                self.mirror.version = int(self._mirror_version)
                self._mirror_version = None
        compat.prepack_reloaded_cpu_experts(model, done)
        torch.accelerator.synchronize()
        unconsumed = consumption.unconsumed()
        self._consumption = _Consumption()
        loaded, self._loaded = getattr(self, "_loaded", set()), set()
        missing = sorted(n for n, _ in model.named_parameters() if n not in loaded)
        r = getattr(self, "_received", ReceiveStats())
        self.report = dict(missing=missing, unconsumed=unconsumed, incomplete=incomplete,
                           tensors=r.tensors, bytes=r.bytes, buckets=r.buckets,
                           receive_s=r.seconds, wait_s=r.wait_s, load_s=r.load_s,
                           buffer_bytes=r.buffer_bytes, mirror_bytes=self.mirror.nbytes,
                           finish_s=time.perf_counter() - t0)

    def shutdown(self) -> None:
        for w in self.wires:
            w.close()
        self.wires = []


class VLLMWorkerExtension:
    """Mixed into every vLLM worker (``worker_extension_cls``); reached via ``collective_rpc``.
    Its import registers the ``"megarlhf"`` backend in the worker process. Method names carry a
    ``megarlhf_`` prefix: vLLM refuses extension attributes that clash with the worker's own."""

    def megarlhf_weight_report(self) -> dict[str, Any] | None:
        """The report of this worker's last finished update (None before the first)."""
        engine = getattr(self, "weight_transfer_engine", None)
        if not isinstance(engine, MegarlhfWeightTransferEngine):
            raise RuntimeError("this vLLM worker was not built with megarlhf's weight-transfer "
                               f"backend (weight_transfer_config backend={BACKEND_NAME!r})")
        return engine.report


WORKER_EXTENSION_CLS = f"{__name__}.VLLMWorkerExtension"

compat.register_weight_transfer_engine(BACKEND_NAME, MegarlhfWeightTransferEngine)
