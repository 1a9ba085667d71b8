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
straddle nodes and the bundle -> node map would have to be rediscovered after the fact. With
per-node groups the planner's logical nodes are exact inside a pool; which physical node hosts
a logical node (and whether two pools' groups share one) is Ray's choice.

Slots are ``{"GPU": 1}`` bundles on a GPU cluster (or a local cluster that declares fake GPUs,
``ray.init(num_gpus=8)``), and ``{"CPU": 1}`` bundles in *CPU-slot* mode: on a machine without
GPUs every "GPU" of the config is one Ray CPU slot, so the same placement code runs the CPU
demo (:func:`slot_resource_for` picks the mode).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from megarlhf.config import JobConfig
from megarlhf.config.validate import active_roles
from megarlhf.planning.placement import PlacementError, PlacementPlan, Slot, plan_placement
from megarlhf.workers import RoleSpec, RolloutGroup, RolloutSpec, WorkerGroup


class Cluster:
    """Placement + worker groups of one job (a context manager that releases them)."""

    def __init__(self, job: JobConfig, *, roles: list[str] | None = None, rollout: bool = True,
                 pad_id: int = 0):
        self.job = job
        init_ray(job)
        self.plan = plan_placement(job)
        self.placement = ClusterPlacement(self.plan, slot_resource_for(job))
        self.groups: dict[str, WorkerGroup] = {}
        self.rollout: RolloutGroup | None = None
        self._offloadable: dict[str, bool] = {}
        self._sleeping = False
        try:
            wanted = roles if roles is not None else list(active_roles(job))
            for role in wanted:
                spec = RoleSpec.from_job(job, role, pad_id=pad_id)
                self.groups[role] = WorkerGroup.create(self.placement, spec)
                rc = active_roles(job)[role]
                self._offloadable[role] = bool(rc.offload)
            if rollout and "rollout" in self.plan.roles:
                self.rollout = RolloutGroup.create(
                    self.placement, RolloutSpec.from_job(job))
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
                self.rollout.wake_up()
                self._sleeping = False
            elif "rollout" not in want and not self._sleeping and self._shares_pool(
                    "rollout", want) and self.placement.slot_resource == "GPU":
                # Sleeping frees accelerator memory; CPU slots have none to free.
                self.rollout.sleep()
                self._sleeping = True

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
    import ray

    if ray.is_initialized():
        return
    if job.cluster.ray_address:
        ray.init(address=job.cluster.ray_address, **kwargs)
        return
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
