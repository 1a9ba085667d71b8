"""Run megatron-core's real code on CPU with gloo.

megatron-core (0.16.x) hard-codes CUDA in the code paths megarlhf needs: tensors are created
with ``device=torch.cuda.current_device()`` or ``device="cuda"``, p2p communication calls
``torch.cuda.synchronize``, the tensor-parallel RNG tracker reads and writes CUDA RNG state, and
optimizers compare ``tensor.type()`` with ``'torch.cuda.FloatTensor'``. This module redirects
exactly those calls to the CPU so that the *same* Megatron code runs in tests, in the CPU demo
and when a user debugs a config on a laptop. It is installed once per process by
:func:`megarlhf.platform.init_platform` and only when no CUDA device is present.

What is redirected (and nothing else):

* a ``TorchFunctionMode`` rewrites CUDA device arguments (``"cuda"``, ``"cuda:N"``,
  ``torch.device("cuda")`` and bare integers, which torch reads as CUDA ordinals) to ``"cpu"``;
  ``Tensor.cuda()`` and ``Tensor.pin_memory()`` return the tensor itself; ``Tensor.type()``
  reports CPU tensors under their CUDA type name so megatron's dtype checks pass;
* ``torch.cuda.current_device/synchronize/empty_cache/get_rng_state/set_rng_state/manual_seed``
  and the NVTX range functions;
* backward passes started with ``loss.backward()`` / ``torch.autograd.backward`` run under the
  mode too (a mode is off inside its own handler): :func:`_backward_under_mode`;
* megatron's own helpers (its RNG access, so the tensor-parallel RNG tracker keeps working with
  the same semantics; gathers of unequal blocks on gloo; the MoE helpers):
  :func:`megarlhf.compat.megatron.install_cpu`, checked against megatron-core's version there.

What this module replaces or calls in torch is checked when it is installed
(:func:`check_torch_items`); the megatron items in :mod:`megarlhf.compat.megatron`.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_INSTALLED = False
_LOCK = threading.Lock()
_CPU = torch.device("cpu")


def _is_cuda_device(d: Any) -> bool:
    if isinstance(d, bool):  # bool is an int subclass; never a device
        return False
    if isinstance(d, int):
        return True
    if isinstance(d, str):
        return d.startswith("cuda")
    if isinstance(d, torch.device):
        return d.type == "cuda"
    return False


def _fix_device(d: Any) -> Any:
    return _CPU if _is_cuda_device(d) else d


_TENSOR_TO = torch.Tensor.to
_TENSOR_CUDA = torch.Tensor.cuda
_TENSOR_TYPE = torch.Tensor.type
_TENSOR_PIN = torch.Tensor.pin_memory
_TENSOR_IS_PINNED = torch.Tensor.is_pinned
_TENSOR_RECORD_STREAM = torch.Tensor.record_stream
_TENSOR_BACKWARD = torch.Tensor.backward
_AUTOGRAD_BACKWARD = torch.autograd.backward


class CPUDeviceMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to the CPU for every torch call made under it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _TENSOR_CUDA:
            return args[0]
        if func is _TENSOR_PIN:
            return args[0]
        if func is _TENSOR_IS_PINNED:
            return False
        if func is _TENSOR_RECORD_STREAM:
            return None
        if func is _TENSOR_TYPE:
            if len(args) == 1 and not kwargs:
                name = func(*args)
                if name.startswith("torch.") and not name.startswith("torch.cuda."):
                    return "torch.cuda." + name[len("torch.") :]
                return name
            # x.type(torch.cuda.FloatTensor) / x.type('torch.cuda.FloatTensor')
            target = args[1] if len(args) > 1 else kwargs.get("dtype")
            if isinstance(target, str) and target.startswith("torch.cuda."):
                target = "torch." + target[len("torch.cuda.") :]
                return func(args[0], target)
            return func(*args, **kwargs)
        if func is torch.device and len(args) == 1 and not kwargs \
                and isinstance(args[0], int) and not isinstance(args[0], bool):
            # torch.device(torch.cuda.current_device()): megatron's yarn rotary embedding
            # (multi-latent attention) enters it as a device context.
            return _CPU
        if "device" in kwargs:
            kwargs["device"] = _fix_device(kwargs["device"])
        if func is _TENSOR_TO and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU) + tuple(args[2:])
        if func is _TENSOR_BACKWARD or func is _AUTOGRAD_BACKWARD:
            return _backward_under_mode(func, args, kwargs)
        return func(*args, **kwargs)


def _backward_under_mode(func, args, kwargs) -> None:
    """Runs a backward pass with the redirection active.

    A mode is switched off while its own ``__torch_function__`` runs, so ``loss.backward()`` or
    ``torch.autograd.backward(...)`` passed through would run every autograd Function's backward
    without it - and megatron's sequence-parallel / expert-parallel mappings allocate their
    backward buffers with ``device=torch.cuda.current_device()``. Calling ``func`` under a
    fresh mode would dispatch to that mode again (endlessly), so this does what
    ``torch.autograd.backward`` does after its dispatch check and starts the engine under a
    fresh mode. (Backward passes started by megatron's schedules call the engine directly and
    never come through here.)
    """
    from torch.autograd import _make_grads, _tensor_or_tensors_to_tuple
    from torch.autograd.graph import _engine_run_backward

    if func is _TENSOR_BACKWARD:
        names = ("self", "gradient", "retain_graph", "create_graph", "inputs")
    else:
        names = ("tensors", "grad_tensors", "retain_graph", "create_graph", "inputs")
    a = dict(zip(names, args))
    a.update(kwargs)
    a.pop("grad_variables", None)
    tensors = a.get(names[0])
    tensors = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
    grads = _tensor_or_tensors_to_tuple(a.get(names[1]), len(tensors))
    grads = _make_grads(tensors, grads, is_grads_batched=False)
    create = bool(a.get("create_graph") or False)
    retain = a.get("retain_graph")
    retain = create if retain is None else retain
    inputs = a.get("inputs")
    if inputs is None:
        inputs = ()
    elif isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    elif isinstance(inputs, dict):
        inputs = tuple(inputs.values())
    else:
        inputs = tuple(inputs)
    with CPUDeviceMode():
        _engine_run_backward(tensors, grads, retain, create, inputs, allow_unreachable=True,
                             accumulate_grad=True)


class _NullStream:
    """Stand-in for ``torch.cuda.Stream`` / ``torch.cuda.current_stream()`` on CPU."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        return None

    def wait_event(self, *args, **kwargs):
        return None

    def record_event(self, *args, **kwargs):
        return _NullEvent()

    def synchronize(self):
        return None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _NullEvent:
    """Stand-in for ``torch.cuda.Event`` on CPU (records nothing; waits return at once)."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        return None

    def wait(self, *args, **kwargs):
        return None

    def synchronize(self):
        return None

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _null_stream_ctx(stream=None):
    return _NullStream()


def _cpu_get_rng_state(device: Any = "cuda", *args, **kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = -1, *args, **kwargs) -> None:
    torch.set_rng_state(new_state)


def _cpu_manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


def _noop(*args, **kwargs):
    return None


def _zero(*args, **kwargs):
    return 0


class TorchCompatError(RuntimeError):
    """torch's internals are not what the CPU redirection was written against."""


TORCH_WRITTEN_FOR = "2.13.0"
_CUDA_NAMES = ("current_device", "synchronize", "empty_cache", "get_rng_state", "set_rng_state",
               "manual_seed", "manual_seed_all", "memory_allocated", "max_memory_allocated",
               "memory_reserved", "reset_peak_memory_stats", "Stream", "Event",
               "current_stream", "default_stream", "stream", "set_stream")


def check_torch_items() -> None:
    """What the redirection replaces or calls in torch must exist: the ``torch.cuda`` names it
    replaces and the autograd internals :func:`_backward_under_mode` starts a backward with."""
    import inspect

    from torch import autograd
    from torch.autograd import graph

    missing = [f"torch.cuda.{n}" for n in _CUDA_NAMES if not hasattr(torch.cuda, n)]
    missing += [f"torch.cuda.nvtx.{n}" for n in ("range_push", "range_pop", "mark")
                if not hasattr(torch.cuda.nvtx, n)]
    for mod, name, params in ((autograd, "_make_grads", ["outputs", "grads"]),
                              (autograd, "_tensor_or_tensors_to_tuple", ["tensors", "length"]),
                              (graph, "_engine_run_backward", ["t_outputs"])):
        fn = getattr(mod, name, None)
        if not callable(fn) or list(inspect.signature(fn).parameters)[: len(params)] != params:
            missing.append(f"{mod.__name__}.{name}({', '.join(params)}, ...)")
    if missing:
        raise TorchCompatError(
            f"megarlhf's CPU redirection of megatron-core was written for torch "
            f"{TORCH_WRITTEN_FOR}; the installed torch {torch.__version__} lacks "
            f"{', '.join(missing)}. Install torch {TORCH_WRITTEN_FOR} (tools/install_cpu.sh)")


def install() -> None:
    """Installs the redirections in this process (idempotent). Refuses when CUDA is present."""
    global _INSTALLED
    with _LOCK:
        if _INSTALLED:
            return
        if torch.cuda.is_available():
            raise RuntimeError(
                "megarlhf.platform.cpu_compat must not be installed when CUDA is available; "
                "use init_platform(), which picks cuda+nccl on a GPU machine."
            )

        from megarlhf.compat import megatron as megatron_compat

        check_torch_items()
        cuda = torch.cuda
        cuda.current_device = _zero
        cuda.synchronize = _noop
        cuda.empty_cache = _noop
        cuda.get_rng_state = _cpu_get_rng_state
        cuda.set_rng_state = _cpu_set_rng_state
        cuda.manual_seed = _cpu_manual_seed
        cuda.manual_seed_all = _cpu_manual_seed
        cuda.random.get_rng_state = _cpu_get_rng_state
        cuda.random.set_rng_state = _cpu_set_rng_state
        cuda.random.manual_seed = _cpu_manual_seed
        cuda.memory_allocated = _zero
        cuda.max_memory_allocated = _zero
        cuda.memory_reserved = _zero
        cuda.reset_peak_memory_stats = _noop
        cuda.Stream = _NullStream
        cuda.Event = _NullEvent
        cuda.current_stream = _null_stream_ctx
        cuda.default_stream = _null_stream_ctx
        cuda.stream = _null_stream_ctx
        cuda.set_stream = _noop
        cuda.nvtx.range_push = _noop
        cuda.nvtx.range_pop = _noop
        cuda.nvtx.mark = _noop

        # megatron's RNG helpers, uneven gathers on gloo, MoE helpers (compat.megatron).
        megatron_compat.install_cpu()

        # Pushed once per process and never popped: every later torch call sees it.
        CPUDeviceMode().__enter__()
        _INSTALLED = True


def installed() -> bool:
    return _INSTALLED
