"""Weight buckets in shared memory: a bucket's bytes reach vLLM's worker(s) without a copy.

The bytes transport (:func:`megarlhf.rollout.vllm_engine.pack_bucket`) sends every bucket
through vLLM's RPC: packed into a ``bytearray``, pickled or msgpacked, copied through the
engine core's and the executor's message queues and unpickled in each worker. Measured on CPU
(docs/benchmarks.md, "vLLM rollout engine"): the worker's peak extra memory was ~3.5x a bucket
and the caller's ~1.3x. Here the caller writes each tensor of the stream, as it arrives, into a
file on a RAM-backed file system (``/dev/shm``) that it maps into memory, and sends only the
file's path and the tensors' names, dtypes, shapes and offsets; each worker maps the same pages
(copy-on-write, read in place) and hands vLLM's loaders views of them. A bucket then costs one
bucket of host memory, shared by the caller and every worker on the node.

Lifetime: the caller unlinks a segment once the RPC returned; a worker's mapping stays valid
after the unlink and is released when the last view of it dies (vLLM's layerwise reload keeps
the views of a layer whose tensors have not all arrived yet, which is why a segment is never
reused for the next bucket).

It works only where the workers see the caller's ``/dev/shm`` (same node, same IPC namespace):
:class:`megarlhf.rollout.vllm_engine.VLLMRolloutEngine` probes that once and otherwise keeps
the bytes transport. Space is reserved with ``posix_fallocate`` before anything is written, so
a full ``/dev/shm`` (Docker's default is 64 MiB) is an ``OSError`` (ENOSPC) at reservation time,
never a SIGBUS on a write into an unbacked page; the caller then falls back to the bytes
transport for the rest of the update.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from megarlhf.rollout.base import check_stream_item

logger = logging.getLogger(__name__)

SHM_DIRECTORY = "/dev/shm"
SEGMENT_PREFIX = "megarlhf-weights-"
ALIGN_BYTES = 16
# errnos of a reservation that the file system could not back: fall back, do not fail.
_NO_SPACE = (errno.ENOSPC, errno.ENOMEM, errno.EFBIG)


def shm_directory(candidate: str = SHM_DIRECTORY) -> str | None:
    """``candidate`` if it is a directory this process can write, else None."""
    if os.path.isdir(candidate) and os.access(candidate, os.W_OK | os.X_OK):
        return candidate
    return None


class SharedMemoryFull(OSError):
    """The shared-memory file system could not reserve a bucket (raised by
    :func:`iter_shared_buckets`; nothing of that bucket was written or sent)."""


def _aligned(offset: int) -> int:
    return offset + (-offset % ALIGN_BYTES)


def tensor_views(
    flat: torch.Tensor,
    names: Sequence[str],
    dtypes: Sequence[str],
    shapes: Sequence[Sequence[int]],
    offsets: Sequence[int],
) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs viewing ``flat`` (uint8) at ``offsets`` (no copy)."""
    out = []
    for name, dtype_name, shape, offset in zip(names, dtypes, shapes, offsets, strict=True):
        dtype = getattr(torch, dtype_name)
        numel = 1
        for d in shape:
            numel *= int(d)
        nbytes = numel * dtype.itemsize
        if offset + nbytes > flat.numel():
            raise ValueError(
                f"weight bucket: {name!r} ({nbytes} bytes at offset {offset}) lies beyond the "
                f"bucket's {flat.numel()} bytes"
            )
        out.append((str(name), flat[offset : offset + nbytes].view(dtype).view(list(shape))))
    return out


class SharedBucket:
    """One bucket being written: a file of ``capacity`` bytes in ``directory``, mapped.

    Raises ``OSError`` (ENOSPC) at construction when the file system cannot reserve the bytes;
    nothing is left behind then.
    """

    def __init__(self, directory: str, capacity: int):
        capacity = max(int(capacity), ALIGN_BYTES)
        self.capacity = capacity
        self.path = os.path.join(directory, f"{SEGMENT_PREFIX}{os.getpid()}-{uuid.uuid4().hex}")
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.posix_fallocate(fd, 0, capacity)
            self._mm: mmap.mmap | None = mmap.mmap(fd, capacity)
        except BaseException:
            os.close(fd)
            self._unlink()
            raise
        os.close(fd)
        self._flat: torch.Tensor | None = torch.frombuffer(self._mm, dtype=torch.uint8)
        self.names: list[str] = []
        self.dtypes: list[str] = []
        self.shapes: list[list[int]] = []
        self.offsets: list[int] = []
        self.used = 0
        self.nbytes = 0  # the tensors' bytes (``used`` less the alignment padding)

    def fits(self, nbytes: int) -> bool:
        return _aligned(self.used) + nbytes <= self.capacity

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Copy ``tensor``'s bytes in; the caller may drop the tensor afterwards."""
        nbytes = tensor.numel() * tensor.element_size()
        if self._flat is None:
            raise RuntimeError("weight bucket: add() after close()")
        if not self.fits(nbytes):
            raise ValueError(
                f"weight bucket: {name!r} ({nbytes} bytes) does not fit ({self.used} of "
                f"{self.capacity} bytes used)"
            )
        start = _aligned(self.used)
        if nbytes:
            src = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
            self._flat[start : start + nbytes].copy_(src)
        self.names.append(name)
        self.dtypes.append(str(tensor.dtype).removeprefix("torch."))
        self.shapes.append(list(tensor.shape))
        self.offsets.append(start)
        self.used = start + nbytes
        self.nbytes += nbytes

    def __len__(self) -> int:
        return len(self.names)

    def payload(self) -> dict[str, Any]:
        """What crosses vLLM's RPC: plain Python values only (the path, not the bytes)."""
        return dict(shm=self.path, size=self.used, names=list(self.names),
                    dtypes=list(self.dtypes), shapes=[list(s) for s in self.shapes],
                    offsets=list(self.offsets))

    def _unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        """Unmap and unlink; receivers that mapped the segment keep their pages."""
        self._flat = None  # the only export of the mapping: close() needs it gone
        if self._mm is not None:
            self._mm.close()
            self._mm = None
        self._unlink()

    def __enter__(self) -> SharedBucket:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_shared_bucket(payload: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
    """The receiving side (a vLLM worker): views of the segment ``payload["shm"]``.

    The mapping is private copy-on-write: reading shares the caller's pages, a loader that
    wrote into a view would get its own copy of that page and never change the caller's.
    The mapping lives as long as any returned view does.
    """
    size = int(payload["size"])
    path = payload["shm"]
    if size == 0:
        flat = torch.empty(0, dtype=torch.uint8)
    else:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError as e:
            raise RuntimeError(
                f"weight bucket {path} is not visible in this process: the vLLM worker does "
                "not share the trainer's /dev/shm (another node or IPC namespace)"
            ) from e
        try:
            mm = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
        finally:
            os.close(fd)
        flat = torch.frombuffer(mm, dtype=torch.uint8)  # keeps ``mm`` alive
    return tensor_views(flat, payload["names"], payload["dtypes"], payload["shapes"],
                        payload["offsets"])


def iter_shared_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int, directory: str
) -> Iterator[SharedBucket]:
    """The stream written into shared-memory buckets of at most ``bucket_bytes`` each.

    Each tensor is copied in as it arrives (the stream may then free it), so the caller holds
    one bucket plus the tensor being produced. A tensor larger than ``bucket_bytes`` gets a
    segment of its own size. A yielded bucket is closed (unmapped, unlinked) when the consumer
    asks for the next one, or when the generator is closed. Raises :class:`SharedMemoryFull` for
    a segment the file system could not reserve: the tensors of the buckets yielded before
    were handed out, the one being placed (the last the stream gave) and the rest were not.
    """
    if not isinstance(bucket_bytes, int) or bucket_bytes < 1:
        raise ValueError(
            f"weight bucket size must be a positive number of bytes, got {bucket_bytes!r}"
        )
    current: SharedBucket | None = None
    try:
        for item in named_tensors:
            name, tensor = check_stream_item(item)
            item = None
            nbytes = tensor.numel() * tensor.element_size()
            if current is not None and not current.fits(nbytes):
                yield current
                current.close()
                current = None
            if current is None:
                capacity = max(bucket_bytes, nbytes)
                try:
                    current = SharedBucket(directory, capacity)
                except OSError as e:
                    if e.errno not in _NO_SPACE:
                        raise
                    raise SharedMemoryFull(
                        e.errno, f"{directory} cannot reserve {capacity} bytes for {name!r}: "
                        f"{e.strerror}") from e
            current.add(name, tensor)
            tensor = None
        if current is not None and len(current):
            yield current
    finally:
        if current is not None:
            current.close()


def probe(directory: str | None) -> tuple[SharedBucket, list[int]] | None:
    """A one-tensor segment holding random bytes, and those bytes, for a receiver to check
    (:func:`check_probe`); None where no shared-memory directory exists or it cannot reserve a
    page. The caller closes the segment."""
    if directory is None:
        return None
    try:
        bucket = SharedBucket(directory, ALIGN_BYTES)
    except OSError as e:
        logger.info("shared-memory weight buckets unavailable in %s: %s", directory, e)
        return None
    token = list(uuid.uuid4().bytes)
    bucket.add("probe", torch.tensor(token, dtype=torch.uint8))
    return bucket, token


def check_probe(payload: dict[str, Any], expected: list[int]) -> bool:
    """True if this process reads the probe's bytes; False if it cannot see the segment."""
    try:
        views = open_shared_bucket(payload)
    except (RuntimeError, OSError):
        return False
    return views[0][1].tolist() == list(expected)
