"""Device and backend selection: cuda + nccl on a GPU machine, cpu + gloo everywhere else.

On CPU, :func:`init_platform` installs :mod:`megarlhf.platform.cpu_compat` so that
megatron-core's real code runs unchanged; it is the only place that decides this.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Platform:
    """Where this process computes and how it communicates.

    Attributes:
        device: ``torch.device`` the process's tensors live on (``cuda:<local_rank>`` or ``cpu``).
        backend: torch.distributed backend name (``nccl`` or ``gloo``).
    """

    device: torch.device
    backend: str

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


_PLATFORM: Platform | None = None

# Warnings megatron-core / torch print on every rank that say nothing actionable to a megarlhf
# user (each one checked: Apex is optional, the CUDA connection hint does not apply to CPU/gloo,
# megatron reads .grad of non-leaf activations internally, torch renamed two collectives).
_BENIGN_WARNINGS = [
    ("ignore", r"Apex is not installed"),
    ("ignore", r"When using async grad allreduce it is recommended"),
    ("ignore", r"When using sequence parallelism it is recommended to set the environment"),
    # Expert linears at etp=1 under a sequence-parallel config (SP does not apply to experts).
    ("ignore", r"`sequence_parallel` is set to `True`, but tensor model parallel size is 1"),
    ("ignore", r"full scope is deprecated"),
    ("ignore", r"The \.grad attribute of a Tensor that is not a leaf Tensor"),
    ("ignore", r"`torch.distributed.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated"),
    ("ignore", r"`torch.distributed._all_gather_base` is a private function"),
    ("ignore", r"Transformer Engine and Apex are not installed"),
    # megatron's dist_checkpointing still calls these torch.distributed.checkpoint APIs.
    ("ignore", r"`load_state_dict` is deprecated and will be removed"),
    ("ignore", r"`save_state_dict` is deprecated and will be removed"),
    ("ignore", r"Please use DTensor instead and we are deprecating ShardedTensor"),
]


def quiet_known_warnings() -> None:
    """Silences the benign upstream warnings listed in ``_BENIGN_WARNINGS`` (nothing else)."""
    import warnings

    for action, pattern in _BENIGN_WARNINGS:
        warnings.filterwarnings(action, message=pattern)


def init_platform(force_cpu: bool | None = None, local_rank: int | None = None) -> Platform:
    """Picks the device and backend for this process and prepares torch for it (idempotent).

    Args:
        force_cpu: run on CPU even if CUDA is present. Defaults to the environment variable
            ``MEGARLHF_FORCE_CPU=1``. (Forcing CPU on a CUDA machine only works in a process that
            hides its GPUs with ``CUDA_VISIBLE_DEVICES=""``, since the compatibility layer
            refuses to install next to a live CUDA runtime.)
        local_rank: GPU index on this node; defaults to ``LOCAL_RANK`` or 0.
    """
    global _PLATFORM
    if _PLATFORM is not None:
        return _PLATFORM
    quiet_known_warnings()
    if force_cpu is None:
        force_cpu = os.environ.get("MEGARLHF_FORCE_CPU", "0") == "1"
    if torch.cuda.is_available() and not force_cpu:
        if local_rank is None:
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        _PLATFORM = Platform(device=torch.device("cuda", local_rank), backend="nccl")
    else:
        from megarlhf.platform import cpu_compat

        cpu_compat.install()
        _PLATFORM = Platform(device=torch.device("cpu"), backend="gloo")
    return _PLATFORM


# At import, so processes that import megatron before init_platform (fork-server preloads,
# Ray workers) stay quiet too.
quiet_known_warnings()


# Environment variables this process set as defaults for a library (``default_env``), with the
# value it chose. Rank processes started by ``platform.launch`` decide these for themselves: a
# fork server started after the choice would otherwise hand it on (an in-process vLLM engine
# core's setting reaching a rank that hosts its own engine next to a process group).
_DEFAULTED_ENV: dict[str, str] = {}


def default_env(name: str, value: str) -> str:
    """Sets ``name`` to ``value`` unless the user set it; returns the value in force.

    Like ``os.environ.setdefault``, except that a value this process chose earlier is replaced
    (each call decides afresh) and is remembered so that child ranks do not inherit it
    (:func:`process_env_defaults`).
    """
    current = os.environ.get(name)
    if current is not None and _DEFAULTED_ENV.get(name) != current:
        return current  # the user's
    os.environ[name] = value
    _DEFAULTED_ENV[name] = value
    return value


def process_env_defaults() -> list[str]:
    """Names of the variables whose current value is a default this process chose."""
    return [k for k, v in _DEFAULTED_ENV.items() if os.environ.get(k) == v]


def current_platform() -> Platform:
    """The platform chosen by :func:`init_platform` (initialising it on first use)."""
    return _PLATFORM if _PLATFORM is not None else init_platform()
