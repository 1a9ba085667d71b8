"""Weight transfer to the rollout engine: every owner rank sends its own share, concurrently.

This is the trainer side of megarlhf's weight-transfer backend (the rollout side is
:mod:`megarlhf.rollout.vllm_transfer`, registered with vLLM's ``WeightTransferEngineFactory``).
It follows vLLM 0.32's weight-transfer protocol (``vllm/distributed/weight_transfer/base.py``):
the rollout engine is built with a ``WeightTransferConfig``; once, ``init_weight_transfer_engine``
(the rendezvous); per sync ``start_weight_update`` -> ``update_weights`` (run concurrently with
the trainer's sends, as vLLM's NCCL backend does) -> ``finish_weight_update`` with the weight
version. What it adds to vLLM's built-in NCCL backend, which has one sender (trainer rank 0)
that must hold every full tensor: **several senders**. Each *owner* (TP rank 0 of a pipeline
stage; under expert parallelism each rank holding experts) assembles its own tensors inside its
stage (:func:`megarlhf.weights.resharder.iter_owned_buckets`) and broadcasts them on a transfer
group of its own to every rollout worker of every replica::

    group k = [owner k (rank 0)] + [worker w of replica r (rank 1 + r * W + w)]

Owners send at the same time; a worker receives from all of them at once (one thread per
group) and loads buckets in arrival order. No process receives another stage's weights, and no
process ever holds the whole model (unless the layout has a single owner: PP = 1, EP = 1).

The wire is a torch.distributed gloo group on CPU (tests, the demo) and NCCL (vLLM's
``PyNcclCommunicator``, the communicator its own NCCL backend uses) between GPUs: the same
control flow, only the group differs. Colocated on GPUs (a rollout worker on every GPU of the
trainer; NCCL refuses two ranks of one group on one GPU) the wire is CUDA IPC: each bucket,
once assembled by its owner, is broadcast over the trainer's own world, so every trainer rank
holds it; the trainer ranks' IPC handles of it go to the rollout side with one
``update_weights`` per bucket, and each rollout worker copies the bucket out of the trainer
rank on its own GPU (:func:`open_ipc_bucket`) before the trainer reuses the buffer.

What travels is described by a :class:`TransferSpec` (each bucket's owner, HF names, dtypes,
shapes and byte offsets), made by the trainer from its resharder plan and sent with each
``update_weights`` (a few KB to MB: names, not bytes) with the weight version; the receivers
size their buffers from it and the owners check every bucket they send against it.

Memory: an owner holds one bucket of its own (packed, reused); a rollout worker holds at most
one bucket per owner in flight, so the per-owner bucket is the configured bucket divided by the
number of owners (``bucket_bytes // len(owners)``; a larger tensor travels alone).

Delta sync (``TrainerInitInfo.delta``, config ``rollout.weight_sync_delta``; the encoding and
its memory cost are in :mod:`megarlhf.weights.delta`): per bucket the owner broadcasts a small
header (per tensor: dense or the size of its patch, and a checksum of its new dense values) and
then the payload (dense tensors and patches); the receivers apply it to their copy of the last
received tensors, check every checksum, and load the updated tensors as in a full sync. The
first sync, and the first after any failure (the trainer rebuilds its transfer engine), is
dense; a checksum mismatch fails the sync loudly (the replica then serves nothing until a full
sync, as after any failed sync). Not with the CUDA IPC wire (it moves no bytes over a link).
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol

import torch

from megarlhf.compat.torch import storage_users
from megarlhf.weights import delta as deltas

logger = logging.getLogger(__name__)

WIRES = ("gloo", "nccl", "ipc")
BACKEND_NAME = "megarlhf"  # our backend's name in vLLM's WeightTransferEngineFactory
_STORE_PREFIX = "megarlhf-weight-transfer"
_RING_CHUNK_BYTES = 4 << 20  # gloo's ring broadcast forwards in pieces of this size


class WeightTransferError(RuntimeError):
    """A weight transfer failed; the message names the side, the owner or replica, and the
    weight version. A replica whose update failed serves nothing until a complete update."""


# ------------------------------------------------------------------------------------- the spec
@dataclass(frozen=True)
class BucketSpec:
    """One bucket of one owner, as both sides lay it out.

    Attributes:
        owner: index into :attr:`TransferSpec.owners`.
        names / dtypes / shapes: the HF tensors, in HF order (dtype names as ``torch`` spells
            them: "bfloat16").
        offsets: byte offset of each tensor in the packed bucket.
        nbytes: packed size.
    """

    owner: int
    names: tuple[str, ...]
    dtypes: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    nbytes: int

    def views(self, flat: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` views of a packed bucket ``flat`` (uint8)."""
        out = []
        for name, dt, shape, off in zip(self.names, self.dtypes, self.shapes, self.offsets):
            dtype = getattr(torch, dt)
            n = dtype.itemsize
            for d in shape:
                n *= d
            out.append((name, flat[off: off + n].view(dtype).view(shape)))
        return out


@dataclass(frozen=True)
class TransferSpec:
    """Who sends what: fixed for a model, a layout and a bucket size.

    Attributes:
        owners: the trainer's global ranks that send (group k belongs to ``owners[k]``).
        buckets: in the order the trainer produces them (each owner's own buckets in order).
        budget: the most bytes a receiver holds in flight (received, not yet loaded) over all
            owners: the configured bucket plus the largest tensor; None: one bucket per owner.
    """

    owners: tuple[int, ...]
    buckets: tuple[BucketSpec, ...]
    budget: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"owners": list(self.owners), "budget": self.budget,
                "buckets": [dict(owner=b.owner, names=list(b.names), dtypes=list(b.dtypes),
                                 shapes=[list(s) for s in b.shapes], offsets=list(b.offsets),
                                 nbytes=b.nbytes) for b in self.buckets]}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "TransferSpec":
        buckets = tuple(BucketSpec(owner=int(b["owner"]), names=tuple(b["names"]),
                                   dtypes=tuple(b["dtypes"]),
                                   shapes=tuple(tuple(int(x) for x in s) for s in b["shapes"]),
                                   offsets=tuple(int(x) for x in b["offsets"]),
                                   nbytes=int(b["nbytes"])) for b in d["buckets"])
        budget = d.get("budget")
        spec = TransferSpec(owners=tuple(int(o) for o in d["owners"]), buckets=buckets,
                            budget=None if budget is None else int(budget))
        for b in spec.buckets:
            if not 0 <= b.owner < len(spec.owners):
                raise ValueError(f"transfer spec: bucket owner {b.owner} is not one of the "
                                 f"{len(spec.owners)} owners")
        return spec

    def digest(self) -> str:
        """A short hash of the layout: both sides check they move the same bytes."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def owner_buckets(self, k: int) -> list[int]:
        """Indices of owner ``k``'s buckets, in order."""
        return [i for i, b in enumerate(self.buckets) if b.owner == k]

    def owner_bytes(self) -> list[int]:
        """Bytes each owner sends per update (to each receiver)."""
        out = [0] * len(self.owners)
        for b in self.buckets:
            out[b.owner] += b.nbytes
        return out

    @property
    def total_bytes(self) -> int:
        return sum(b.nbytes for b in self.buckets)

    @property
    def num_tensors(self) -> int:
        return sum(len(b.names) for b in self.buckets)

    def names(self) -> list[str]:
        return [n for b in self.buckets for n in b.names]


def per_owner_bucket_bytes(bucket_bytes: int, num_owners: int) -> int:
    """The bucket bound of each owner: ``bucket_bytes`` shared by the owners (a receiver holds
    one bucket per owner in flight); a tensor larger than the bound travels alone."""
    return max(1, bucket_bytes // max(1, num_owners))


def transfer_spec(plan, bucket_bytes: int, dtype: torch.dtype | None,
                  budget: int | None = None) -> TransferSpec:
    """The :class:`TransferSpec` of a resharder plan (:func:`~megarlhf.weights.resharder.
    plan_hf_weights`) with the per-owner bucket bound ``bucket_bytes`` and the receivers'
    in-flight ``budget``."""
    from megarlhf.weights.resharder import bucket_layout

    owned = plan.owned_buckets(bucket_bytes, dtype)
    owners = tuple(sorted({o for o, _ in owned}))
    index = {o: k for k, o in enumerate(owners)}
    buckets = []
    for owner, bucket in owned:
        offsets, total = bucket_layout(plan, bucket, dtype)
        entries = [plan.entries[i] for i in bucket]
        buckets.append(BucketSpec(
            owner=index[owner], names=tuple(e.name for e in entries),
            dtypes=tuple(str(plan.out_dtype(e, dtype)).removeprefix("torch.") for e in entries),
            shapes=tuple(tuple(e.shape) for e in entries), offsets=tuple(offsets),
            nbytes=total))
    return TransferSpec(owners=owners, buckets=tuple(buckets), budget=budget)


def pack_bucket(pairs: Sequence[tuple[str, torch.Tensor]], owner: int = 0
                ) -> tuple[BucketSpec, torch.Tensor]:
    """One bucket of ``(name, tensor)`` pairs packed as :class:`BucketSpec` lays it out (each
    tensor 64-byte aligned) into one flat uint8 tensor: for a sender that holds full tensors
    (:meth:`megarlhf.rollout.base.RolloutEngine.update_weights` from a local stream)."""
    from megarlhf.weights.resharder import _ALIGN

    offsets, off = [], 0
    for _, t in pairs:
        off = -(-off // _ALIGN) * _ALIGN
        offsets.append(off)
        off += t.numel() * t.element_size()
    device = pairs[0][1].device if pairs else "cpu"
    flat = torch.empty(off, dtype=torch.uint8, device=device)
    for (_, t), o in zip(pairs, offsets):
        n = t.numel() * t.element_size()
        flat[o: o + n].copy_(t.detach().contiguous().reshape(-1).view(torch.uint8))
    spec = BucketSpec(owner=owner, names=tuple(n for n, _ in pairs),
                      dtypes=tuple(str(t.dtype).removeprefix("torch.") for _, t in pairs),
                      shapes=tuple(tuple(t.shape) for _, t in pairs), offsets=tuple(offsets),
                      nbytes=off)
    return spec, flat


# ------------------------------------------------------------------------------------- the wire
class Wire:
    """One transfer group (an owner and every rollout worker); rank 0 is the owner.

    ``gloo``: a torch.distributed gloo process group made from its own TCPStore (it touches no
    global torch.distributed state, so it lives next to the trainer's and vLLM's own worlds).
    ``nccl``: vLLM's ``PyNcclCommunicator`` over its ``StatelessProcessGroup``
    (``vllm.distributed.weight_transfer.nccl_common.stateless_init_process_group``), on the
    current CUDA device; each group broadcasts on a CUDA stream of its own.
    """

    def __init__(self, kind: str, host: str, port: int, rank: int, world_size: int,
                 timeout_s: float):
        if kind not in WIRES:
            raise ValueError(f"weight transfer wire must be one of {WIRES}, got {kind!r}")
        self.kind, self.rank, self.world_size = kind, rank, world_size
        self.where = f"{host}:{port}"
        self._seq = 0  # message tags: every member counts the same chunks
        self.timeout_s = timeout_s
        if kind == "gloo":
            timeout = timedelta(seconds=timeout_s)
            store = torch.distributed.TCPStore(host, port, world_size, is_master=rank == 0,
                                               timeout=timeout)
            self._store = store
            self._pg = torch.distributed.ProcessGroupGloo(
                torch.distributed.PrefixStore(_STORE_PREFIX, store), rank, world_size, timeout)
            self._stream = None
        else:
            from vllm.distributed.weight_transfer.nccl_common import (
                stateless_init_process_group,
            )

            self._pg = stateless_init_process_group(
                host, port, rank, world_size, torch.cuda.current_device())
            self._stream = torch.cuda.Stream()

    def broadcast(self, tensor: torch.Tensor) -> None:
        """Owner: sends ``tensor`` (contiguous) to every member; others: receive into it.
        Returns when the bytes are in place (the CUDA stream is synchronised).

        gloo: a pipelined ring (rank r receives each chunk from r - 1 and forwards it to
        r + 1), so the owner sends its bytes once, as NCCL's ring broadcast does, not once per
        receiver (gloo's own broadcast sends to every peer from the root).
        """
        if self.kind == "gloo":
            self._ring_broadcast(tensor)
        else:
            self._stream.wait_stream(torch.cuda.current_stream())
            self._pg.broadcast(tensor, src=0, stream=self._stream)
            self._stream.synchronize()

    def _ring_broadcast(self, tensor: torch.Tensor) -> None:
        flat = tensor.reshape(-1).view(torch.uint8)
        n, r = self.world_size, self.rank
        timeout = timedelta(seconds=self.timeout_s)
        sends = []
        for off in range(0, flat.numel(), _RING_CHUNK_BYTES):
            piece = flat[off: off + _RING_CHUNK_BYTES]
            tag, self._seq = self._seq, self._seq + 1
            if r > 0:
                self._pg.recv([piece], r - 1, tag).wait(timeout)
            if r + 1 < n:
                sends.append(self._pg.send([piece], r + 1, tag))
                if len(sends) > 4:  # bounded number of sends in flight
                    sends.pop(0).wait(timeout)
        for w in sends:
            w.wait(timeout)

    def close(self) -> None:
        if self.kind == "nccl" and hasattr(self._pg, "destroy"):
            self._pg.destroy()
        self._pg = None
        self._store = None


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------ receiving
@dataclass
class ReceiveStats:
    """One update on one receiver: tensors and bytes loaded, seconds in all, seconds the loader
    waited for the wire, seconds in the engine's loading, bytes of receive buffers allocated."""

    tensors: int = 0
    bytes: int = 0
    buckets: int = 0
    seconds: float = 0.0
    wait_s: float = 0.0
    load_s: float = 0.0
    buffer_bytes: int = 0  # receive buffers allocated (the receiver's own extra memory)


def receive_all(spec: TransferSpec, wires: Sequence[Wire],
                load: Callable[[list[tuple[str, torch.Tensor]]], None], *,
                device: torch.device | str = "cpu", timeout_s: float = 600.0,
                where: str = "rollout worker",
                delta: deltas.DeltaMirror | None = None) -> ReceiveStats:
    """Receives every bucket of ``spec`` (from all owners at once) and hands each to ``load``.

    One thread per owner receives that owner's buckets in order and waits until the loader has
    taken each before receiving the next: at most one bucket per owner is in flight, and at
    most ``spec.budget`` bytes over all owners (a thread waits for room before it receives: its
    owner's broadcast waits with it). ``load``
    runs in the calling thread, in arrival order. A failure in any thread (a peer gone: the
    wire times out) stops the update with an error naming the owner.

    ``delta``: the update is a delta sync (:mod:`megarlhf.weights.delta`): each bucket arrives
    as a header and a payload, is applied to this receiver's copy ``delta`` (checked by
    checksum: a mismatch fails the update naming the tensor) and the updated copies are loaded.

    Buffers: the engine may keep the tensors of a bucket (or views of them) until their layer
    is complete (vLLM's layer-wise reload does), so a buffer is reused only once nothing
    shares its storage any more (:class:`_BufferPool`); on CPU that saves the page faults of a
    fresh allocation per bucket. The pool lives for one update.
    """
    if len(wires) != len(spec.owners):
        raise ValueError(f"{len(wires)} transfer groups for {len(spec.owners)} owners")
    start = time.perf_counter()
    ready: queue.Queue = queue.Queue()
    stop = threading.Event()
    stats = ReceiveStats()
    pool = _BufferPool(torch.device(device))
    budget = _Budget(spec.budget)

    def receiver(k: int) -> None:
        try:
            for i in spec.owner_buckets(k):
                b = spec.buckets[i]
                while not budget.reserve(b.nbytes, timeout=0.5):
                    if stop.is_set():
                        return
                if delta is not None:
                    flat = _receive_delta_bucket(wires[k], b, i, k, spec, pool, delta, device,
                                                 stats)
                else:
                    flat = pool.take(b.nbytes)
                    wires[k].broadcast(flat)
                taken = threading.Event()
                ready.put((i, flat, taken))
                del flat
                while not taken.wait(0.5):
                    if stop.is_set():
                        return
        except BaseException as e:  # noqa: BLE001 - handed to the loader thread, re-raised there
            ready.put((-1 - k, e, None))

    threads = [threading.Thread(target=receiver, args=(k,), daemon=True,
                                name=f"megarlhf-recv-owner{k}") for k in range(len(wires))]
    for t in threads:
        t.start()
    try:
        remaining = len(spec.buckets)
        while remaining:
            t0 = time.perf_counter()
            try:
                i, flat, taken = ready.get(timeout=timeout_s)
            except queue.Empty:
                raise WeightTransferError(
                    f"{where}: no weight bucket arrived within {timeout_s:.0f} s "
                    f"({remaining} of {len(spec.buckets)} still due)") from None
            stats.wait_s += time.perf_counter() - t0
            if taken is None:
                k = -1 - i
                raise WeightTransferError(
                    f"{where}: receiving from trainer rank {spec.owners[k]} (owner {k}, group "
                    f"{wires[k].where}) failed: {flat!r}") from flat
            b = spec.buckets[i]
            t0 = time.perf_counter()
            if isinstance(flat, list):  # delta: the receiver's updated copies
                views = flat
            else:
                views = b.views(flat)
                pool.handed_out(flat)
            load(views)
            del views, flat  # before the budget admits the next: its buffer may come back
            budget.release(b.nbytes)
            stats.load_s += time.perf_counter() - t0
            stats.tensors += len(b.names)
            if delta is None:
                stats.bytes += b.nbytes
            stats.buckets += 1
            taken.set()
            remaining -= 1
    finally:
        stop.set()
    for t in threads:
        t.join(timeout=5)
    stats.seconds = time.perf_counter() - start
    stats.buffer_bytes = pool.allocated
    return stats


def _receive_delta_bucket(wire: Wire, b: BucketSpec, i: int, k: int, spec: TransferSpec,
                          pool: "_BufferPool", mirror: deltas.DeltaMirror, device,
                          stats: ReceiveStats) -> list[tuple[str, torch.Tensor]]:
    """Delta sync: receives bucket ``i`` (header, then payload) from owner ``k``, applies it
    to ``mirror`` and returns the updated ``(name, tensor)`` pairs (on ``device``)."""
    wire_dev = torch.device(device) if wire.kind != "gloo" else torch.device("cpu")
    header = torch.empty((len(b.names), 2), dtype=torch.int64, device=wire_dev)
    wire.broadcast(header)
    header = header.cpu()
    numels, sizes = [], []
    for dt, shape in zip(b.dtypes, b.shapes):
        n = 1
        for d in shape:
            n *= d
        numels.append(n)
        sizes.append(getattr(torch, dt).itemsize)
    size = deltas.payload_nbytes(header, numels, sizes)
    flat = pool.take(size) if size else torch.empty(0, dtype=torch.uint8, device=wire_dev)
    if size:
        wire.broadcast(flat)
    host = flat.cpu()
    pool.handed_out(flat)
    del flat
    try:
        targets = mirror.targets(b.names, b.dtypes, b.shapes, header)
        tensors = deltas.apply(header, host, targets, b.names)
    except (deltas.ChecksumMismatch, ValueError) as e:
        raise WeightTransferError(
            f"delta sync: bucket {i} from trainer rank {spec.owners[k]} (owner {k}): {e}. "
            "The sync fails (no fallback within it); the replica serves nothing until the next "
            "sync, which is full") from e
    with mirror.lock:
        stats.bytes += header.numel() * 8 + size
    dev = torch.device(device)
    return [(n, t if dev.type == "cpu" else t.to(dev)) for n, t in zip(b.names, tensors)]


def delta_mirror_for(update_info: dict[str, Any], mirror: deltas.DeltaMirror | None,
                     where: str) -> deltas.DeltaMirror | None:
    """The receiver's copy to apply a delta update to (None: the update is not a delta
    sync); raises when the update is a delta against another version than the copy holds."""
    d = update_info.get("delta")
    if d is None:
        return None
    if mirror is None:
        raise WeightTransferError(f"{where}: a delta weight sync, but this receiver keeps no "
                                  "copy of the weights to apply it to")
    base = d.get("base")
    if base is not None and mirror.version != int(base):
        raise WeightTransferError(
            f"{where}: a delta against weight version {base}, but this receiver's copy is of "
            f"version {mirror.version} (it restarted or missed a sync): a full sync is needed")
    return mirror


class _Budget:
    """Bytes a receiver may hold received but not yet loaded, over all owners (None: no
    limit). A bucket larger than the budget alone is let through when nothing else is held."""

    def __init__(self, limit: int | None):
        self.limit, self.held = limit, 0
        self.cond = threading.Condition()

    def reserve(self, n: int, timeout: float) -> bool:
        with self.cond:
            ok = self.cond.wait_for(lambda: self.limit is None or self.held == 0
                                    or self.held + n <= self.limit, timeout=timeout)
            if ok:
                self.held += n
            return ok

    def release(self, n: int) -> None:
        with self.cond:
            self.held -= n
            self.cond.notify_all()


class _BufferPool:
    """Receive buffers of one update, reused once no tensor shares their storage any more but
    the pool's own buffer (the engine dropped every tensor of the bucket, and every view it
    derived from them: :func:`megarlhf.compat.torch.storage_users`)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.lock = threading.Lock()
        self.buffers: list[torch.Tensor] = []
        self.lent: set[int] = set()  # data_ptr of buffers between take() and handed_out()
        self.allocated = 0

    def take(self, nbytes: int) -> torch.Tensor:
        with self.lock:
            best = None
            for buf in self.buffers:
                if (buf.data_ptr() not in self.lent and buf.numel() >= nbytes
                        and storage_users(buf) == 1
                        and (best is None or buf.numel() < best.numel())):
                    best = buf
            if best is None:
                best = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
                self.buffers.append(best)
                self.allocated += nbytes
            self.lent.add(best.data_ptr())
            return best[:nbytes]

    def handed_out(self, view: torch.Tensor) -> None:
        """The bucket in ``view`` went to the engine: its buffer is reusable once the engine
        holds nothing of it (the caller drops its own references first)."""
        with self.lock:
            self.lent.discard(view.data_ptr())


def receive_ipc(spec: TransferSpec, handles: dict[str, tuple],
                load: Callable[[list[tuple[str, torch.Tensor]]], None], *,
                device: torch.device) -> ReceiveStats:
    """Wire "ipc": loads the bucket(s) of ``spec`` from the trainer rank on this GPU, each
    tensor copied out first (the trainer reuses its buffer once this returns; vLLM's reload may
    keep a tensor until its layer is complete)."""
    start = time.perf_counter()
    stats = ReceiveStats()
    flat = open_ipc_bucket(handles, torch.device(device))
    for b in spec.buckets:
        t0 = time.perf_counter()
        pairs = [(n, t.clone()) for n, t in b.views(flat[: b.nbytes])]
        stats.wait_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        load(pairs)
        stats.load_s += time.perf_counter() - t0
        stats.tensors += len(b.names)
        stats.bytes += b.nbytes
        stats.buckets += 1
        del pairs
    del flat
    stats.seconds = time.perf_counter() - start
    return stats


def open_receiver_wires(rendezvous: Sequence[Sequence[Any]], rank: int, world_size: int,
                        wire: str, timeout_s: float) -> list[Wire]:
    """A rollout worker joins every owner's group (as ``rank``), in owner order (each owner
    opens only its own group, so this order cannot deadlock)."""
    return [Wire(wire, str(host), int(port), rank, world_size, timeout_s)
            for host, port in rendezvous]


# ------------------------------------------------------------------------------------ CUDA IPC
def ipc_handles(flat: torch.Tensor) -> dict[str, tuple]:
    """``{GPU UUID: rebuild args}`` of a CUDA tensor (``torch.multiprocessing.reductions.
    reduce_tensor``, the form vLLM's IPC engine exchanges)."""
    from torch.multiprocessing.reductions import reduce_tensor

    uuid = str(torch.cuda.get_device_properties(flat.device).uuid)
    return {uuid: reduce_tensor(flat)[1]}


def open_ipc_bucket(handles: dict[str, tuple], device: torch.device) -> torch.Tensor:
    """The packed bucket another process on this GPU shared (:func:`ipc_handles`), as a tensor
    on ``device`` (a view of that process's memory: copy what must outlive the call)."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    index = device.index if device.index is not None else torch.cuda.current_device()
    uuid = str(torch.cuda.get_device_properties(index).uuid)
    if uuid not in handles:
        raise WeightTransferError(
            f"no trainer rank shares GPU {uuid} (a colocated weight sync reads each bucket from "
            "the trainer rank on the rollout worker's own GPU): give the actor every GPU of the "
            "rollout's pool, or use placement: split")
    args = list(handles[uuid])
    args[6] = index  # reduce_tensor's args carry the sender's device index; this process's
    return rebuild_cuda_tensor(*args)


def encode_ipc(handles: dict[str, tuple]) -> bytes:
    """IPC handles for vLLM's RPC, which carries plain values (msgpack) between its processes:
    pickled, as vLLM's own HTTP client does with them (between processes of this job only)."""
    import pickle

    return pickle.dumps(handles)


def decode_ipc(blob: bytes) -> dict[str, tuple]:
    import pickle

    return pickle.loads(blob)


# -------------------------------------------------------------------------------- trainer side
class WeightSyncClient(Protocol):
    """vLLM's ``VLLMWeightSyncClient`` (``vllm/distributed/weight_transfer/base.py``): the
    rollout engines' weight-sync control plane, as the trainer's sender drives it."""

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None: ...

    def start_weight_update(self) -> None: ...

    def update_weights(self, update_info: dict[str, Any]) -> None: ...

    def finish_weight_update(self, weight_version: str | None = None) -> Any: ...


@dataclass(frozen=True)
class TrainerInitInfo:
    """What every trainer rank passes to :meth:`OwnersTrainerEngine.trainer_init`.

    Attributes:
        rank: this trainer process's global rank (rank 0 drives the control plane).
        host: this rank's address, reachable from the rollout workers (an owner's group
            rendezvous is on it).
        num_receivers: rollout workers in all (replicas x workers per replica).
        workers_per_replica: rollout workers of one replica (its TP x PP).
        bucket_bytes: the receivers' in-flight bound, shared by the owners.
        dtype: the wire dtype (the rollout engine's weight dtype).
        wire: "gloo" or "nccl".
        timeout_s: a transfer stops with an error when a peer is silent this long.
        measure_delta: count the elements of each owner's share whose bf16 value changed since
            the previous sync (what a bf16 delta sync would send). Keeps a host copy of the
            owner's share in bf16.
        delta: delta sync (:mod:`megarlhf.weights.delta`): each owner sends per tensor only
            the elements changed since the previous sync when that is smaller. Keeps a host
            copy of the owner's share in the wire dtype; every receiver keeps the whole model.
    """

    rank: int
    host: str
    num_receivers: int
    workers_per_replica: int
    bucket_bytes: int
    dtype: torch.dtype | None = None
    wire: str = "gloo"
    timeout_s: float = 600.0
    measure_delta: bool = False
    delta: bool = False
    backend: str = field(default=BACKEND_NAME, init=False)

    @property
    def is_sender(self) -> bool:
        return self.rank == 0


@dataclass
class SendStats:
    """One rank's share of one update: bytes it put on the wire (to each receiver: a broadcast
    sends once per group), buckets, seconds assembling (TP gather) and on the wire."""

    rank: int
    owner: bool
    bytes: int = 0
    buckets: int = 0
    gather_s: float = 0.0
    wire_s: float = 0.0
    seconds: float = 0.0
    replicas: list[Any] = field(default_factory=list)  # rank 0: each replica's finish report
    changed: int = 0  # measure_delta / delta: elements that differ from the previous sync
    elements: int = 0  # measure_delta / delta: elements compared (0 on a full sync)
    dense_bytes: int = 0  # what a full sync would have sent (equal to bytes without delta)
    delta: str = "off"  # "off", "full" (a delta sync with no base: all dense), "delta"

    def to_dict(self) -> dict[str, Any]:
        """As a dict (the replicas' reports kept as they are)."""
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


class OwnersTrainerEngine:
    """Trainer side of the ``megarlhf`` backend, on every rank of the trainer role.

    Shaped like vLLM's ``TrainerWeightTransferEngine`` (``trainer_init`` on every rank,
    ``send_weights`` on every rank, rank 0 drives the control plane through a
    :class:`WeightSyncClient`); unlike vLLM's NCCL backend every owner rank sends, each on
    its own group. Construct with :meth:`trainer_init`.
    """

    def __init__(self, info: TrainerInitInfo, bundle, plan, spec: TransferSpec,
                 client: WeightSyncClient | None, wire: Wire | None):
        self.info, self.bundle, self.plan, self.spec = info, bundle, plan, spec
        self.client = client
        self.wire = wire  # this rank's own group, when it is an owner
        self.owner_index = spec.owners.index(info.rank) if info.rank in spec.owners else None
        self._previous: dict[int, list] = {}  # measure_delta: bucket -> its bf16 bits (host)
        self._delta = deltas.DeltaBase()  # delta: what this owner last sent
        if info.delta and self.owner_index is not None:
            deltas.check_host_room(spec.owner_bytes()[self.owner_index],
                                   "this owner's share of the model", f"trainer rank {info.rank}")

    @classmethod
    def trainer_init(cls, info: TrainerInitInfo, bundle, *, client: WeightSyncClient | None
                     ) -> "OwnersTrainerEngine":
        """Collective (every trainer rank): plans who owns what, opens each owner's group and,
        on rank 0, asks the rollout side to join all of them (concurrently, as the groups'
        rendezvous needs every member).

        Args:
            bundle: this rank's model.
            client: the rollout engines' control plane; rank 0 only (None elsewhere).
        """
        from concurrent.futures import ThreadPoolExecutor

        from megarlhf.weights.resharder import plan_hf_weights

        if info.wire not in WIRES:
            raise ValueError(f"weight transfer wire must be one of {WIRES}, got {info.wire!r}")
        if info.delta and info.wire == "ipc":
            raise ValueError(
                "rollout.weight_sync_delta: the colocated CUDA IPC wire hands the rollout "
                "workers handles to the trainer's own buffers, it moves no bytes over a link: a "
                "delta would save nothing. Use placement: split (NCCL or gloo wire), or "
                "weight_sync_delta: false")
        if info.is_sender and client is None:
            raise ValueError("trainer rank 0 drives the weight transfer: it needs a client")
        plan = plan_hf_weights(bundle)
        spec = transfer_spec(plan, _bucket_bound(info, len(plan.owners())), info.dtype,
                             budget=info.bucket_bytes + plan.largest_bytes(info.dtype))
        me = info.rank in spec.owners and info.wire != "ipc"
        port = free_port() if me else 0
        rendezvous = _all_gather([info.host, port])
        points = [rendezvous[o] for o in spec.owners]
        world = 1 + info.num_receivers
        engine = cls(info, bundle, plan, spec, client if info.is_sender else None, None)
        init_info = dict(rendezvous=points, world_size=world,
                         workers_per_replica=info.workers_per_replica, wire=info.wire,
                         timeout_s=info.timeout_s, rank_offset=1)
        with ThreadPoolExecutor(max_workers=1) as pool:
            future = (pool.submit(client.init_weight_transfer_engine, init_info)
                      if info.is_sender else None)
            try:
                if me:
                    engine.wire = Wire(info.wire, info.host, port, 0, world, info.timeout_s)
            finally:
                if future is not None:
                    future.result()
        return engine

    def send_weights(self, version: int) -> SendStats:
        """Collective (every trainer rank): one update, weight version ``version``.

        Rank 0 starts the update on the rollout side, lets it receive (in a thread, while this
        rank sends its own share like every owner), then finishes it with the version. Returns
        this rank's :class:`SendStats` (rank 0's carries each replica's finish report).
        """
        from concurrent.futures import ThreadPoolExecutor

        from megarlhf.weights.resharder import iter_owned_buckets

        start = time.perf_counter()
        stats = SendStats(rank=self.info.rank, owner=self.owner_index is not None)
        if self.info.wire == "ipc":
            self._send_ipc(version, stats)
            stats.seconds = time.perf_counter() - start
            return stats
        bound = _bucket_bound(self.info, len(self.spec.owners))
        pool = future = None
        update_info: dict[str, Any] = {"version": int(version), "spec": self.spec.to_dict()}
        full = True
        if self.info.delta:
            # Every rank must agree: a delta only when every owner's base is of one version.
            bases = _all_gather(self._delta.version)
            full = any(v is None for v in bases) or len(set(bases)) != 1
            update_info["delta"] = {"base": None if full else bases[0]}
            stats.delta = "full" if full else "delta"
            if full:
                self._delta.drop()
        if self.client is not None:
            self.client.start_weight_update()
            pool = ThreadPoolExecutor(max_workers=1)
            future = pool.submit(self.client.update_weights, update_info)
        try:
            t0 = time.perf_counter()
            for bucket in iter_owned_buckets(self.bundle, bucket_bytes=bound,
                                             dtype=self.info.dtype, plan=self.plan):
                t1 = time.perf_counter()
                stats.gather_s += t1 - t0
                expected = self.spec.buckets[bucket.index]
                if expected.owner != self.owner_index or expected.nbytes != bucket.nbytes:
                    raise WeightTransferError(
                        f"trainer rank {self.info.rank}: bucket {bucket.index} does not match "
                        "the transfer spec (the resharder's plan changed since the rendezvous)")
                if future is not None and future.done():
                    future.result()  # the rollout side failed already: do not wait on it
                try:
                    if self.info.delta:
                        self._send_delta(expected, bucket.flat, bucket.index, full, stats)
                    else:
                        self.wire.broadcast(bucket.flat)
                except Exception as e:
                    raise WeightTransferError(
                        f"trainer rank {self.info.rank} (owner {self.owner_index}): sending "
                        f"bucket {bucket.index} of weight version {version} to the rollout "
                        f"workers on {self.wire.where} failed: {e}") from e
                if self.info.measure_delta:
                    self._count_changes(expected, bucket.flat, bucket.index, stats)
                t0 = time.perf_counter()
                stats.wire_s += t0 - t1
                if not self.info.delta:
                    stats.bytes += bucket.nbytes
                stats.dense_bytes += bucket.nbytes
                stats.buckets += 1
                del bucket
            if future is not None:
                future.result()
                stats.replicas = list(self.client.finish_weight_update(str(int(version))) or [])
            if self.info.delta:
                # This owner's share went out: its base moves on. A rank that failed drops its
                # base (below), and the agreement at the start of the next sync makes it full.
                self._delta.commit(int(version))
        except BaseException:
            self._delta.drop()  # the next sync is full
            raise
        finally:
            if pool is not None:
                pool.shutdown(wait=False)  # a receiver stuck on a dead peer must not hang us
        stats.seconds = time.perf_counter() - start
        return stats

    def _send_delta(self, spec: BucketSpec, flat: torch.Tensor, index: int, full: bool,
                    stats: SendStats) -> None:
        """Delta sync: one bucket as header + payload against this owner's base (all dense
        when ``full``); the bucket's host copy becomes the base once the sync succeeds."""
        host = flat.to("cpu", copy=True)
        tensors = [t for _, t in spec.views(host)]
        enc = deltas.encode(tensors, None if full else self._delta.get(index))
        dev = flat.device
        self.wire.broadcast(enc.header.to(dev))
        if enc.payload.numel():
            self.wire.broadcast(enc.payload.to(dev))
        self._delta.record(index, tensors)
        stats.bytes += enc.nbytes
        if not full and not self.info.measure_delta:
            stats.changed += enc.changed
            stats.elements += enc.elements

    def _count_changes(self, spec: BucketSpec, flat: torch.Tensor, index: int,
                       stats: SendStats) -> None:
        """Elements of this bucket whose bf16 value differs from the previous sync's: a
        bf16 tensor bit-wise, a float32 one after rounding to bf16 (what a bf16 rollout
        engine would receive), others bit-wise."""
        now = []
        for _, t in spec.views(flat):
            if t.dtype == torch.float32:
                t = t.to(torch.bfloat16)
            now.append(deltas.as_bits(t).to("cpu", copy=True))
        before = self._previous.get(index)
        if before is not None and len(before) == len(now):
            for a, b in zip(now, before):
                stats.changed += int((a != b).sum())
                stats.elements += a.numel()
        self._previous[index] = now

    def _send_ipc(self, version: int, stats: SendStats) -> None:
        """Colocated on GPUs: every rank gets every bucket (its owner broadcasts it over the
        trainer's world), rank 0 hands all ranks' IPC handles of it to the rollout side (one
        ``update_weights`` per bucket, returning once every worker copied it out), then every
        rank may reuse its buffer."""
        from megarlhf.weights.resharder import iter_owned_buckets

        dist = torch.distributed
        multi = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if self.client is not None:
            self.client.start_weight_update()
        t0 = time.perf_counter()
        for bucket in iter_owned_buckets(self.bundle, bucket_bytes=_bucket_bound(
                self.info, len(self.spec.owners)), dtype=self.info.dtype, plan=self.plan,
                to_all=True):
            t1 = time.perf_counter()
            stats.gather_s += t1 - t0
            expected = self.spec.buckets[bucket.index]
            if expected.nbytes != bucket.nbytes:
                raise WeightTransferError(
                    f"trainer rank {self.info.rank}: bucket {bucket.index} does not match the "
                    "transfer spec (the resharder's plan changed since the rendezvous)")
            mine = ipc_handles(bucket.flat)
            every = _all_gather(mine)
            if self.client is not None:
                handles: dict[str, tuple] = {}
                for h in every:
                    handles.update(h)
                one = TransferSpec(owners=self.spec.owners, buckets=(expected,))
                self.client.update_weights({"version": int(version), "spec": one.to_dict(),
                                            "ipc_handles": encode_ipc(handles)})
            if multi:
                dist.barrier()  # every worker has copied the bucket out: buffers may be reused
            if self.owner_index is not None and expected.owner == self.owner_index:
                stats.bytes += bucket.nbytes
                if self.info.measure_delta:
                    self._count_changes(expected, bucket.flat, bucket.index, stats)
            stats.buckets += 1
            t0 = time.perf_counter()
            stats.wire_s += t0 - t1
            del bucket
        if self.client is not None:
            stats.replicas = list(self.client.finish_weight_update(str(int(version))) or [])

    def shutdown(self) -> None:
        if self.wire is not None:
            self.wire.close()
            self.wire = None


def _bucket_bound(info: TrainerInitInfo, num_owners: int) -> int:
    """An owner's bucket bound: the whole budget with CUDA IPC (one bucket in flight at a
    time), else the budget shared by the owners (a receiver holds one bucket of each)."""
    if info.wire == "ipc":
        return info.bucket_bytes
    return per_owner_bucket_bytes(info.bucket_bytes, num_owners)


def _all_gather(obj: Any) -> list[Any]:
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def iter_received(spec: TransferSpec, wires: Sequence[Wire], **kwargs
                  ) -> Iterator[tuple[str, torch.Tensor]]:
    """The received stream as ``(name, tensor)`` pairs (for engines whose update consumes one
    iterable, e.g. the transformers engine): :func:`receive_all` in a thread, one bucket at a
    time handed over."""
    slot: queue.Queue = queue.Queue(maxsize=1)
    done = object()
    err: list[BaseException] = []

    def load(pairs):
        ev = threading.Event()
        slot.put((pairs, ev))
        ev.wait()

    def run():
        try:
            receive_all(spec, wires, load, **kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer below
            err.append(e)
        slot.put(done)

    t = threading.Thread(target=run, daemon=True, name="megarlhf-recv")
    t.start()
    while True:
        item = slot.get()
        if item is done:
            break
        pairs, ev = item
        yield from pairs
        del pairs
        ev.set()
    t.join()
    if err:
        raise err[0]
