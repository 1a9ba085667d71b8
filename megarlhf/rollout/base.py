"""The one interface every rollout engine implements, and the log-prob definition they share.

A rollout engine turns prompts (token ids) into sampled responses, and takes new weights from
the trainer after every update. Two engines implement it: :mod:`megarlhf.rollout.vllm_engine`
(vLLM's CUDA build on GPUs, its CPU build in tests and the demo) and
:mod:`megarlhf.rollout.hf_engine` (transformers; debugging).

Log-prob definition (shared by all engines, and what the learner computes)
-------------------------------------------------------------------------
For a response token ``y_t`` sampled after context ``x, y_<t``, the engine returns::

    logp_t = log_softmax(z_t / T)[y_t]        z_t = the model's logits, full vocabulary, fp32

* ``T`` is the request's temperature; greedy requests (``T == 0``) use ``T = 1`` here, so
  their log-probs are those of the untempered model.
* It is taken over the **full vocabulary, before top-k/top-p filtering**: filtering changes
  which tokens can be *drawn*, not the number reported. This is exactly what the learner
  computes from its own forward pass (``log_softmax(logits / T)`` gathered at the sampled
  tokens, see :func:`token_logprobs`), so rollout and learner log-probs can be compared
  token by token: after a weight sync they differ only by numerics (kernels, dtype, batch
  shape), which the log-prob consistency check measures.
* vLLM is configured to return the same number: ``logprobs_mode="processed_logprobs"`` (the
  log-softmax of the logits *after* temperature) and ``SamplingParams.logprobs=0`` (only the
  sampled token). vLLM's "processed" log-probs are also taken after top-k/top-p masking, where
  they would no longer match this definition, so the vLLM engine refuses to return log-probs
  for requests that use top-k/top-p (see :mod:`megarlhf.rollout.vllm_engine`).

Weight-update contract
----------------------
``update_weights`` takes an iterable of ``(hf_name, tensor)`` pairs: Hugging Face parameter
names (``model.layers.0.self_attn.q_proj.weight``) and Hugging Face layouts, each tensor full
(not sharded). The trainer's resharder produces this stream in bounded buckets; the engine
shards and fuses on its side (vLLM fuses q/k/v and gate/up and splits over its own TP ranks).
An engine consumes the iterable lazily and holds at most one bounded piece of it at a time.

* One call is one update: every tensor of a layer (q/k/v, gate/up, ...) must come in the same
  call (vLLM re-processes a layer once all of its tensors arrived; a layer left partial keeps
  its previous weights and the call fails).
* Names and shapes are checked against the engine's :class:`WeightManifest` before data moves
  (the trainer checks a whole stream once, so a mismatch never leaves half-written weights); a
  tensor the engine does not take is an error, never a silent skip; for a tied ``lm_head`` only
  the embedding travels.
"""

from __future__ import annotations

import abc
import difflib
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

FinishReason = Literal["stop", "length"]
FINISH_REASONS: tuple[str, ...] = ("stop", "length")

# vLLM clamps 0 < T < 1e-2 up to 1e-2 and rejects T > 2; every engine follows the same range so
# that a config that works on CPU works unchanged on GPU.
MIN_SAMPLING_TEMPERATURE = 1e-2
MAX_TEMPERATURE = 2.0


@dataclass(frozen=True)
class SamplingParams:
    """How to sample the responses of one ``generate`` call (the same for every prompt in it).

    Attributes:
        n: samples per prompt.
        temperature: softmax temperature ``T``; 0 means greedy (argmax), which needs ``n == 1``.
            Otherwise ``0.01 <= T <= 2``. Log-probs are ``log_softmax(logits / T)`` (``T = 1``
            when greedy), see the module docstring.
        top_p: nucleus sampling: draw only from the smallest set of most likely tokens whose
            probability (after temperature and top-k) reaches ``top_p``; 1 disables it.
        top_k: draw only from the ``top_k`` most likely tokens; 0 or -1 disables it.
        max_new_tokens: most response tokens per sample; a sample that reaches it without a
            stop token finishes with ``"length"``.
        stop_token_ids: a sampled token in this set ends the sample with ``"stop"``; the stop
            token is part of the response (and has a log-prob). The model's EOS is *not* added
            implicitly: list it here.
        seed: makes the call reproducible on one engine: sample ``i`` of prompt ``j`` draws from
            a generator seeded with ``seed + j * n + i``. None draws fresh randomness.
            Different engines do not draw the same samples from the same seed.
        logprobs: return the per-token log-probs of the sampled tokens.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    logprobs: bool = True

    def __post_init__(self):
        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not is_int(self.n) or self.n < 1:
            raise ValueError(f"sampling.n must be a positive integer, got {self.n!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
            raise ValueError(f"sampling.temperature must be a finite number, got {t!r}")
        if t < 0 or t > MAX_TEMPERATURE:
            raise ValueError(
                f"sampling.temperature must be in [0, {MAX_TEMPERATURE}], got {t} (0 means greedy)"
            )
        if 0 < t < MIN_SAMPLING_TEMPERATURE:
            raise ValueError(
                f"sampling.temperature={t} is below {MIN_SAMPLING_TEMPERATURE}: vLLM would "
                "silently raise it to that value and the log-probs would no longer match the "
                "learner's; use temperature=0 for greedy or a value >= 0.01"
            )
        if t == 0 and self.n != 1:
            raise ValueError(
                f"sampling.temperature=0 (greedy) gives {self.n} identical samples; set "
                "sampling.n=1 or a temperature > 0"
            )
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1] (1 disables it), got {p!r}")
        if not is_int(self.top_k) or self.top_k < -1:
            raise ValueError(
                f"sampling.top_k must be an integer >= 1, or 0 / -1 to disable it, "
                f"got {self.top_k!r}"
            )
        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(
                f"sampling.max_new_tokens must be a positive integer, got {self.max_new_tokens!r}"
            )
        stop = self.stop_token_ids
        if isinstance(stop, (str, bytes)) or not isinstance(stop, Iterable):
            raise ValueError(f"sampling.stop_token_ids must be a list of token ids, got {stop!r}")
        stop = tuple(stop)
        if not all(is_int(s) and s >= 0 for s in stop):
            raise ValueError(
                f"sampling.stop_token_ids must be non-negative integers, got {list(stop)}"
            )
        object.__setattr__(self, "stop_token_ids", tuple(dict.fromkeys(stop)))
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2**62):
            raise ValueError(
                f"sampling.seed must be None or an integer in [0, 2**62), got {self.seed!r}"
            )
        if not isinstance(self.logprobs, bool):
            raise ValueError(f"sampling.logprobs must be true or false, got {self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def logprob_temperature(self) -> float:
        """The ``T`` of the log-prob definition: the temperature, or 1 for greedy requests."""
        return 1.0 if self.greedy else float(self.temperature)

    @property
    def top_k_enabled(self) -> bool:
        return self.top_k > 0

    @property
    def filters_vocabulary(self) -> bool:
        """True when top-k or top-p can exclude tokens from sampling (never for greedy)."""
        return not self.greedy and (self.top_k_enabled or self.top_p < 1)


@dataclass(frozen=True)
class Sample:
    """One sampled response.

    Attributes:
        token_ids: the response tokens (a stop token, if any, is the last one).
        logprobs: ``log_softmax(logits / T)`` at each response token (see the module docstring),
            one per token; None when the request asked for no log-probs.
        finish_reason: ``"stop"`` (a stop token was sampled) or ``"length"`` (max_new_tokens).
        loss_mask: 1 where the token was generated, 0 where it was appended (an agent's
            observation tokens, :mod:`megarlhf.agents`); None: every token was generated.
        reward: the environment's reward of an agent's trajectory (None: the reward sources
            score the response).
        prompt_ids: this sample's own prompt when it differs from its output's (an agent
            whose environment added opening messages); None: the output's prompt.
    """

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...] | None
    finish_reason: FinishReason
    loss_mask: tuple[int, ...] | None = None
    reward: float | None = None
    prompt_ids: tuple[int, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "token_ids", tuple(int(t) for t in self.token_ids))
        if self.logprobs is not None:
            object.__setattr__(self, "logprobs", tuple(float(v) for v in self.logprobs))
            if len(self.logprobs) != len(self.token_ids):
                raise ValueError(
                    f"a sample has {len(self.token_ids)} tokens but {len(self.logprobs)} "
                    "log-probs; an engine must return exactly one per token"
                )
        if self.loss_mask is not None:
            object.__setattr__(self, "loss_mask", tuple(int(v) for v in self.loss_mask))
            if len(self.loss_mask) != len(self.token_ids) or \
                    not set(self.loss_mask) <= {0, 1}:
                raise ValueError(f"a sample's loss_mask must hold one 0/1 per token "
                                 f"({len(self.token_ids)}), got {len(self.loss_mask)}")
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(
                f"finish_reason must be one of {FINISH_REASONS}, got {self.finish_reason!r}"
            )


@dataclass(frozen=True)
class RolloutOutput:
    """The ``n`` samples of one prompt, in sample order."""

    prompt_token_ids: tuple[int, ...]
    samples: tuple[Sample, ...]

    def __post_init__(self):
        object.__setattr__(self, "prompt_token_ids", tuple(int(t) for t in self.prompt_token_ids))
        object.__setattr__(self, "samples", tuple(self.samples))


@dataclass(frozen=True)
class WeightUpdateStats:
    """What one ``update_weights`` call moved, and how fast.

    Attributes:
        tensors: tensors received from the stream.
        bytes: their total size in bytes.
        seconds: wall time of the call, producing the stream included (that is the sync cost).
        buckets: how many pieces the engine loaded them in (the HF engine copies one tensor at a
            time: one per tensor; vLLM: one per RPC bucket).
        missing: the engine's parameters that this call did not cover, in the engine's own names
            (HF names for the HF engine; vLLM's fused names for vLLM); None if the engine cannot
            tell. An empty tuple means every parameter was written.
        version: the weight version the engine serves afterwards.
        phases: seconds per phase of the update on the engine's side (vLLM: ``wait_s``
            waiting for the wire, ``load_s`` in vLLM's loaders, ``finish_s`` processing the
            layers; the slowest worker's).
        buffer_bytes: receive buffers the engine's side allocated for the update (the most of
            any worker): the transfer's own memory, beside what the engine's loading takes.
    """

    tensors: int
    bytes: int
    seconds: float
    buckets: int
    missing: tuple[str, ...] | None = field(default=None)
    version: str | None = None
    phases: dict[str, float] = field(default_factory=dict)
    buffer_bytes: int | None = None

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")

    def summary(self) -> str:
        return (
            f"{self.tensors} tensors, {self.bytes / 2**20:.1f} MiB in {self.buckets} buckets, "
            f"{self.seconds:.3f} s, {self.gb_per_s:.2f} GB/s"
        )


class WeightSyncError(ValueError):
    """A weight stream does not fit the rollout engine's model; the message names the tensor."""


# Buffers some checkpoints store that no engine loads (recomputed from the config).
_IGNORABLE_WEIGHT_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclass(frozen=True)
class WeightManifest:
    """The HF-named tensors a rollout engine's model takes in a weight update.

    Attributes:
        shapes: HF name -> full (unsharded) HF shape of every tensor the engine accepts.
        optional: names the stream may omit (a tied ``lm_head.weight``, a rotary buffer); every
            other name must be streamed, or the engine would keep stale values for it.
    """

    shapes: dict[str, tuple[int, ...]]
    optional: frozenset[str] = frozenset()

    def check_tensor(self, name: str, shape: Sequence[int]) -> None:
        """Raise :class:`WeightSyncError` unless ``name`` is known with exactly ``shape``."""
        want = self.shapes.get(name)
        if want is None:
            close = difflib.get_close_matches(name, list(self.shapes), n=1)
            hint = f" (closest: {close[0]!r})" if close else ""
            raise WeightSyncError(
                f"weight sync: tensor {name!r} is not a tensor of the rollout engine's model"
                f"{hint}; the trainer and the rollout engine serve different architectures, or "
                "the HF name mapping of this model family is wrong"
            )
        if tuple(shape) != tuple(want):
            raise WeightSyncError(
                f"weight sync: tensor {name!r} has shape {tuple(shape)}, the rollout engine's "
                f"model expects {tuple(want)} (full, unsharded HF layout); do the trainer's model "
                "and the rollout engine's model have the same config?"
            )

    def check_stream(self, streamed: Iterable[tuple[str, Sequence[int]]]) -> None:
        """Check a whole stream's ``(name, shape)`` list before any data moves.

        Every name must be known with its exact shape, appear once, and every non-optional
        name must be present (an engine keeping stale weights for a tensor is an error).
        """
        seen: set[str] = set()
        for name, shape in streamed:
            self.check_tensor(name, shape)
            if name in seen:
                raise WeightSyncError(f"weight sync: tensor {name!r} is streamed twice")
            seen.add(name)
        absent = [n for n in self.shapes if n not in seen and n not in self.optional]
        if absent:
            more = f" and {len(absent) - 5} more" if len(absent) > 5 else ""
            raise WeightSyncError(
                f"weight sync: the stream lacks {absent[:5]}{more}; the rollout engine would "
                "keep stale values for them"
            )


def hf_weight_manifest(model_dir: str) -> WeightManifest:
    """The :class:`WeightManifest` of an HF model directory.

    Read from the safetensors headers when the directory has weights (no data is read);
    otherwise from the model built by transformers on the meta device (no memory), under the
    checkpoint's names (per-expert names for mixture-of-experts models). Rotary
    buffers are optional; a tied ``lm_head.weight`` is not a tensor of the model (it is the
    embedding).
    """
    import glob
    import os

    from megarlhf.weights.hf_io import HFCheckpointReader

    cfg = _read_json(os.path.join(model_dir, "config.json"))
    tied = bool(cfg.get("tie_word_embeddings", False))
    shapes: dict[str, tuple[int, ...]] = {}
    if glob.glob(os.path.join(model_dir, "*.safetensors")):
        reader = HFCheckpointReader(model_dir)
        shapes = {n: reader.shape(n) for n in reader.names()}
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        from megarlhf.models.families import arch_spec, hf_experts_fused_to_disk

        hf_cfg = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_cfg)
        # transformers 5 keeps MoE experts fused in memory; checkpoints (and the stream) name
        # each expert.
        state = hf_experts_fused_to_disk(dict(model.state_dict()), arch_spec(hf_cfg))
        shapes = {n: tuple(t.shape) for n, t in state.items()}
    optional = {n for n in shapes if n.endswith(_IGNORABLE_WEIGHT_SUFFIXES)}
    if tied:
        # transformers does not store the tied copy, and vLLM skips it; accept none.
        shapes.pop("lm_head.weight", None)
    return WeightManifest(shapes=shapes, optional=frozenset(optional))


def _read_json(path: str) -> dict:
    import json

    with open(path, encoding="utf-8") as f:
        return json.load(f)


def token_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, temperature: float
) -> torch.Tensor:
    """The shared log-prob definition: ``log_softmax(logits / T)`` gathered at ``token_ids``.

    Args:
        logits: ``(..., V)`` logits over the full vocabulary (any float dtype; computed in fp32).
        token_ids: ``(...)`` the tokens whose log-probs are wanted.
        temperature: ``T``; 0 (greedy) is treated as 1.

    Returns:
        ``(...)`` fp32 log-probs.
    """
    t = 1.0 if temperature == 0 else float(temperature)
    logp = torch.log_softmax(logits.float() / t, dim=-1)  # (..., V)
    return logp.gather(-1, token_ids.long().unsqueeze(-1)).squeeze(-1)


def validate_prompts(prompt_token_ids: Sequence[Sequence[int]], vocab_size: int | None) -> None:
    """Raise a clear error for an empty batch, an empty prompt or an out-of-vocabulary id."""
    if isinstance(prompt_token_ids, (str, bytes)) or not isinstance(prompt_token_ids, Sequence):
        raise TypeError("prompt_token_ids must be a list of token-id lists, one per prompt")
    for i, prompt in enumerate(prompt_token_ids):
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence):
            raise TypeError(f"prompt {i} must be a list of token ids, got {type(prompt).__name__}")
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        for t in prompt:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise ValueError(f"prompt {i} has an invalid token id {t!r}")
            if vocab_size is not None and t >= vocab_size:
                raise ValueError(
                    f"prompt {i} has token id {t}, outside the model's vocabulary "
                    f"(size {vocab_size})"
                )


class RolloutEngine(abc.ABC):
    """A generation engine the driver talks to; one instance per rollout replica.

    Lifecycle when colocated with training: ``sleep()`` before the trainer runs (the engine
    gives back its accelerator memory), a weight update (the trainer's: ``start_weight_update``,
    ``receive_weights``, ``finish_weight_update``; or ``update_weights(stream)`` from this
    process), ``wake_up()``, then ``generate``. Engines accept updates while asleep (vLLM first
    retakes only its weight memory, and retakes its KV cache in ``wake_up``).
    """

    @abc.abstractmethod
    def generate(
        self, prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[RolloutOutput]:
        """Sample ``params.n`` responses for each prompt.

        Args:
            prompt_token_ids: one list of token ids per prompt (non-empty).
            params: the sampling parameters of every prompt in this call.

        Returns:
            One :class:`RolloutOutput` per prompt, in prompt order.
        """

    @abc.abstractmethod
    def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]]
    ) -> WeightUpdateStats:
        """Load new weights: full, unsharded tensors under Hugging Face names and layouts.

        The iterable is consumed lazily, so the caller may produce it on the fly (the resharder
        gathers one bucket at a time). Unknown names, or shapes that do not fit, raise an error
        that names the tensor.
        """

    # The weight-transfer protocol (vLLM's: init once; per update start -> receive ->
    # finish with the weight version; see megarlhf.weights.transfer). The defaults serve an
    # engine that lives in this process (the transformers engine): this process joins every
    # owner's group as the replica's one worker and feeds the received stream to
    # update_weights. The vLLM engine overrides them with vLLM's worker RPCs.
    def init_weight_transfer(self, init_info: dict) -> None:
        """Join every owner's transfer group (blocks until the owners open them)."""
        from megarlhf.weights.transfer import open_receiver_wires

        if int(init_info.get("workers_per_replica", 1)) != 1:
            raise ValueError(f"{type(self).__name__} is one process: workers_per_replica must "
                             f"be 1, got {init_info['workers_per_replica']}")
        for w in getattr(self, "_transfer_wires", []):
            w.close()
        self._transfer_timeout_s = float(init_info.get("timeout_s", 600.0))
        self._transfer_wire = init_info.get("wire", "gloo")
        from megarlhf.weights.delta import DeltaMirror

        self._delta_mirror = DeltaMirror()  # delta sync: the tensors last received (host)
        self._delta_pending = None
        self._transfer_wires = [] if self._transfer_wire == "ipc" else open_receiver_wires(
            init_info["rendezvous"], int(init_info["rank_offset"]), int(init_info["world_size"]),
            self._transfer_wire, self._transfer_timeout_s)

    def start_weight_update(self) -> None:
        """Begin an update (the engine serves nothing new until it is finished)."""
        import time

        self._transfer_parts: list[WeightUpdateStats] = []
        self._transfer_start = time.perf_counter()

    def receive_weights(self, update_info: dict) -> None:
        """Receive one transfer (``update_info["spec"]``) from the owners and load it."""
        from megarlhf.weights.transfer import TransferSpec, delta_mirror_for, iter_received

        if not hasattr(self, "_transfer_wires"):
            raise RuntimeError(f"{type(self).__name__}: receive_weights before "
                               "init_weight_transfer")
        spec = TransferSpec.from_dict(update_info["spec"])
        where = f"{type(self).__name__}, weight version {update_info.get('version')}"
        mirror = delta_mirror_for(update_info, getattr(self, "_delta_mirror", None), where)
        if mirror is not None:
            if not mirror.tensors:  # the first (full) sync of a delta run fills the copy
                from megarlhf.weights.delta import check_host_room

                check_host_room(spec.total_bytes, "a copy of the whole model", where)
            self._delta_pending = update_info.get("version")
            try:
                self._transfer_parts.append(self.update_weights(iter_received(
                    spec, self._transfer_wires, device=getattr(self, "device", "cpu"),
                    timeout_s=self._transfer_timeout_s, where=where, delta=mirror)))
            except BaseException:
                mirror.drop()  # partly updated: the next sync must be full
                self._delta_pending = None
                raise
            return
        if getattr(self, "_delta_mirror", None) is not None:
            self._delta_mirror.drop()  # a full sync without delta: the copy is stale now
        if self._transfer_wire == "ipc":
            from megarlhf.weights.transfer import decode_ipc, receive_ipc

            got: list = []
            receive_ipc(spec, decode_ipc(update_info["ipc_handles"]), got.extend,
                        device=torch.device(getattr(self, "device", "cuda")))
            self._transfer_parts.append(self.update_weights(iter(got)))
            return
        stream = iter_received(spec, self._transfer_wires,
                               device=getattr(self, "device", "cpu"),
                               timeout_s=self._transfer_timeout_s, where=where)
        self._transfer_parts.append(self.update_weights(stream))

    def finish_weight_update(self, version: str | None) -> WeightUpdateStats:
        """End the update; the engine serves weight version ``version`` from now on."""
        import time

        parts = getattr(self, "_transfer_parts", [])
        if getattr(self, "_delta_pending", None) is not None:  # the copy now holds this version
            self._delta_mirror.version = int(self._delta_pending)
            self._delta_pending = None
        missing = None
        if parts and all(p.missing is not None for p in parts):
            missing = tuple(sorted(set.intersection(*(set(p.missing) for p in parts))))
        self._weight_version = version
        return WeightUpdateStats(
            tensors=sum(p.tensors for p in parts), bytes=sum(p.bytes for p in parts),
            seconds=time.perf_counter() - getattr(self, "_transfer_start", time.perf_counter()),
            buckets=sum(p.buckets for p in parts), missing=missing, version=version)

    @property
    def weight_version(self) -> str | None:
        """The weight version the engine serves (None: not known)."""
        return getattr(self, "_weight_version", None)

    def weight_manifest(self) -> WeightManifest | None:
        """The HF-named tensors :meth:`update_weights` takes (None: the engine cannot tell).

        Callers compare a whole stream's names and shapes with it before sending any data
        (:meth:`WeightManifest.check_stream`), so a mismatch never leaves half-written weights.
        """
        return None

    @abc.abstractmethod
    def sleep(self) -> None:
        """Give back accelerator memory (weights offloaded, KV cache dropped) until wake_up."""

    @abc.abstractmethod
    def wake_up(self) -> None:
        """Retake the memory given back by sleep; generate works again afterwards."""

    @abc.abstractmethod
    def reset_prefix_cache(self) -> None:
        """Forget cached prompt prefixes (their KV was computed with the previous weights)."""

    def close(self) -> None:
        """Stop the engine's helper processes (if any); the engine is unusable afterwards."""


def check_stream_item(item: tuple[str, torch.Tensor]) -> tuple[str, torch.Tensor]:
    """One ``(name, tensor)`` of a weight stream, checked: a bad item is named here rather than
    failing inside the engine."""
    name, tensor = item
    if not isinstance(name, str):
        raise TypeError(f"update_weights: tensor names must be strings, got {name!r}")
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"update_weights: {name!r} is a {type(tensor).__name__}, not a tensor")
    return name, tensor


def iter_weight_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group a weight stream into buckets of at most ``bucket_bytes`` each.

    A tensor larger than ``bucket_bytes`` travels alone. Order is preserved (vLLM processes a
    layer once all its tensors arrived, so a layer-ordered stream keeps its buffers small).
    """
    if not isinstance(bucket_bytes, int) or bucket_bytes < 1:
        raise ValueError(
            f"weight bucket size must be a positive number of bytes, got {bucket_bytes!r}"
        )
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for item in named_tensors:
        name, tensor = check_stream_item(item)
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
        item = tensor = None
    if bucket:
        yield bucket


class LocalSyncClient:
    """vLLM's ``VLLMWeightSyncClient`` protocol over rollout engines in this process (tests,
    benchmarks, a single-process setup): what :class:`~megarlhf.workers.rollout_worker.
    RolloutSyncClient` does for Ray replicas. Engine ``k`` is replica ``k``; calls run on every
    engine at once (the transfer groups' rendezvous and broadcasts need all of them)."""

    def __init__(self, engines: Sequence[RolloutEngine]):
        self.engines = list(engines)

    def _all(self, fn) -> list:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=len(self.engines)) as pool:
            futures = [pool.submit(fn, k, e) for k, e in enumerate(self.engines)]
            return [f.result() for f in futures]

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        w = int(init_info["workers_per_replica"])
        self._all(lambda k, e: e.init_weight_transfer(
            {**init_info, "rank_offset": int(init_info.get("rank_offset", 1)) + k * w}))

    def start_weight_update(self) -> None:
        self._all(lambda k, e: e.start_weight_update())

    def update_weights(self, update_info: dict) -> None:
        self._all(lambda k, e: e.receive_weights(update_info))

    def finish_weight_update(self, weight_version: str | None = None) -> list:
        return self._all(lambda k, e: e.finish_weight_update(weight_version))
