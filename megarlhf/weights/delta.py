"""Delta weight sync (``rollout.weight_sync_delta``): per bucket, only the elements that changed.

Between two RL steps at a typical learning rate most bf16 weights do not change at all
(measured: 1.17% of the elements at lr 1e-6, 44.6% at the demo's lr 1e-4; docs/benchmarks.md,
"changed"). A delta sync sends, for every tensor of a bucket, either the whole tensor (dense) or
a *patch*: the flat indices of the elements whose bits differ from the previous sync and their
new values, whichever is smaller; and a checksum of the tensor's new dense values.

Owner side (:class:`DeltaBase`): each owner keeps the bytes it last sent of its own share, in
the wire dtype, in host memory (its share of the model once more: for a 235B bf16 model at 16
owners about 29 GB per owner). The first sync, and every sync after the base was dropped (a new
transfer engine: start, resume, or a failed sync), is dense.

Receiver side (:class:`DeltaMirror`): every rollout worker keeps the tensors it last received
(host memory: the whole model in the wire dtype, per worker), applies each patch to its copy,
checks the checksum of the result against the owner's, and hands the whole updated tensor to
the engine's normal (layer-wise) load. vLLM 0.32 also has an in-place path
(``vllm.model_executor.model_loader.checkpoint_weight_patch.load_checkpoint_weight_patches``,
used by its ``sparse_nccl`` engine: NaN-masked ``copy_`` into the live parameters), but its
contract is "a final same-shaped floating-point ``copy_`` into the runtime parameter", which
vLLM's CPU worker breaks: it prepacks every linear weight for oneDNN / its SGL kernels
(``dispatch_cpu_unquantized_gemm``) and may drop the unpacked one, so an in-place write there
is silently not seen by the GEMM. The mirror reconstructs the dense tensor instead, which works
with every engine, on every device, through the same load (and layer-wise reload) as a full
sync; its cost is the host copy.

On GPUs (split placement) the same patches travel over megarlhf's own backend on NCCL (every
owner broadcasts its buckets' headers and payloads on its group; the receivers copy them to
the host copy): vLLM's ``sparse_nccl`` backend is not used, because it has one sender (trainer
rank 0 holding every patch: no multi-owner sync) and applies patches in place, which needs the
contract above. The colocated CUDA IPC wire refuses delta sync (it moves no bytes over a link).
Not yet run on a GPU (tests/gpu/test_gpu_weight_delta.py checks the receive side on CUDA).

Wire format of one bucket of ``n`` tensors (both broadcast on the owner's group):

* header: int64 ``[n, 2]``: per tensor ``count`` (-1: dense) and ``checksum``;
* payload: uint8, per tensor in bucket order, each piece 64-byte aligned: dense -> the tensor's
  bytes; patch -> ``count`` indices (int32, int64 for tensors of 2**31 elements or more) then
  ``count`` values (the tensor's dtype).

A patch is chosen only when it is strictly smaller than the dense tensor, alignment included
(about ``count * (index size + element size) < numel * element size``; for bf16 with int32
indices: fewer than a third of the elements changed).

Checksum (:func:`checksum`): CRC-32 and Adler-32 of the tensor's bytes (64 bits; CRC-32
catches every single-element change, and misses any other change with odds of about 2**-32).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

ALIGN = 64
DENSE = -1
_INTS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def as_bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` flat, its bits as integers of its own width (a view)."""
    return t.reshape(-1).view(_INTS[t.element_size()])


def checksum(t: torch.Tensor) -> int:
    """CRC-32 and Adler-32 of the bytes of ``t``'s elements (contiguous, on the host), as one
    signed int64: ~3 GB/s per core with zlib (a position-weighted int64 sum in torch ran 36x
    slower: 4 s per 200M elements, measured on the benchmark's model)."""
    import zlib

    bits = as_bits(t.detach().contiguous()).cpu()
    data = memoryview(bits.numpy()).cast("B")
    v = (zlib.crc32(data) << 32) | zlib.adler32(data)
    return v - (1 << 64) if v >= 1 << 63 else v


def index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


def patch_is_smaller(count: int, numel: int, itemsize: int) -> bool:
    """A patch of ``count`` elements is sent instead of the dense tensor: strictly fewer
    bytes, alignment included."""
    return piece_nbytes(count, numel, itemsize) < piece_nbytes(DENSE, numel, itemsize)


def piece_nbytes(count: int, numel: int, itemsize: int) -> int:
    """Aligned payload bytes of one tensor: dense (``count`` = -1) or a patch."""
    if count == DENSE:
        return _align(numel * itemsize)
    return _align(count * index_dtype(numel).itemsize) + _align(count * itemsize)


def payload_nbytes(header: torch.Tensor, numels: Sequence[int], itemsizes: Sequence[int]) -> int:
    return sum(piece_nbytes(int(c), n, s) for c, n, s in zip(header[:, 0].tolist(), numels,
                                                              itemsizes))


@dataclass
class EncodedBucket:
    """One bucket as a delta sync sends it."""

    header: torch.Tensor  # int64 [n, 2]: count (-1 dense), checksum
    payload: torch.Tensor  # uint8
    dense_bytes: int  # what a full sync sends of this bucket
    changed: int  # elements sent as patches + elements of dense tensors that changed (or all)
    elements: int

    @property
    def nbytes(self) -> int:
        return self.header.numel() * 8 + self.payload.numel()


def encode(tensors: Sequence[torch.Tensor], previous: Sequence[torch.Tensor] | None
           ) -> EncodedBucket:
    """Encodes one bucket's tensors (host, contiguous) against the ``previous`` sync's (same
    shapes and dtypes; None: all dense)."""
    n = len(tensors)
    header = torch.empty((n, 2), dtype=torch.int64)
    pieces: list[tuple[torch.Tensor, ...]] = []
    size = dense = changed = elements = 0
    for k, t in enumerate(tensors):
        numel, isz = t.numel(), t.element_size()
        dense += numel * isz
        elements += numel
        header[k, 1] = checksum(t)
        idx = None
        if previous is not None:
            before = previous[k]
            if before.shape != t.shape or before.dtype != t.dtype:
                raise ValueError(f"delta base of tensor {k} is {before.dtype}{list(before.shape)}"
                                 f", the tensor {t.dtype}{list(t.shape)}")
            diff = as_bits(t) != as_bits(before)
            count = int(torch.count_nonzero(diff))
            changed += count
            if patch_is_smaller(count, numel, isz):
                idx = diff.nonzero().reshape(-1).to(index_dtype(numel))
        else:
            changed += numel
        if idx is None:
            header[k, 0] = DENSE
            pieces.append((as_bits(t).view(torch.uint8),))
            size += piece_nbytes(DENSE, numel, isz)
        else:
            header[k, 0] = idx.numel()
            values = t.reshape(-1)[idx.long()]
            pieces.append((idx.view(torch.uint8), as_bits(values).view(torch.uint8)))
            size += piece_nbytes(idx.numel(), numel, isz)
    payload = torch.empty(size, dtype=torch.uint8)
    off = 0
    for piece in pieces:
        for part in piece:
            payload[off: off + part.numel()].copy_(part)
            off += _align(part.numel())
    return EncodedBucket(header=header, payload=payload, dense_bytes=dense, changed=changed,
                         elements=elements)


class ChecksumMismatch(RuntimeError):
    """A tensor's checksum after applying a delta differs from the owner's."""


def apply(header: torch.Tensor, payload: torch.Tensor, targets: Sequence[torch.Tensor | None],
          names: Sequence[str]) -> list[torch.Tensor]:
    """Applies one encoded bucket to ``targets`` (the receiver's copies, updated in place; a
    None target takes a dense tensor only) and checks every tensor's checksum.

    Returns the updated tensors. Raises :class:`ChecksumMismatch` naming the tensor (the copies
    already updated stay updated: the caller drops the whole mirror), or ValueError for a patch
    without a copy to apply it to.
    """
    out = []
    off = 0
    payload = payload.reshape(-1)
    for k, (name, t) in enumerate(zip(names, targets, strict=True)):
        count, want = int(header[k, 0]), int(header[k, 1])
        if t is None:
            raise ValueError(f"{name}: no received copy to apply a delta to (a full sync "
                             "must come first)")
        numel, isz = t.numel(), t.element_size()
        flat = t.reshape(-1)
        if count == DENSE:
            n = numel * isz
            as_bits(flat).view(torch.uint8).copy_(payload[off: off + n])
            off += _align(n)
        else:
            if not 0 <= count <= numel:
                raise ValueError(f"{name}: a patch of {count} elements for {numel}")
            idt = index_dtype(numel)
            n = count * idt.itemsize
            idx = payload[off: off + n].view(idt).long()
            off += _align(n)
            n = count * isz
            values = payload[off: off + n].view(_INTS[isz]).view(t.dtype)
            off += _align(n)
            if count and (int(idx.min()) < 0 or int(idx.max()) >= numel):
                raise ValueError(f"{name}: patch indices outside its {numel} elements")
            flat[idx] = values
        got = checksum(t)
        if got != want:
            what = "dense tensor" if count == DENSE else f"patch of {count} elements"
            raise ChecksumMismatch(f"{name}: checksum {got:#x} after applying the {what}, "
                                   f"the owner's {want:#x}")
        out.append(t)
    return out


class DeltaBase:
    """Owner side: the bytes of each bucket this owner last sent (host), valid for one version.

    ``version`` is the weight version the base holds (None: no base, the next sync is dense).
    Buckets are recorded as they are sent and become the base only with :meth:`commit` (the
    whole sync succeeded); :meth:`drop` forgets everything.
    """

    def __init__(self):
        self.version: int | None = None
        self._base: dict[int, list[torch.Tensor]] = {}
        self._next: dict[int, list[torch.Tensor]] = {}

    def get(self, index: int) -> list[torch.Tensor] | None:
        return self._base.get(index) if self.version is not None else None

    def record(self, index: int, tensors: list[torch.Tensor]) -> None:
        self._next[index] = tensors

    def commit(self, version: int) -> None:
        self._base.update(self._next)
        self._next = {}
        self.version = version

    def drop(self) -> None:
        self._base, self._next, self.version = {}, {}, None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in self._base.values() for t in ts)


class DeltaMirror:
    """Receiver side: the tensors last received (host), by HF name, and the version they are.

    Thread-safe for the receive threads of different owners (disjoint names).
    """

    def __init__(self):
        self.version: int | None = None
        self.tensors: dict[str, torch.Tensor] = {}
        self.lock = threading.Lock()

    def targets(self, names: Sequence[str], dtypes: Sequence[str],
                shapes: Sequence[Sequence[int]], header: torch.Tensor
                ) -> list[torch.Tensor | None]:
        """The copies to apply a bucket to: existing ones (a new one for a dense tensor whose
        copy is missing or of another shape/dtype; None for a patch without a copy)."""
        out: list[torch.Tensor | None] = []
        with self.lock:
            for k, (name, dt, shape) in enumerate(zip(names, dtypes, shapes)):
                dtype = getattr(torch, dt)
                t = self.tensors.get(name)
                if t is not None and (t.dtype != dtype or tuple(t.shape) != tuple(shape)):
                    t = None
                if t is None and int(header[k, 0]) == DENSE:
                    t = torch.empty(tuple(shape), dtype=dtype)
                    self.tensors[name] = t
                out.append(t)
        return out

    def drop(self) -> None:
        with self.lock:
            self.tensors = {}
            self.version = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class HostMemoryError(RuntimeError):
    """A delta-sync host copy would not fit this host's memory; the message names the option."""


def host_available_bytes() -> int | None:
    """Memory the kernel says a new allocation can take (``MemAvailable``), None off Linux."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_host_room(nbytes: int, what: str, where: str, available: int | None = None) -> None:
    """Refuses to start a delta-sync copy of ``nbytes`` that the host cannot hold (more than 80%
    of its available memory), before the first sync fills it, with the fix; the copy is the
    whole model per rollout worker, so large models on split placement hit this first."""
    avail = host_available_bytes() if available is None else available
    if avail is None:
        logger.warning(
            "%s: cannot read the host's available memory; the delta-sync copy (%.1f GiB) is "
            "not checked", where, nbytes / 2**30)
        return
    if nbytes > 0.8 * avail:
        raise HostMemoryError(
            f"{where}: rollout.weight_sync_delta keeps {what} in host memory ({nbytes / 2**30:.1f} "
            f"GiB), more than 80% of the {avail / 2**30:.1f} GiB available here; set "
            "rollout.weight_sync_delta: false (the full sync needs no copy)")
