"""A Megatron role (actor, critic, reference, reward model) as Ray actors, one per rank.

Each role's ranks form their own torch.distributed world (NCCL on GPU, gloo on CPU): rank 0
publishes its node address and a free port, every rank initialises the process group with a
bounded timeout, then megatron's groups for the role's layout
(:func:`~megarlhf.parallel.layout.initialize_parallel`), the model
(:func:`~megarlhf.models.builder.build_model`, weights from ``model.hf_dir`` or a random
initialisation for ``model.arch``) and a :class:`~megarlhf.engine.engine.MegatronEngine`.

:class:`WorkerGroup` drives them from the controller. Its methods, with their declared
dispatch (see :mod:`megarlhf.workers.dispatch`):

=========================  =================  ==============  ====================================
method                     dispatch           collect         returns
=========================  =================  ==============  ====================================
forward(batch, ...)        DP_SPLIT(batch)    DP_CONCAT       {logp[, entropy] | values}: (B, S)
train(batch, spec)         DP_SPLIT(batch)    OUTPUT_RANK0    StepResult (same on every rank)
offload() / onload(w)      ONE_TO_ALL         ALL             bytes moved, per rank
execute(fn, *a, **k)       ONE_TO_ALL         ALL             fn(worker, *a, **k), per rank
status()                   ONE_TO_ALL         ALL             per-rank state (offloaded, memory)
init_weight_transfer(...)  ONE_TO_ALL         ALL             per rank: owner or not, its bytes
send_weights(version)      ONE_TO_ALL         ALL             per rank: SendStats (as a dict)
hf_weight_shapes()         ONE_TO_ALL         RANK0           [(hf_name, shape)] the resharder sends
=========================  =================  ==============  ====================================

Weight sync (:meth:`WorkerGroup.sync_weights_to`) goes through vLLM's weight-transfer protocol
with megarlhf's backend (:mod:`megarlhf.weights.transfer`): every owner rank (TP rank 0 of each
pipeline stage; each expert-holding rank under EP) sends its own share straight to every
rollout worker, concurrently; rank 0 drives the rollout side's start / update / finish.

``execute`` is the generic broadcast for anything else that every rank must do together
(saving or loading a checkpoint: ``group.execute(save_fn, path)`` with
``save_fn(worker, path)`` using ``worker.engine`` and ``worker.ctx``).
"""

from __future__ import annotations

import faulthandler
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

from megarlhf.config.schema import JobConfig, ModelConfig, OptimizerConfig
from megarlhf.config.validate import active_roles, trained_roles
from megarlhf.engine.engine import MegatronEngine
from megarlhf.models.builder import build_model
from megarlhf.observability.logs import setup_worker_logging
from megarlhf.parallel.layout import ParallelLayout, initialize_parallel
from megarlhf.platform import current_platform, init_platform
from megarlhf.weights.loader import load_hf_dir
from megarlhf.weights.resharder import plan_hf_weights
from megarlhf.weights.transfer import OwnersTrainerEngine, TrainerInitInfo, WeightTransferError
from megarlhf.workers.dispatch import Collect, Dispatch, RankInfo, register
from megarlhf.workers.group import ActorGroup, WorkerError
from megarlhf.workers.rollout_worker import RolloutSyncClient, RolloutWorker

@dataclass(frozen=True)
class RoleSpec:
    """Everything a rank needs to build its role's engine (picklable, sent to every worker).

    Attributes:
        role: the role's name.
        model: the role's model config.
        layout: its parallel layout (``world_size`` ranks).
        head: ``"lm"`` (actor, reference) or ``"scalar"`` (critic, reward model).
        optimizer: the optimizer of a trained role; None for frozen roles.
        weights: ``"hf"`` loads ``model.hf_dir``; ``"init"`` initialises randomly (``arch``
            models; a ``model.checkpoint`` is loaded afterwards through ``execute``).
        total_steps: optimizer steps of the job (LR schedule length).
        micro_batch_size: sequences per micro-batch per rank.
        max_tokens_per_micro_batch: packing budget, or None.
        pad_id: padding token id.
        seed: megatron's RNG seed (and the scalar head's initialisation).
    """

    role: str
    model: ModelConfig
    layout: ParallelLayout
    head: Literal["lm", "scalar"]
    optimizer: OptimizerConfig | None
    weights: Literal["hf", "init"]
    total_steps: int = 1
    micro_batch_size: int = 1
    max_tokens_per_micro_batch: int | None = None
    pad_id: int = 0
    seed: int = 1234

    @staticmethod
    def from_job(job: JobConfig, role: str, *, total_steps: int | None = None,
                 pad_id: int = 0) -> "RoleSpec":
        """The spec of ``role`` in ``job`` (the config is read, never changed).

        ``total_steps`` defaults to the job's optimizer steps: ``train.steps`` for sft/rm, and
        ``train.steps * batch.steps_per_rollout * algorithm.ppo_epochs`` for RL jobs.
        """
        roles = active_roles(job)
        if role not in roles:
            raise ValueError(f"role {role!r} is not part of this {job.kind} job; its roles: "
                             f"{list(roles)}")
        rc = roles[role]
        model = job.role_model(role) if rc.model is None else rc.model
        trained = role in trained_roles(job)
        head = "scalar" if role in ("critic", "reward_model") or job.kind == "rm" else "lm"
        if total_steps is None:
            if job.kind in ("sft", "rm"):
                total_steps = job.train.steps
            else:
                total_steps = (job.train.steps * job.batch.steps_per_rollout
                               * job.algorithm.ppo_epochs)
        return RoleSpec(
            role=role, model=model, layout=rc.layout(), head=head,
            optimizer=rc.optimizer if trained else None,
            weights="hf" if model.hf_dir is not None else "init",
            total_steps=total_steps, micro_batch_size=rc.micro_batch_size_per_rank,
            max_tokens_per_micro_batch=rc.max_tokens_per_micro_batch, pad_id=pad_id,
            seed=job.seed)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class RoleWorker:
    """One rank of a Megatron role, hosted in a Ray actor (see the module docstring).

    Attributes after :meth:`setup`: ``engine`` (MegatronEngine), ``ctx`` (ParallelContext),
    ``spec`` (RoleSpec), ``rank``.
    """

    def __init__(self, role: str, rank: int, world_size: int, env: dict[str, str] | None = None,
                 threads: int | None = None, share: int = 1):
        faulthandler.register(signal.SIGUSR1, all_threads=True)  # stacks on demand (hangs)
        os.environ.update(env or {})
        setup_worker_logging(role, rank)  # this process's output to the run's logs/
        self.role = role
        self.rank = rank
        self.world_size = world_size
        # Default: this node's cores over the role's ``share`` ranks on it (counted here: the
        # driver's node may have other cores than the workers').
        self.threads = threads or max(1, (os.cpu_count() or 1) // max(1, share))
        self.engine = None
        self.ctx = None
        self.spec: RoleSpec | None = None
        self._transfer = None  # the weight-transfer engine (init_weight_transfer)

    # ------------------------------------------------------------------ bootstrap
    @register(Dispatch.ONE_TO_ALL, Collect.RANK0)
    def rendezvous_address(self) -> tuple[str, int]:
        """This node's address and a port free on it (rank 0's is the group's rendezvous)."""
        import ray

        return ray.util.get_node_ip_address(), _free_port()

    @register(Dispatch.ONE_TO_ALL, Collect.ALL)
    def setup(self, master_addr: str, master_port: int, spec: RoleSpec,
              pg_timeout_s: float) -> RankInfo:
        """Joins the role's torch.distributed world and builds the engine; returns where it is."""
        import ray
        import torch

        if spec.layout.world_size != self.world_size:
            raise ValueError(f"{spec.role}: layout {spec.layout.describe()} needs "
                             f"{spec.layout.world_size} ranks, the group has {self.world_size}")
        if self.threads:
            torch.set_num_threads(self.threads)
        # Ray shows each process only its own GPU(s): the first visible one is ours.
        platform = init_platform(local_rank=0)
        torch.distributed.init_process_group(
            backend=platform.backend, init_method=f"tcp://{master_addr}:{master_port}",
            rank=self.rank, world_size=self.world_size,
            timeout=timedelta(seconds=pg_timeout_s))
        self.ctx = initialize_parallel(spec.layout, seed=spec.seed)
        trained = spec.optimizer is not None
        use_dist_opt = bool(trained and spec.optimizer.use_distributed_optimizer)
        bundle = build_model(spec.model, self.ctx, head=spec.head, for_training=trained,
                             init_weights=spec.weights == "init", seed=spec.seed,
                             use_distributed_optimizer=use_dist_opt)
        if spec.weights == "hf":
            load_hf_dir(bundle, spec.model.hf_dir)
        self.engine = MegatronEngine(
            bundle, spec.optimizer, total_steps=spec.total_steps,
            micro_batch_size=spec.micro_batch_size,
            max_tokens_per_micro_batch=spec.max_tokens_per_micro_batch, pad_id=spec.pad_id)
        self.spec = spec
        c = self.ctx
        return RankInfo(rank=self.rank, dp_rank=c.dp_rank, dp_size=c.layout.dp,
                        tp_rank=c.tp_rank, pp_rank=c.pp_rank, cp_rank=c.cp_rank,
                        is_output_rank=c.is_output_rank,
                        node_ip=ray.util.get_node_ip_address(), pid=os.getpid(),
                        devices=os.environ.get("CUDA_VISIBLE_DEVICES", ""),
                        node_id=ray.get_runtime_context().get_node_id(),
                        rendezvous=f"{master_addr}:{master_port}")

    # ------------------------------------------------------------------ compute
    @register(Dispatch.DP_SPLIT, Collect.DP_CONCAT, split=("batch",))
    def forward(self, batch, temperature: float = 1.0, entropy: bool = False):
        """Per-token log-probs (and entropy) or values of ``batch`` (this replica's shard)."""
        return self.engine.forward(batch, temperature=temperature, entropy=entropy)

    @register(Dispatch.DP_SPLIT, Collect.OUTPUT_RANK0, split=("batch",))
    def train(self, batch, spec):
        """One optimizer step with loss spec ``spec`` (megarlhf.engine.loss_fns)."""
        return self.engine.train(batch, spec)

    @register(Dispatch.ONE_TO_ALL, Collect.ALL)
    def offload(self) -> int:
        """Weights, grads and optimizer state to host memory; returns bytes moved."""
        return self.engine.offload()

    @register(Dispatch.ONE_TO_ALL, Collect.ALL)
    def onload(self, weights_only: bool = False) -> int:
        """Back from host memory: everything, or the weights only (a weight sync)."""
        return self.engine.onload(weights_only=weights_only)

    @register(Dispatch.ONE_TO_ALL, Collect.ALL)
    def execute(self, fn: Callable, *args, **kwargs) -> Any:
        """Runs ``fn(worker, *args, **kwargs)`` on every rank (checkpointing and the like)."""
        return fn(self, *args, **kwargs)

    @register(Dispatch.ONE_TO_ALL, Collect.ALL)
    def status(self) -> dict[str, Any]:
        """This rank's state: offloaded or not, accelerator memory in use."""
        import torch

        out: dict[str, Any] = {"rank": self.rank, "offloaded": self.engine.offloaded,
                               "pid": os.getpid()}
        if torch.cuda.is_available():
            out["cuda_allocated_bytes"] = torch.cuda.memory_allocated()
            out["cuda_reserved_bytes"] = torch.cuda.memory_reserved()
        return out

    # ------------------------------------------------------------------ weight sync
    @register(Dispatch.ONE_TO_ALL, Collect.RANK0)
    def hf_weight_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Collective: the ``(hf_name, shape)`` of every tensor the resharder streams, in order."""
        return [(e.name, tuple(e.shape)) for e in plan_hf_weights(self.engine.bundle).entries]

    @register(Dispatch.ONE_TO_ALL, Collect.ALL)
    def init_weight_transfer(self, rollout_actors: list, rollout_ranks: list[RankInfo],
                             workers_per_replica: int, bucket_bytes: int, dtype, wire: str,
                             timeout_s: float, colocated: bool = False,
                             measure_delta: bool = False, delta: bool = False
                             ) -> dict[str, Any]:
        """Collective: opens the transfer groups (every owner its own) and, on rank 0, has
        every rollout worker join them (:meth:`OwnersTrainerEngine.trainer_init`). Wire "auto":
        gloo on CPU, NCCL between GPUs, CUDA IPC when the rollout shares this role's GPUs."""
        import ray

        if wire == "auto":
            wire = current_platform().backend  # NCCL between GPUs, gloo on CPU
            if wire == "nccl" and colocated:
                wire = "ipc"  # NCCL refuses two ranks of one group on one GPU
        client = None
        if self.rank == 0:
            client = RolloutSyncClient(ActorGroup("rollout", rollout_actors, rollout_ranks,
                                                  RolloutWorker, call_timeout_s=timeout_s))
        info = TrainerInitInfo(rank=self.rank, host=ray.util.get_node_ip_address(),
                               num_receivers=len(rollout_actors) * workers_per_replica,
                               workers_per_replica=workers_per_replica,
                               bucket_bytes=bucket_bytes, dtype=dtype, wire=wire,
                               timeout_s=timeout_s, measure_delta=measure_delta,
                               delta=delta)
        if self._transfer is not None:
            self._transfer.shutdown()
            self._transfer = None
        self._transfer = OwnersTrainerEngine.trainer_init(info, self.engine.bundle,
                                                          client=client)
        spec = self._transfer.spec
        k = self._transfer.owner_index
        return {"rank": self.rank, "owner": k, "owners": list(spec.owners),
                "bytes": spec.owner_bytes()[k] if k is not None else 0,
                "total_bytes": spec.total_bytes}

    @register(Dispatch.ONE_TO_ALL, Collect.ALL)
    def send_weights(self, version: int) -> dict[str, Any]:
        """Collective: one weight update of version ``version``; this rank's SendStats."""
        if self._transfer is None:
            raise RuntimeError(f"{self.role} rank {self.rank}: send_weights before "
                               "init_weight_transfer")
        return self._transfer.send_weights(version).to_dict()


class WorkerGroup(ActorGroup):
    """The ranks of one Megatron role, driven as one (methods: see the module docstring).

    Build with :meth:`create` (or :meth:`from_job`); the constructor wraps existing actors.
    """

    spec: RoleSpec

    @classmethod
    def create(cls, placement, spec: RoleSpec, *, call_timeout_s: float = 1800.0,
               startup_timeout_s: float = 1800.0, pg_timeout_s: float = 600.0,
               threads: int | None = None, env: dict[str, str] | None = None,
               poll_s: float = 0.5, grace_s: float = 3.0) -> "WorkerGroup":
        """Starts one actor per rank of ``spec.role`` on its placement slots and builds it.

        Args:
            placement: a :class:`~megarlhf.planning.placement.ClusterPlacement` holding the
                role.
            spec: what to build.
            call_timeout_s: default bound of every call.
            startup_timeout_s: bound of the start (process group + model build + weights).
            pg_timeout_s: torch.distributed timeout inside the role's world: a collective
                waiting for a dead peer raises after this long on the surviving ranks.
            threads: torch threads per rank on CPU; default the node's cores / the role's ranks
                on that node.
            env: extra environment variables for the workers.
        """
        import ray

        role = spec.role
        world = spec.layout.world_size
        rp = placement.plan.role(role)
        if len(rp.slots) != world:
            raise ValueError(f"{role}: the placement has {len(rp.slots)} slots, the layout "
                             f"{spec.layout.describe()} needs {world}")
        env = dict(env or {})
        if placement.slot_resource == "CPU":
            env.setdefault("MEGARLHF_FORCE_CPU", "1")  # CPU slots: no accelerator, even if present
        per_node = {n: sum(1 for s in rp.slots if s.node == n) for n in rp.nodes}
        remote = ray.remote(RoleWorker)
        actors = [remote.options(**placement.actor_options(role, r)).remote(
            role, r, world, env, threads, per_node[rp.slots[r].node]) for r in range(world)]
        boot = [RankInfo(rank=r, dp_rank=0, dp_size=1) for r in range(world)]
        group = cls(role, actors, boot, RoleWorker, call_timeout_s=call_timeout_s,
                    poll_s=poll_s, grace_s=grace_s)
        group.spec = spec
        group.placement = placement
        try:
            addr, port = group.rendezvous_address(timeout_s=startup_timeout_s)
            group.ranks = group.setup(addr, port, spec, pg_timeout_s,
                                      timeout_s=startup_timeout_s)
        except BaseException:
            group.shutdown()
            raise
        return group

    @classmethod
    def from_job(cls, job: JobConfig, role: str, placement, *, total_steps: int | None = None,
                 pad_id: int = 0, **kwargs) -> "WorkerGroup":
        """:meth:`create` with :meth:`RoleSpec.from_job`."""
        return cls.create(placement, RoleSpec.from_job(job, role, total_steps=total_steps,
                                                       pad_id=pad_id), **kwargs)

    @property
    def layout(self) -> ParallelLayout:
        return self.spec.layout

    def check_weight_manifest(self, rollout, *, timeout_s: float | None = None) -> None:
        """Compares the names and shapes the resharder will stream with what the rollout
        engines take, before any data moves (once per rollout group): a mismatch raises
        :class:`~megarlhf.rollout.base.WeightSyncError` naming the tensor and leaves the
        engines' weights untouched."""
        checked = self.__dict__.setdefault("_manifest_checked", set())
        if id(rollout) in checked:
            return
        manifest = rollout.weight_manifest(timeout_s=timeout_s)
        if manifest is not None:
            manifest.check_stream(self.hf_weight_shapes(timeout_s=timeout_s))
        checked.add(id(rollout))

    def sync_weights_to(self, rollout, *, version: int, timeout_s: float | None = None
                        ) -> "SyncResult":
        """One weight update of version ``version``: this role's weights (HF names, full
        tensors) into every rollout replica, through vLLM's weight-transfer protocol.

        The first sync into a rollout group checks the stream's names and shapes against the
        engines' (:meth:`check_weight_manifest`) and opens the transfer groups (every owner its
        own, every rollout worker in all of them). Then every owner rank sends its share,
        concurrently, while rank 0 starts, feeds and finishes the update on the rollout side;
        a failure anywhere (a dead owner or worker: the groups time out after ``rollout.
        weight_sync_timeout_s``) raises naming the role, rank or replica and the version, and
        leaves the replicas serving nothing until a complete update.
        """
        timeout = self.call_timeout_s if timeout_s is None else timeout_s
        self.check_weight_manifest(rollout, timeout_s=timeout)
        if self.__dict__.get("_transfer_target") != id(rollout):
            dtype = rollout.weight_dtype(timeout_s=timeout)
            wpr = rollout.workers_per_replica(timeout_s=timeout)
            sync_timeout = rollout.spec.weight_sync_timeout_s
            plan = self.placement.plan
            colocated = plan.role(self.spec.role).pool == plan.role("rollout").pool
            self.__dict__["_transfer_info"] = self.init_weight_transfer(
                rollout.actors, rollout.ranks, wpr, rollout.bucket_bytes, dtype,
                rollout.spec.weight_wire, sync_timeout, colocated,
                rollout.spec.weight_sync_measure_delta,
                getattr(rollout.spec, "weight_sync_delta", False), timeout_s=timeout)
            self.__dict__["_transfer_target"] = id(rollout)
        try:
            per_rank = self.send_weights(int(version), timeout_s=timeout)
        except WorkerError as e:
            self.__dict__.pop("_transfer_target", None)  # the groups are unusable now
            raise WeightTransferError(
                f"the weight sync of version {version} from {self.role} into the rollout "
                f"failed ({type(e).__name__}: {e}); the replicas serve no weights until a "
                "complete sync (resume the run from its last checkpoint)") from e
        except BaseException:
            self.__dict__.pop("_transfer_target", None)
            raise
        return SyncResult(replicas=list(per_rank[0]["replicas"]), ranks=per_rank,
                          owners=self.__dict__["_transfer_info"])


@dataclass(frozen=True)
class SyncResult:
    """One weight sync: each replica's :class:`~megarlhf.rollout.base.WeightUpdateStats`, each
    trainer rank's send statistics (``SendStats`` as dicts) and the owners' layout (what
    ``init_weight_transfer`` returned per rank)."""

    replicas: list
    ranks: list[dict[str, Any]]
    owners: list[dict[str, Any]]

    @property
    def bytes(self) -> int:
        """Bytes of one replica's update (the model in the wire dtype)."""
        return self.replicas[0].bytes if self.replicas else 0

    @property
    def changed_fraction(self) -> float | None:
        """Elements changed since the previous sync / elements (``weight_sync_measure_delta``;
        None when nothing was compared)."""
        n = sum(r["elements"] for r in self.ranks)
        return sum(r["changed"] for r in self.ranks) / n if n else None

    @property
    def sent_fraction(self) -> float | None:
        """Delta sync (``rollout.weight_sync_delta``): bytes the owners sent / bytes a full
        sync sends (1.0 on a full one); None without delta sync."""
        if all(r.get("delta", "off") == "off" for r in self.ranks):
            return None
        dense = sum(r.get("dense_bytes", 0) for r in self.ranks)
        return sum(r["bytes"] for r in self.ranks) / dense if dense else None

    def phases(self) -> dict[str, float]:
        """Seconds per phase: the slowest owner's gather and wire time, the slowest worker's
        wait, load and finish."""
        out = {"gather_s": max((r["gather_s"] for r in self.ranks), default=0.0),
               "wire_s": max((r["wire_s"] for r in self.ranks), default=0.0)}
        for rep in self.replicas:
            for k, v in (rep.phases or {}).items():
                out[k] = max(out.get(k, 0.0), v)
        return out

    @property
    def receive_buffer_bytes(self) -> int:
        """The most receive-buffer memory any rollout worker allocated for this sync."""
        return max((rep.buffer_bytes or 0 for rep in self.replicas), default=0)
