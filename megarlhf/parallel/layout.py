"""The parallel layout of one role (tp, pp, vpp, cp, dp; ep, etp for experts) and its groups.

megatron-core keeps its process groups in module globals (``parallel_state``). megarlhf touches
those globals only here: :func:`initialize_parallel` sets them up for a layout and returns a
:class:`ParallelContext` — ranks and group handles — that our code receives explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class ParallelLayout:
    """How one role's model is split over its ranks.

    ``world_size = tp * pp * cp * dp``. Megatron orders ranks tp-fastest: ranks of one TP group
    are consecutive (so a TP group stays inside a node), then cp, dp and pp.

    Mixture-of-experts layers are laid out on the same ranks a second way (megatron's "parallel
    folding"): within each pipeline stage the ``tp * cp * dp`` ranks are regrouped as
    ``etp * ep * edp`` - experts split over ``ep`` ranks (each holds ``num_experts / ep`` whole
    experts), each expert's weights split over ``etp`` ranks, and ``edp = tp*cp*dp / (etp*ep)``
    replicas. Attention and every other dense weight keep the tp/cp/dp layout.

    Attributes:
        tp: tensor-parallel size (attention heads, MLP columns and the vocabulary are split).
        pp: pipeline-parallel size (layers are split into ``pp`` stages).
        vpp: virtual pipeline chunks per stage (interleaved schedule); 1 disables it.
        cp: context-parallel size (the sequence is split across ranks in attention).
        dp: data-parallel size (replicas that see different micro-batches).
        sequence_parallel: shard LayerNorm/dropout activations along the sequence over TP ranks.
        ep: expert-parallel size (MoE experts are split over ``ep`` ranks); 1 for dense models.
        etp: expert-tensor-parallel size (each expert's weights split over ``etp`` ranks); None
            means ``tp`` (megatron's default). MoE training commonly uses ``etp=1``.
    """

    tp: int = 1
    pp: int = 1
    vpp: int = 1
    cp: int = 1
    dp: int = 1
    sequence_parallel: bool = False
    ep: int = 1
    etp: int | None = None

    def __post_init__(self):
        if self.etp is not None and (not isinstance(self.etp, int) or isinstance(self.etp, bool)
                                     or self.etp < 1):
            raise ValueError(f"parallel.etp must be a positive integer or null, got {self.etp!r}")
        for name in ("tp", "pp", "vpp", "cp", "dp", "ep"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"parallel.{name} must be a positive integer, got {v!r}")
        if self.vpp > 1 and self.pp < 2:
            raise ValueError(
                f"parallel.vpp={self.vpp} needs pipeline parallelism: set parallel.pp >= 2 "
                "or parallel.vpp=1"
            )
        if self.sequence_parallel and self.tp < 2:
            raise ValueError(
                "parallel.sequence_parallel=true needs parallel.tp >= 2 (it shards activations "
                "over tensor-parallel ranks); set it to false or raise tp"
            )
        if (self.tp * self.cp * self.dp) % (self.expert_tp * self.ep):
            raise ValueError(
                f"expert layout etp*ep = {self.expert_tp}*{self.ep} does not divide the "
                f"{self.tp * self.cp * self.dp} ranks of a pipeline stage (tp*cp*dp = "
                f"{self.tp}*{self.cp}*{self.dp}); choose ep and etp so that etp*ep divides it")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def expert_tp(self) -> int:
        """Ranks each expert's weights are split over (``etp``, defaulting to ``tp``)."""
        return self.tp if self.etp is None else self.etp

    @property
    def edp(self) -> int:
        """Expert data-parallel size: replicas of each expert shard."""
        return self.tp * self.cp * self.dp // (self.expert_tp * self.ep)

    def coords(self, rank: int) -> dict[str, int]:
        """``{"tp", "cp", "dp", "pp"}`` of ``rank`` in megatron's order (tp fastest, then cp,
        dp, pp: ``rank = tp + TP*(cp + CP*(dp + DP*pp))``)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside a world of {self.world_size}")
        tp, rest = rank % self.tp, rank // self.tp
        cp, rest = rest % self.cp, rest // self.cp
        dp, pp = rest % self.dp, rest // self.dp
        return {"tp": tp, "cp": cp, "dp": dp, "pp": pp}

    def describe(self) -> str:
        s = f"TP{self.tp}/PP{self.pp}"
        if self.vpp > 1:
            s += f"/VPP{self.vpp}"
        if self.cp > 1:
            s += f"/CP{self.cp}"
        s += f"/DP{self.dp}"
        if self.sequence_parallel:
            s += "+SP"
        if self.ep > 1 or self.etp is not None:
            s += f" EP{self.ep}/ETP{self.expert_tp}"
        return s

    @classmethod
    def for_world(cls, world_size: int, tp: int = 1, pp: int = 1, vpp: int = 1, cp: int = 1,
                  sequence_parallel: bool = False, ep: int = 1,
                  etp: int | None = None) -> "ParallelLayout":
        """The layout with data parallelism filling the rest of ``world_size``."""
        mp = tp * pp * cp
        if world_size % mp:
            raise ValueError(
                f"world size {world_size} is not divisible by tp*pp*cp = {tp}*{pp}*{cp} = {mp}"
            )
        return cls(tp=tp, pp=pp, vpp=vpp, cp=cp, dp=world_size // mp,
                   sequence_parallel=sequence_parallel, ep=ep, etp=etp)


@dataclass
class ParallelContext:
    """Ranks and process groups of this process for one role's layout.

    Our code receives this object instead of reading megatron's globals. ``pg_collection`` is
    megatron's own :class:`ProcessGroupCollection`, passed to the models it builds.
    """

    layout: ParallelLayout
    rank: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    cp_rank: int
    tp_group: Any
    pp_group: Any
    dp_group: Any
    cp_group: Any
    dp_cp_group: Any
    mp_group: Any
    pg_collection: Any = field(repr=False, default=None)
    # Expert layout (see ParallelLayout): ranks and groups of the MoE layers.
    ep_rank: int = 0
    etp_rank: int = 0
    edp_rank: int = 0
    ep_group: Any = field(repr=False, default=None)
    etp_group: Any = field(repr=False, default=None)
    edp_group: Any = field(repr=False, default=None)

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.layout.pp - 1

    @property
    def is_output_rank(self) -> bool:
        """The rank whose outputs represent its DP replica: last stage, tp rank 0, cp rank 0."""
        return self.is_last_stage and self.tp_rank == 0 and self.cp_rank == 0

    def pp_stage_rank(self, stage: int) -> int:
        """Global rank of pipeline stage ``stage`` in this rank's pipeline group."""
        return torch.distributed.get_global_rank(self.pp_group, stage)


def initialize_parallel(layout: ParallelLayout, seed: int = 1234) -> ParallelContext:
    """Initialises megatron's process groups for ``layout`` on the current world.

    ``torch.distributed`` must already be initialised with ``layout.world_size`` ranks.
    Also seeds megatron's tensor-parallel RNG tracker (``seed`` + pipeline offset, as megatron
    does), so that dropout and initialisation are reproducible.
    """
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.process_groups_config import ProcessGroupCollection

    world = torch.distributed.get_world_size()
    if world != layout.world_size:
        raise ValueError(
            f"layout {layout.describe()} needs {layout.world_size} ranks "
            f"(tp*pp*cp*dp), but the process group has {world}"
        )
    if ps.model_parallel_is_initialized():
        destroy_parallel()
    gloo_default = torch.distributed.get_backend() == "gloo"
    ps.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
        context_parallel_size=layout.cp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.expert_tp,
        # With gloo as the default backend (CPU) megatron's extra gloo copies of every group
        # are duplicates: each costs threads and sockets on every rank.
        create_gloo_process_groups=not gloo_default,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    ctx = ParallelContext(
        layout=layout,
        rank=torch.distributed.get_rank(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        cp_rank=ps.get_context_parallel_rank(),
        tp_group=ps.get_tensor_model_parallel_group(),
        pp_group=ps.get_pipeline_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        cp_group=ps.get_context_parallel_group(),
        dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True),
        mp_group=ps.get_model_parallel_group(),
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
        ep_rank=ps.get_expert_model_parallel_rank(),
        etp_rank=ps.get_expert_tensor_parallel_rank(),
        edp_rank=ps.get_expert_data_parallel_rank(),
        ep_group=ps.get_expert_model_parallel_group(),
        etp_group=ps.get_expert_tensor_parallel_group(),
        edp_group=ps.get_expert_data_parallel_group(),
    )
    return ctx


def uses_gloo_groups() -> bool:
    """Whether megatron created separate gloo groups (False when gloo is the default backend)."""
    return torch.distributed.get_backend() != "gloo"


def destroy_parallel() -> None:
    """Tears down megatron's groups *and* frees them.

    megatron's ``destroy_model_parallel`` only drops its references; the process groups (and
    their communication threads) stay alive in torch.distributed. A process that re-initialises
    (tests, a worker switching layouts) would pile up ~50 threads per initialisation, so every
    group except the default one is destroyed here.
    """
    from megatron.core import parallel_state as ps
    import torch.distributed.distributed_c10d as c10d

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if not torch.distributed.is_initialized():
        return
    default = c10d._get_default_group()
    for pg in list(c10d._world.pg_map.keys()):
        if pg is not default:
            try:
                torch.distributed.destroy_process_group(pg)
            except Exception:  # noqa: BLE001 - a group already torn down
                pass
