"""Ray workers: one actor per rank of each Megatron role, one per rollout replica, and the
groups that drive them from the controller with declared dispatch (see :mod:`.dispatch`).

Nothing here imports Ray at module level; the groups import it when they start actors.
"""

from megarlhf.workers.dispatch import Collect, Dispatch, RankInfo, register
from megarlhf.workers.group import (
    ActorGroup,
    GroupBrokenError,
    PendingCall,
    WorkerCallError,
    WorkerDiedError,
    WorkerError,
    WorkerTimeoutError,
    wait_all,
)
from megarlhf.workers.role_worker import RoleSpec, RoleWorker, WorkerGroup
from megarlhf.workers.rollout_worker import RolloutGroup, RolloutSpec, RolloutWorker

__all__ = [
    "ActorGroup", "Collect", "Dispatch", "GroupBrokenError", "PendingCall", "RankInfo",
    "RoleSpec", "RoleWorker", "RolloutGroup", "RolloutSpec", "RolloutWorker", "WorkerCallError",
    "WorkerDiedError", "WorkerError", "WorkerGroup", "WorkerTimeoutError", "register",
    "wait_all",
]
