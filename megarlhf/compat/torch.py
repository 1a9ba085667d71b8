"""Uses of torch internals outside megatron-core's CPU redirection (that one is
:mod:`megarlhf.platform.cpu_compat`), each checked when this module is imported.

=======================  ===================================================================
item                     why
=======================  ===================================================================
storage use count        ``torch._C._storage_Use_Count``: how many tensors share a storage. A
                         weight-transfer receiver reuses a bucket's buffer only once no tensor
                         the rollout engine may still hold (vLLM's layer-wise reload keeps the
                         tensors, or views it derived from them, of a layer until the layer is
                         complete) shares its storage (megarlhf.weights.transfer._BufferPool).
=======================  ===================================================================
"""

from __future__ import annotations

import torch

WRITTEN_FOR = "2.13.0"


class TorchCompatError(RuntimeError):
    """torch's internals are not what megarlhf was written against."""


def _check() -> None:
    fn = getattr(torch._C, "_storage_Use_Count", None)
    probe = torch.empty(4, dtype=torch.uint8)
    ok = callable(fn)
    if ok:
        storage = probe.untyped_storage()
        before = fn(storage._cdata)  # the tensor and this wrapper
        view = probe[1:]
        ok = before == 2 and fn(storage._cdata) == 3
        del view
    if not ok:
        raise TorchCompatError(
            f"megarlhf's torch compatibility item 'storage use count' was written for torch "
            f"{WRITTEN_FOR}; the installed torch {torch.__version__} has no working "
            "torch._C._storage_Use_Count. Install torch 2.13 (tools/install_cpu.sh; the "
            "Dockerfile's image)")


_check()


def storage_users(t: torch.Tensor) -> int:
    """How many tensors (this one included) share ``t``'s storage."""
    storage = t.untyped_storage()  # a wrapper that holds one more reference while it lives
    return int(torch._C._storage_Use_Count(storage._cdata)) - 1
