"""Which GPUs each role runs on, and the Ray placement groups that reserve them.

Planning is pure (:func:`plan_placement`, no Ray): the roles are grouped into *pools* of GPUs
by ``cluster.placement``,

* ``colocate_all``: one pool; every role (actor, critic, reference, reward model, rollout)
  time-shares the same GPUs;
* ``colocate_pairs``: pool A = actor + reference + rollout, pool B = critic + reward model;
* ``split``: one pool per role,

and a pool's GPUs are laid out node by node over the cluster (``num_nodes x gpus_per_node``).
A role of ``n`` GPUs in a pool takes the pool's first ``n`` slots: its rank ``r`` (megatron
orders ranks TP-fastest) runs on slot ``r``, rollout replica ``k`` on slots
``[k*tp, (k+1)*tp)``. A pool starts at a node boundary whenever that is what keeps every TP
group (a trainer role's ``parallel.tp``, a rollout replica's ``rollout.tp``) inside one node;
a layout whose TP groups cannot stay inside a node (``tp > gpus_per_node``, or a multi-node
pool with ``gpus_per_node % tp != 0``) is refused.

Colocation is fractional: every process on a shared GPU asks Ray for ``1 / (roles in the pool)``
of it (rounded down to Ray's 1e-4 resolution), so the pool's roles fit on the same bundles and
nothing else does; memory is shared by taking turns (offload/sleep between phases), which
``megarlhf plan`` checks.

Ray placement groups (:meth:`PlacementPlan.create`): one group per (pool, node), each
``STRICT_PACK`` — all of its bundles on one Ray node. The alternative, one ``PACK`` group per
pool, lets Ray spill a pool's bundles over nodes in an order it chooses, so TP groups could
straddle nodes and the bundle -> node map would have to be rediscovered after the fact. With
per-node groups the planner's logical nodes are exact inside a pool; which physical node hosts
a logical node (and whether two pools' groups share one) is Ray's choice.

Slots are ``{"GPU": 1}`` bundles on a GPU cluster (or a local cluster that declares fake GPUs,
``ray.init(num_gpus=8)``), and ``{"CPU": 1}`` bundles in *CPU-slot* mode: on a machine without
GPUs every "GPU" of the config is one Ray CPU slot, so the same placement code runs the CPU
demo (:func:`slot_resource_for` picks the mode).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from megarlhf.config.base import ConfigError
from megarlhf.config.schema import JobConfig

RL_KINDS = ("ppo", "grpo", "dpo", "bon")
ROLE_ORDER = ("actor", "critic", "reference", "reward_model", "rollout")


class PlacementError(ConfigError):
    """The roles cannot be placed as configured; the message says what to change."""


@dataclass(frozen=True)
class Slot:
    """One GPU (or CPU slot): ``gpu`` of logical node ``node``."""

    node: int
    gpu: int

    def __str__(self) -> str:
        return f"n{self.node}:{self.gpu}"


@dataclass(frozen=True)
class RolePlacement:
    """Where one role runs.

    Attributes:
        role: the role's name ("actor", ..., "rollout").
        pool: index of its pool.
        slots: its GPUs; trainer rank ``r`` -> ``slots[r]``, rollout replica ``k`` ->
            ``slots[k*tp:(k+1)*tp]``.
        fraction: the share of each GPU one of its processes asks Ray for.
        tp: GPUs per tensor-parallel group (kept inside a node).
    """

    role: str
    pool: int
    slots: tuple[Slot, ...]
    fraction: float
    tp: int

    @property
    def nodes(self) -> tuple[int, ...]:
        return tuple(sorted({s.node for s in self.slots}))


@dataclass(frozen=True)
class Pool:
    index: int
    roles: tuple[str, ...]
    slots: tuple[Slot, ...]

    @property
    def fraction(self) -> float:
        return math.floor(1e4 / len(self.roles)) / 1e4

    def slots_on(self, node: int) -> list[int]:
        """Indices (in this pool) of the slots on logical node ``node``."""
        return [i for i, s in enumerate(self.slots) if s.node == node]


@dataclass(frozen=True)
class PlacementPlan:
    """The placement of every role of a job (pure data; :meth:`create` reserves it in Ray)."""

    mode: str
    num_nodes: int
    gpus_per_node: int
    pools: tuple[Pool, ...]
    roles: dict[str, RolePlacement] = field(hash=False)

    def role(self, name: str) -> RolePlacement:
        if name not in self.roles:
            raise KeyError(f"role {name!r} is not placed; placed roles: {list(self.roles)}")
        return self.roles[name]

    def colocated_with(self, name: str) -> tuple[str, ...]:
        """The other roles sharing ``name``'s GPUs."""
        pool = self.pools[self.roles[name].pool]
        return tuple(r for r in pool.roles if r != name)

    def describe(self) -> str:
        lines = [f"placement {self.mode}: {self.num_nodes} node(s) x {self.gpus_per_node} GPUs; "
                 "one STRICT_PACK placement group per (pool, node)"]
        for p in self.pools:
            share = "" if len(p.roles) == 1 else f", {p.fraction:g} GPU per process (time-shared)"
            lines.append(f"  pool {p.index}: {', '.join(p.roles)} on {format_slots(p.slots)}"
                         f"{share}")
        return "\n".join(lines)

    def create(self, slot_resource: str = "GPU", timeout_s: float = 120.0) -> "ClusterPlacement":
        """Reserves the pools in the running Ray cluster (see :class:`ClusterPlacement`)."""
        return ClusterPlacement(self, slot_resource, timeout_s)


def format_slots(slots: tuple[Slot, ...] | list[Slot]) -> str:
    """``n0:0-7, n1:0-3`` (runs of GPUs per node); ``n0-15:0-7`` when consecutive nodes hold
    the same GPUs."""
    by_node: dict[int, list[int]] = {}
    for s in slots:
        by_node.setdefault(s.node, []).append(s.gpu)
    per_node = [(node, _runs(gpus)) for node, gpus in by_node.items()]
    parts, i = [], 0
    while i < len(per_node):
        j = i
        while (j + 1 < len(per_node) and per_node[j + 1][1] == per_node[i][1]
               and per_node[j + 1][0] == per_node[j][0] + 1):
            j += 1
        nodes = f"n{per_node[i][0]}" + (f"-{per_node[j][0]}" if j > i else "")
        parts.append(f"{nodes}:{per_node[i][1]}")
        i = j + 1
    return ", ".join(parts)


def _runs(xs: list[int]) -> str:
    runs, start, prev = [], xs[0], xs[0]
    for x in xs[1:] + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        runs.append(f"{start}" if start == prev else f"{start}-{prev}")
        if x is not None:
            start = prev = x
    return ",".join(runs)


def role_sizes(job: JobConfig) -> dict[str, tuple[int, int]]:
    """``role -> (GPUs, TP group size)`` for every role the job runs (rollout included)."""
    from megarlhf.config.validate import active_roles

    out = {n: (r.num_gpus, r.parallel.tp) for n, r in active_roles(job).items()}
    if job.kind in RL_KINDS:
        out["rollout"] = (job.rollout.num_gpus, job.rollout.tp)
    return {n: out[n] for n in ROLE_ORDER if n in out}


def _pool_roles(job: JobConfig, roles: list[str]) -> list[tuple[str, ...]]:
    mode = job.cluster.placement
    if mode == "colocate_all":
        return [tuple(roles)]
    if mode == "split":
        return [(r,) for r in roles]
    first = tuple(r for r in roles if r in ("actor", "reference", "rollout"))
    second = tuple(r for r in roles if r in ("critic", "reward_model"))
    return [p for p in (first, second) if p]


def _units_inside_nodes(start: int, size: int, unit: int, gpn: int) -> bool:
    return all((start + k) // gpn == (start + k + unit - 1) // gpn
               for k in range(0, size - size % unit, unit))


def plan_placement(job: JobConfig) -> PlacementPlan:
    """Places every role of ``job`` on the cluster (pure; raises :class:`PlacementError`)."""
    c = job.cluster
    gpn, total = c.gpus_per_node, c.total_gpus
    sizes = role_sizes(job)
    for name, (n, tp) in sizes.items():
        key = "rollout.tp" if name == "rollout" else f"{name}.parallel.tp"
        if tp > gpn:
            raise PlacementError(
                f"{key} = {tp} > cluster.gpus_per_node = {gpn}: a tensor-parallel group must "
                f"stay inside one node (its all-reduces need NVLink); lower {key} (and raise "
                "pipeline parallelism instead) or use nodes with more GPUs")
    pools: list[Pool] = []
    placements: dict[str, RolePlacement] = {}
    cursor = 0
    for index, members in enumerate(_pool_roles(job, list(sizes))):
        size = max(sizes[r][0] for r in members)
        start = cursor

        def fits(at: int) -> bool:
            return all(_units_inside_nodes(at, sizes[r][0], sizes[r][1], gpn) for r in members)

        if not fits(start):
            start = -(-cursor // gpn) * gpn  # next node boundary
            if not fits(start):
                bad = [r for r in members
                       if not _units_inside_nodes(start, sizes[r][0], sizes[r][1], gpn)]
                raise PlacementError(
                    f"the TP groups of {', '.join(bad)} (tp = "
                    f"{', '.join(str(sizes[r][1]) for r in bad)}) cannot all stay inside nodes "
                    f"of {gpn} GPUs; choose tp values that divide cluster.gpus_per_node")
        if start + size > total:
            raise PlacementError(
                f"placement {c.placement} needs {start + size} GPUs (pools of "
                f"{', '.join(f'{r}={sizes[r][0]}' for r in sizes)}, each TP group inside a node) "
                f"but the cluster has num_nodes*gpus_per_node = {c.num_nodes}*{gpn} = {total}; "
                "add nodes, shrink num_gpus, or colocate roles")
        slots = tuple(Slot((start + i) // gpn, (start + i) % gpn) for i in range(size))
        pool = Pool(index, tuple(members), slots)
        pools.append(pool)
        for r in members:
            placements[r] = RolePlacement(r, index, slots[: sizes[r][0]], pool.fraction,
                                          sizes[r][1])
        cursor = start + size
    return PlacementPlan(c.placement, c.num_nodes, gpn, tuple(pools), placements)


# ---------------------------------------------------------------------------------------- Ray
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
    """Connects to ``cluster.ray_address`` or starts a local cluster sized for the job.

    Locally without CUDA (the CPU demo) the cluster declares one CPU slot per configured GPU
    (at least the machine's cores), so CPU-slot placement groups fit; with CUDA it uses the
    machine's GPUs. Does nothing when Ray is already initialised (tests start their own).
    """
    import os

    import ray

    if ray.is_initialized():
        return
    if job.cluster.ray_address:
        ray.init(address=job.cluster.ray_address, **kwargs)
        return
    import torch

    if torch.cuda.is_available() and job.cluster.device != "cpu":
        ray.init(**kwargs)
    else:
        ray.init(num_cpus=max(os.cpu_count() or 1, job.cluster.total_gpus), num_gpus=0,
                 **kwargs)


class ClusterPlacement:
    """The plan's pools reserved as Ray placement groups (one STRICT_PACK group per pool and node).

    Args:
        plan: the placement plan.
        slot_resource: ``"GPU"`` or ``"CPU"`` (see :func:`slot_resource_for`).
        timeout_s: how long to wait for Ray to reserve every group; past it the groups are
            released and :class:`PlacementError` says what was missing.
    """

    def __init__(self, plan: PlacementPlan, slot_resource: str = "GPU", timeout_s: float = 120.0):
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group

        if slot_resource not in ("GPU", "CPU"):
            raise ValueError(f"slot_resource must be 'GPU' or 'CPU', got {slot_resource!r}")
        self.plan = plan
        self.slot_resource = slot_resource
        self._groups: dict[tuple[int, int], Any] = {}
        self._bundle: dict[tuple[int, Slot], tuple[tuple[int, int], int]] = {}
        for pool in plan.pools:
            for node in sorted({s.node for s in pool.slots}):
                idx = pool.slots_on(node)
                pg = placement_group([{slot_resource: 1} for _ in idx], strategy="STRICT_PACK",
                                     name=f"megarlhf-pool{pool.index}-n{node}")
                self._groups[(pool.index, node)] = pg
                for b, i in enumerate(idx):
                    self._bundle[(pool.index, pool.slots[i])] = ((pool.index, node), b)
        pending = {pg.ready(): key for key, pg in self._groups.items()}
        ready, not_ready = ray.wait(list(pending), num_returns=len(pending), timeout=timeout_s)
        if not_ready:
            missing = [pending[r] for r in not_ready]
            for pg in self._groups.values():
                remove_placement_group(pg)
            desc = ", ".join(f"pool {p} on node {n} "
                             f"({len(plan.pools[p].slots_on(n))} x {{{slot_resource}: 1}})"
                             for p, n in missing)
            raise PlacementError(
                f"Ray could not reserve {desc} within {timeout_s:.0f} s: each needs that many "
                f"{slot_resource}s free on a single Ray node. The cluster has "
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
