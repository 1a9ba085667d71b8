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

The Ray side (placement groups that reserve these slots, CPU-slot mode) is
:class:`megarlhf.controller.cluster.ClusterPlacement`; nothing here imports Ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from megarlhf.config.base import ConfigError
from megarlhf.config.schema import JobConfig
from megarlhf.config.validate import active_roles

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

    @property
    def nodes(self) -> tuple[int, ...]:
        """The logical nodes any role uses."""
        return tuple(sorted({s.node for p in self.pools for s in p.slots}))

    def units_on(self, name: str, node: int) -> list[int]:
        """Ranks of trainer role ``name`` (rank ``r`` on slot ``r``), or replicas of the rollout
        (replica ``k`` on slots ``[k*tp, (k+1)*tp)``, inside one node), on logical node
        ``node``."""
        rp = self.role(name)
        size = rp.tp if name == "rollout" else 1
        return [u for u in range(len(rp.slots) // size) if rp.slots[u * size].node == node]

    def slots_per_node(self) -> dict[int, int]:
        """GPUs (slots) each logical node holds, over all pools."""
        out: dict[int, int] = {}
        for p in self.pools:
            for s in p.slots:
                out[s.node] = out.get(s.node, 0) + 1
        return dict(sorted(out.items()))

    def describe(self) -> str:
        lines = [f"placement {self.mode}: {self.num_nodes} node(s) x {self.gpus_per_node} GPUs; "
                 "each node n<k> one Ray node, one STRICT_PACK placement group per (pool, node)"]
        for p in self.pools:
            share = "" if len(p.roles) == 1 else f", {p.fraction:g} GPU per process (time-shared)"
            lines.append(f"  pool {p.index}: {', '.join(p.roles)} on {format_slots(p.slots)}"
                         f"{share}")
        return "\n".join(lines)


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


def format_runs(xs: list[int]) -> str:
    """``0-3,6`` for ``[0, 1, 2, 3, 6]`` (sorted integers)."""
    return _runs(list(xs))


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
        slots = tuple(Slot((start + i) // gpn, (start + i) % gpn) for i in range(size))
        pool = Pool(index, tuple(members), slots)
        pools.append(pool)
        for r in members:
            placements[r] = RolePlacement(r, index, slots[: sizes[r][0]], pool.fraction,
                                          sizes[r][1])
        cursor = start + size
    if cursor > total:  # reported once every pool is laid out: the message gives the total
        raise PlacementError(
            f"placement {c.placement} needs {cursor} GPUs (pools of "
            f"{', '.join(f'{r}={sizes[r][0]}' for r in sizes)}, each TP group inside a node) "
            f"but the cluster has num_nodes*gpus_per_node = {c.num_nodes}*{gpn} = {total}; "
            "add nodes, shrink num_gpus, or colocate roles")
    return PlacementPlan(c.placement, c.num_nodes, gpn, tuple(pools), placements)


@dataclass(frozen=True)
class NodeSlots:
    """A Ray node as the node assignment sees it: its id, address and slot resources."""

    node_id: str
    address: str
    total: float
    available: float


def assign_nodes(plan: PlacementPlan, nodes: list[NodeSlots], resource: str = "GPU"
                 ) -> dict[int, NodeSlots]:
    """Binds every logical node of ``plan`` to its own Ray node (pure; raises
    :class:`PlacementError`).

    Every pool's slots on logical node ``k`` go to the same Ray node, and two logical nodes never
    share one: the node structure ``megarlhf plan`` prints is the one that runs. Logical nodes
    are bound largest first, each to the Ray node with the most free ``resource`` that holds
    it (then the most in total, then the lowest id, so the choice is deterministic); a node
    whose free resources are short (another job) is taken only when no other holds it, and its
    placement groups wait for the resources.
    """
    demand = plan.slots_per_node()
    free = sorted(nodes, key=lambda n: n.node_id)
    out: dict[int, NodeSlots] = {}
    for k in sorted(demand, key=lambda k: (-demand[k], k)):
        fits = [n for n in free if n.total >= demand[k]]
        if not fits:
            have = ", ".join(f"{n.address} ({n.node_id[:8]}): {n.total:g}" for n in nodes) \
                or "none"
            taken = ", ".join(f"n{j} -> {n.address} ({n.node_id[:8]})" for j, n in
                              sorted(out.items()))
            raise PlacementError(
                f"node n{k} of the placement needs {demand[k]} {resource}s on one Ray node "
                f"({plan.num_nodes} node(s) x {plan.gpus_per_node} in the config), but no "
                f"free Ray node has that many (Ray nodes and their {resource}s: {have}"
                f"{'; already bound: ' + taken if taken else ''}). Start Ray on "
                f"{len(demand)} nodes with at least cluster.gpus_per_node {resource}s each, "
                "or set cluster.num_nodes / gpus_per_node to what the Ray cluster has")
        best = min(fits, key=lambda n: (n.available < demand[k], -n.available, -n.total,
                                        n.node_id))
        out[k] = best
        free.remove(best)
    return dict(sorted(out.items()))
