"""The job's roles on the cluster: placement, worker groups, and who holds the GPUs when.

:class:`Cluster` reserves the placement of a job (:mod:`megarlhf.planning.placement`), starts a
:class:`~megarlhf.workers.WorkerGroup` per Megatron role and a
:class:`~megarlhf.workers.RolloutGroup` when the job generates, and switches colocated roles in
and out of GPU memory between phases (:meth:`activate`): a role with ``offload: true`` is moved
to host memory whenever another role of its pool is active, and the rollout engine sleeps while
a trainer uses the GPUs it shares.
"""

from __future__ import annotations

from typing import Any

from megarlhf.config import JobConfig
from megarlhf.config.validate import active_roles


class Cluster:
    """Placement + worker groups of one job (a context manager that releases them)."""

    def __init__(self, job: JobConfig, *, roles: list[str] | None = None, rollout: bool = True,
                 pad_id: int = 0, rollout_model: Any = None,
                 model_overrides: dict[str, Any] | None = None):
        from megarlhf.planning.placement import init_ray, plan_placement, slot_resource_for
        from megarlhf.workers import RoleSpec, RolloutGroup, RolloutSpec, WorkerGroup

        self.job = job
        init_ray(job)
        self.plan = plan_placement(job)
        self.placement = self.plan.create(slot_resource_for(job))
        self.groups: dict[str, WorkerGroup] = {}
        self.rollout: RolloutGroup | None = None
        self._offloadable: dict[str, bool] = {}
        self._sleeping = False
        try:
            wanted = roles if roles is not None else list(active_roles(job))
            for role in wanted:
                spec = RoleSpec.from_job(job, role, pad_id=pad_id)
                if model_overrides and role in model_overrides:
                    from dataclasses import replace

                    m = model_overrides[role]
                    spec = replace(spec, model=m, weights="hf" if m.hf_dir else "init")
                self.groups[role] = WorkerGroup.create(self.placement, spec)
                rc = active_roles(job)[role]
                self._offloadable[role] = bool(rc.offload)
            if rollout and "rollout" in self.plan.roles:
                self.rollout = RolloutGroup.create(
                    self.placement, RolloutSpec.from_job(job, model=rollout_model))
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
                    "rollout", want) and self.job.cluster.placement != "split":
                if self.job.cluster.device != "cpu" and self._rollout_sleep_useful():
                    self.rollout.sleep()
                    self._sleeping = True

    def _rollout_sleep_useful(self) -> bool:
        import torch

        return torch.cuda.is_available()

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
