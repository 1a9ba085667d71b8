"""The job's roles on the cluster: Ray placement groups, worker groups, and who holds the GPUs
when.

:class:`Cluster` reserves the placement of a job (planned by :mod:`megarlhf.planning.placement`,
reserved here by :class:`ClusterPlacement`), starts a :class:`~megarlhf.workers.WorkerGroup` per
Megatron role and a :class:`~megarlhf.workers.RolloutGroup` when the job generates, and switches
colocated roles in and out of GPU memory between phases (:meth:`Cluster.activate`): a role with
``offload: true`` is moved to host memory whenever another role of its pool is active, and the
rollout engine sleeps while a trainer uses the GPUs it shares.

Ray placement groups (:class:`ClusterPlacement`): one group per (pool, node), each
``STRICT_PACK`` — all of its bundles on one Ray node. The alternative, one ``PACK`` group per
pool, lets Ray spill a pool's bundles over nodes in an order it chooses, so TP groups could
straddle nodes and the bundle -> node map would have to be rediscovered after the fact. Each
logical node of the plan is bound to a Ray node of its own before anything is reserved
(:func:`~megarlhf.planning.placement.assign_nodes`), and every group of that logical node is
pinned there (a ``ray.io/node-id`` bundle label selector): the pools sharing a logical node
share its Ray node, two logical nodes never share one, and the node map ``megarlhf plan``
prints is the one that runs. :attr:`ClusterPlacement.nodes` keeps the binding; a failure
names the Ray node (:meth:`Cluster.lost_nodes`, :class:`NodeLostError`).

Slots are ``{"GPU": 1}`` bundles on a GPU cluster (or a local cluster that declares fake GPUs,
``ray.init(num_gpus=8)``), and ``{"CPU": 1}`` bundles in *CPU-slot* mode: on a machine without
GPUs every "GPU" of the config is one Ray CPU slot, so the same placement code runs the CPU
demo (:func:`slot_resource_for` picks the mode).
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from megarlhf.config import JobConfig
from megarlhf.config.validate import active_roles
from megarlhf.observability.logs import LOG_DIR_ENV, native_stderr_to
from megarlhf.planning.placement import (
    NodeSlots,
    PlacementError,
    PlacementPlan,
    Slot,
    assign_nodes,
    format_runs,
    plan_placement,
)
from megarlhf.workers import RoleSpec, RolloutGroup, RolloutSpec, WorkerGroup


class NodeLostError(RuntimeError):
    """A Ray node that held some of the job's ranks left the cluster; the run stopped.

    Attributes:
        nodes: the lost Ray nodes' ids.
        held: for each lost node id, ``{role: ranks}`` (rollout: replica indices) it held.
    """

    def __init__(self, message: str, *, nodes: list[str], held: dict[str, dict[str, list[int]]]):
        super().__init__(message)
        self.nodes = list(nodes)
        self.held = held


class Cluster:
    """Placement + worker groups of one job (a context manager that releases them)."""

    def __init__(self, job: JobConfig, *, roles: list[str] | None = None, rollout: bool = True,
                 pad_id: int = 0):
        self.job = job
        # Worker output (vLLM's, megatron's, Ray's own) goes to <output_dir>/logs, not the
        # driver's console (observability.logs).
        if job.output_dir:  # Ray's own messages go through logging (to logs/driver.log) too
            with native_stderr_to(os.path.join(job.output_dir, "logs", "driver.log")):
                init_ray(job, log_to_driver=False, configure_logging=False)
        else:
            init_ray(job)
        env = {LOG_DIR_ENV: os.path.join(os.path.abspath(job.output_dir), "logs")} \
            if job.output_dir else {}
        self.plan = plan_placement(job)
        self.placement = ClusterPlacement(self.plan, slot_resource_for(job))
        self.groups: dict[str, WorkerGroup] = {}
        self.rollout: RolloutGroup | None = None
        self._offloadable: dict[str, bool] = {}
        self._sleeping = False
        self._weights_awake = False  # asleep but for its weights (after a weight sync)
        try:
            wanted = roles if roles is not None else list(active_roles(job))
            start_rollout = rollout and "rollout" in self.plan.roles
            # The rollout engines start while the trainer roles build their models (vLLM's
            # import and engine start and megatron's model build overlap), except where a
            # colocated engine sizes its KV cache from the free accelerator memory: it must not
            # measure while a trainer on its GPUs is still allocating.
            overlap = start_rollout and (self.placement.slot_resource == "CPU"
                                         or not self._shares_pool("rollout", set(wanted)))
            if overlap:
                self.rollout = RolloutGroup.create(
                    self.placement, RolloutSpec.from_job(job), wait=False, env=env)
            for role in wanted:
                spec = RoleSpec.from_job(job, role, pad_id=pad_id)
                self.groups[role] = WorkerGroup.create(self.placement, spec, env=env)
                rc = active_roles(job)[role]
                self._offloadable[role] = bool(rc.offload)
            if overlap:
                self.rollout.wait_started()
            elif start_rollout:
                self.rollout = RolloutGroup.create(
                    self.placement, RolloutSpec.from_job(job), env=env)
        except BaseException:
            self.shutdown()
            raise

    def __getitem__(self, role: str):
        return self.groups[role]

    def __contains__(self, role: str) -> bool:
        return role in self.groups

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # -- colocation --------------------------------------------------------------------------
    def activate(self, *names: str) -> None:
        """Makes ``names`` (roles, or "rollout") resident; offloads colocated roles that allow it.

        Roles with ``offload: false`` stay resident (the plan counted them); the rollout engine
        sleeps while a trainer role of its pool is active and wakes up when it is needed.
        """
        want = set(names)
        for role, group in self.groups.items():
            if role in want:
                group.onload()
            elif self._offloadable.get(role) and self._shares_pool(role, want):
                group.offload()
        if self.rollout is not None:
            if "rollout" in want and self._sleeping:
                self.rollout.wake_up()  # after a sync only its KV cache was still asleep
                self._sleeping = self._weights_awake = False
            elif "rollout" not in want and (not self._sleeping or self._weights_awake) \
                    and self._shares_pool("rollout", want) \
                    and self.placement.slot_resource == "GPU":
                # Sleeping frees accelerator memory; CPU slots have none to free.
                self.rollout.sleep()
                self._sleeping, self._weights_awake = True, False

    def activate_for_sync(self, role: str = "actor") -> None:
        """What a weight sync from ``role`` needs resident, and no more: ``role``'s weights
        (its gradients and optimizer state stay in host memory when it offloads), the rollout
        engine's weights (a sleeping engine wakes only its weights when the update starts; its
        KV cache wakes with the next generation), nothing of the other colocated roles."""
        for r, group in self.groups.items():
            if r == role:
                group.onload(weights_only=bool(self._offloadable.get(r)))
            elif self._offloadable.get(r) and self._shares_pool(r, {role, "rollout"}):
                group.offload()
        # A sleeping engine's weights wake with the update (RolloutEngine.start_weight_update).
        self._weights_awake = self._sleeping

    def _shares_pool(self, role: str, others: set[str]) -> bool:
        try:
            mine = self.plan.role(role).pool
        except KeyError:
            return False
        for o in others:
            try:
                if self.plan.role(o).pool == mine:
                    return True
            except KeyError:
                continue
        return False

    # -- nodes -------------------------------------------------------------------------------
    def describe(self) -> str:
        """Where the plan's nodes run (``n0 -> Ray node 10.0.0.1 (3fa2c1de), ...``)."""
        return self.placement.describe() if self.placement is not None else "released"

    def held_by_node(self) -> dict[str, dict[str, list[int]]]:
        """Ray node id -> ``{role: ranks}`` (rollout: replica indices), as the workers
        reported where they run."""
        out: dict[str, dict[str, list[int]]] = {}
        groups = dict(self.groups)
        if self.rollout is not None:
            groups["rollout"] = self.rollout
        for role, g in groups.items():
            size = self.plan.role(role).tp if role == "rollout" else 1
            for info in g.ranks:
                node = info.node_id or self.placement.node_of(role, info.rank * size).node_id
                out.setdefault(node, {}).setdefault(role, []).append(info.rank)
        return out

    def lost_nodes(self, wait_s: float = 0.0, poll_s: float = 0.5) -> list[str]:
        """Ids of the Ray nodes of this job's placement that Ray reports dead.

        With ``wait_s > 0`` it waits up to that long for such a verdict (Ray declares a node
        dead some seconds after its raylet stops answering health checks); [] when none came.
        """
        import ray

        ours = {n.node_id for n in self.placement.nodes.values()} if self.placement else set()
        ours |= set(self.held_by_node())
        end = time.monotonic() + wait_s
        while True:
            try:
                alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
            except Exception:  # noqa: BLE001 - the GCS itself is gone: no verdict to give
                return []
            lost = sorted(ours - alive)
            if lost or time.monotonic() >= end:
                return lost
            time.sleep(poll_s)

    def node_lost_error(self, lost: list[str], *, during: str, resume_hint: str
                        ) -> NodeLostError:
        """The error that ends a run after ``lost`` nodes left (:func:`node_lost_error`)."""
        return node_lost_error(lost, self.held_by_node(),
                               self.placement.nodes if self.placement else {},
                               during=during, resume_hint=resume_hint)

    # -- teardown ----------------------------------------------------------------------------
    def shutdown(self) -> None:
        for g in list(self.groups.values()):
            try:
                g.shutdown()
            except Exception:  # noqa: BLE001 - best effort
                pass
        self.groups.clear()
        if self.rollout is not None:
            try:
                self.rollout.shutdown()
            except Exception:  # noqa: BLE001
                pass
            self.rollout = None
        placement = getattr(self, "placement", None)
        if placement is not None:
            placement.release()
            self.placement = None


def node_lost_error(lost: list[str], held: dict[str, dict[str, list[int]]],
                    nodes: dict[int, NodeSlots], *, during: str, resume_hint: str
                    ) -> NodeLostError:
    """The error that ends a run after the Ray nodes ``lost`` left: each with the placement
    node it was (``nodes``: logical node -> Ray node), its address, and the roles and ranks
    (rollout: replicas) it held (``held``: Ray node id -> {role: ranks}); then
    ``resume_hint``."""
    logical = {n.node_id: (k, n) for k, n in nodes.items()}
    lines = []
    for nid in lost:
        k, n = logical.get(nid, (None, None))
        name = f"Ray node {nid[:8]}" + (f" ({n.address}, placement node n{k})" if n else "")
        what = "; ".join(
            f"{role} {'replica' if role == 'rollout' else 'rank'}"
            f"{'s' if len(ranks) > 1 else ''} {format_runs(sorted(ranks))}"
            for role, ranks in held.get(nid, {}).items()) or "no rank of this job"
        lines.append(f"  {name}: {what}")
    head = (f"lost {len(lost)} Ray node{'s' if len(lost) > 1 else ''} {during}; the run "
            "stopped (the surviving ranks cannot continue without their peers):")
    return NodeLostError("\n".join([head, *lines, resume_hint]), nodes=lost,
                         held={nid: held.get(nid, {}) for nid in lost})


def slot_resource_for(job: JobConfig) -> str:
    """``"GPU"`` bundles when the Ray cluster has the GPUs, ``"CPU"`` slots otherwise.

    ``cluster.device=cpu`` always uses CPU slots; ``cuda`` requires GPUs; ``auto`` takes GPU
    bundles when the running cluster declares enough GPUs (real or declared fake ones).
    """
    import ray

    need = max((p.slots[-1].node * job.cluster.gpus_per_node + p.slots[-1].gpu + 1
                for p in plan_placement(job).pools), default=0)
    have = ray.cluster_resources().get("GPU", 0)
    if job.cluster.device == "cpu":
        return "CPU"
    if have >= need:
        return "GPU"
    if job.cluster.device == "cuda":
        raise PlacementError(f"cluster.device=cuda but the Ray cluster has {have:g} GPUs and "
                             f"the placement needs {need}; start Ray on the GPU nodes")
    return "CPU"


def init_ray(job: JobConfig, **kwargs: Any) -> None:
    """Connects to a running Ray cluster, or starts a local one sized for the job.

    A running cluster is ``cluster.ray_address`` (``host:port`` of its head, or ``auto``), else
    ``RAY_ADDRESS`` from the environment (``ray job submit`` sets it for the job's entrypoint).
    Locally without CUDA (the CPU demo) the cluster declares one CPU slot per configured GPU
    (at least the machine's cores), so CPU-slot placement groups fit; with CUDA it uses the
    machine's GPUs. Does nothing when Ray is already initialised (tests start their own).
    """
    import ray

    if ray.is_initialized():
        return
    address = job.cluster.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        # A busy head (a job's entrypoint started while its cluster is loaded) can miss Ray's
        # connect deadline once: try again before giving up.
        for attempt in range(3):
            try:
                ray.init(address=address, **kwargs)
                return
            except ConnectionError as e:
                if attempt == 2:
                    raise
                print(f"megarlhf: {e}; retrying in {5 * (attempt + 1)} s", flush=True)
                time.sleep(5 * (attempt + 1))
    if torch.cuda.is_available() and job.cluster.device != "cpu":
        ray.init(**kwargs)
    else:
        ray.init(num_cpus=max(os.cpu_count() or 1, job.cluster.total_gpus), num_gpus=0,
                 **kwargs)


def ray_nodes(resource: str) -> list[NodeSlots]:
    """The live Ray nodes with their total and free ``resource``."""
    import ray

    try:  # free resources per node: Ray's state API (private; totals alone without it)
        from ray._private.state import available_resources_per_node

        free = available_resources_per_node()
    except Exception:  # noqa: BLE001 - an older or newer Ray without it
        free = {}
    out = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        total = float(n.get("Resources", {}).get(resource, 0.0))
        out.append(NodeSlots(n["NodeID"], n.get("NodeManagerAddress", "?"), total,
                             float(free.get(n["NodeID"], {}).get(resource, total))))
    return out


class ClusterPlacement:
    """The plan's pools reserved as Ray placement groups (one STRICT_PACK group per pool and
    node), every logical node on a Ray node of its own.

    Args:
        plan: the placement plan.
        slot_resource: ``"GPU"`` or ``"CPU"`` (see :func:`slot_resource_for`).
        timeout_s: how long to wait for Ray to reserve every group; past it the groups are
            released and :class:`PlacementError` says what was missing.

    Attributes:
        nodes: logical node -> the Ray node (:class:`~megarlhf.planning.placement.NodeSlots`)
            that hosts it.
    """

    def __init__(self, plan: PlacementPlan, slot_resource: str = "GPU", timeout_s: float = 120.0):
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group

        if slot_resource not in ("GPU", "CPU"):
            raise ValueError(f"slot_resource must be 'GPU' or 'CPU', got {slot_resource!r}")
        self.plan = plan
        self.slot_resource = slot_resource
        self.nodes: dict[int, NodeSlots] = assign_nodes(plan, ray_nodes(slot_resource),
                                                        slot_resource)
        self._groups: dict[tuple[int, int], Any] = {}
        self._bundle: dict[tuple[int, Slot], tuple[tuple[int, int], int]] = {}
        for pool in plan.pools:
            for node in sorted({s.node for s in pool.slots}):
                idx = pool.slots_on(node)
                pin = {"ray.io/node-id": self.nodes[node].node_id}
                pg = placement_group([{slot_resource: 1} for _ in idx], strategy="STRICT_PACK",
                                     name=f"megarlhf-pool{pool.index}-n{node}",
                                     bundle_label_selector=[pin for _ in idx])
                self._groups[(pool.index, node)] = pg
                for b, i in enumerate(idx):
                    self._bundle[(pool.index, pool.slots[i])] = ((pool.index, node), b)
        pending = {pg.ready(): key for key, pg in self._groups.items()}
        ready, not_ready = ray.wait(list(pending), num_returns=len(pending), timeout=timeout_s)
        if not_ready:
            missing = [pending[r] for r in not_ready]
            for pg in self._groups.values():
                remove_placement_group(pg)
            desc = ", ".join(f"pool {p} on node n{n} = Ray node {self.nodes[n].address} "
                             f"({self.nodes[n].node_id[:8]}; "
                             f"{len(plan.pools[p].slots_on(n))} x {{{slot_resource}: 1}})"
                             for p, n in missing)
            raise PlacementError(
                f"Ray could not reserve {desc} within {timeout_s:.0f} s: each needs that many "
                f"{slot_resource}s free on that Ray node. The cluster has "
                f"{ray.cluster_resources()} in total and {ray.available_resources()} free; add "
                "nodes, free resources, or shrink the roles")

    def bundle(self, role: str, slot_index: int) -> tuple[Any, int]:
        """``(placement_group, bundle_index)`` of ``role``'s slot ``slot_index``."""
        rp = self.plan.role(role)
        key, b = self._bundle[(rp.pool, rp.slots[slot_index])]
        return self._groups[key], b

    def actor_options(self, role: str, slot_index: int, *, whole_group: int = 1
                      ) -> dict[str, Any]:
        """Ray ``.options(...)`` that put one process of ``role`` on its slot ``slot_index``.

        ``whole_group > 1`` (a vLLM replica with TP > 1 that starts its own Ray workers) asks
        for no accelerator itself and lets its child tasks use the same placement group.
        """
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        pg, b = self.bundle(role, slot_index)
        frac = self.plan.role(role).fraction
        opts: dict[str, Any] = dict(
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=b,
                placement_group_capture_child_tasks=whole_group > 1),
        )
        if whole_group > 1:
            opts.update(num_cpus=0, num_gpus=0)
        elif self.slot_resource == "GPU":
            opts.update(num_gpus=frac, num_cpus=0)
        else:
            opts.update(num_cpus=frac, num_gpus=0)
        return opts

    def node_of(self, role: str, slot_index: int) -> NodeSlots:
        """The Ray node of ``role``'s slot ``slot_index``."""
        return self.nodes[self.plan.role(role).slots[slot_index].node]

    def describe(self) -> str:
        """``n0 -> Ray node 10.0.0.1 (3fa2c1de), ...``: where each logical node runs."""
        return ", ".join(f"n{k} -> Ray node {n.address} ({n.node_id[:8]})"
                         for k, n in self.nodes.items())

    def bundle_indices(self, role: str, slots: range) -> list[int]:
        """Bundle indices (inside their one placement group) of ``role``'s ``slots``."""
        return [self.bundle(role, i)[1] for i in slots]

    def release(self) -> None:
        """Returns every placement group to Ray (idempotent)."""
        from ray.util.placement_group import remove_placement_group

        for pg in self._groups.values():
            try:
                remove_placement_group(pg)
            except Exception:  # noqa: BLE001 - already removed
                pass
        self._groups.clear()
