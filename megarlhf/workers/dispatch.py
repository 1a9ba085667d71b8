"""How a worker method's input is split over ranks and how its outputs are gathered.

A worker class declares, per method, a *dispatch* mode (what each rank receives) and a *collect*
mode (what the driver gets back) with :func:`register`; :class:`~megarlhf.workers.group.ActorGroup`
binds every registered method as a group method, so the driver calls ``group.forward(batch)``
and never indexes ranks by hand (the idea of verl's ``@register(dispatch_mode=...)``)::

    class RoleWorker:
        @register(Dispatch.DP_SPLIT, Collect.DP_CONCAT, split=("batch",))
        def forward(self, batch, temperature=1.0, entropy=False): ...

Dispatch modes:

* ``ONE_TO_ALL``: every rank gets the same arguments.
* ``DP_SPLIT``: the arguments named in ``split`` are cut into ``dp`` contiguous shards and every
  rank of data-parallel replica ``d`` (all its TP/PP/CP ranks) gets shard ``d``; the other
  arguments go to every rank. A :class:`~megarlhf.engine.batch.TokenBatch` is split with
  :meth:`TokenBatch.shard` (``B`` must divide by ``dp``); a list is split into ``dp`` nearly
  equal contiguous chunks (the first ``B % dp`` get one more). With ``offset_arg``, each rank
  also receives the index of its shard's first row under that keyword (e.g. to offset seeds).

Collect modes:

* ``ALL``: the list of every rank's result, in rank order.
* ``RANK0``: rank 0's result.
* ``OUTPUT_RANK0``: the result of DP replica 0's *output rank* (last pipeline stage, TP rank 0,
  CP rank 0), for results that are the same on every rank (a training step's metrics).
* ``DP_CONCAT``: the output rank of every DP replica, concatenated in DP order: tensors along
  dim 0 (per-token ``(b, S_d)`` tensors are right-padded with zeros to the dispatched batch's
  ``S``, since each shard is trimmed to its own longest row), dicts key by key, lists joined.

Everything here is pure (no Ray), so the rules are unit-testable.
"""

from __future__ import annotations

import enum
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from megarlhf.engine.batch import TokenBatch

_ATTR = "__megarlhf_dispatch__"


class Dispatch(enum.Enum):
    ONE_TO_ALL = "one_to_all"
    DP_SPLIT = "dp_split"


class Collect(enum.Enum):
    ALL = "all"
    RANK0 = "rank0"
    OUTPUT_RANK0 = "output_rank0"
    DP_CONCAT = "dp_concat"


@dataclass(frozen=True)
class MethodSpec:
    """The declared dispatch and collect of one worker method."""

    dispatch: Dispatch
    collect: Collect
    split: tuple[str, ...] = ()
    offset_arg: str | None = None


def register(dispatch: Dispatch = Dispatch.ONE_TO_ALL, collect: Collect = Collect.ALL, *,
             split: Sequence[str] = (), offset_arg: str | None = None) -> Callable:
    """Declares how a worker method is dispatched and collected (see the module docstring).

    Args:
        dispatch: what each rank receives.
        collect: what the driver gets back.
        split: names of the parameters that ``Dispatch.DP_SPLIT`` splits over DP replicas.
        offset_arg: keyword that receives the first row index of the rank's shard.
    """
    if dispatch is Dispatch.DP_SPLIT and not split:
        raise ValueError("Dispatch.DP_SPLIT needs split=(names of the arguments to split,)")
    if dispatch is not Dispatch.DP_SPLIT and (split or offset_arg):
        raise ValueError("split= and offset_arg= only apply to Dispatch.DP_SPLIT")

    def deco(fn):
        params = inspect.signature(fn).parameters
        for name in tuple(split) + ((offset_arg,) if offset_arg else ()):
            if name not in params:
                raise ValueError(f"{fn.__qualname__}: register names {name!r}, which is not a "
                                 "parameter of the method")
        setattr(fn, _ATTR, MethodSpec(dispatch, collect, tuple(split), offset_arg))
        return fn

    return deco


def registered_methods(cls: type) -> dict[str, MethodSpec]:
    """Every method of ``cls`` (and its bases) declared with :func:`register`."""
    out: dict[str, MethodSpec] = {}
    for name in dir(cls):
        fn = getattr(cls, name, None)
        spec = getattr(fn, _ATTR, None)
        if isinstance(spec, MethodSpec):
            out[name] = spec
    return out


@dataclass(frozen=True)
class RankInfo:
    """Where one worker sits in its group's layout (reported by the worker itself).

    Attributes:
        rank: rank in the group's torch.distributed world (rollout: the replica index).
        dp_rank / dp_size: data-parallel replica of this rank, and how many there are.
        tp_rank, pp_rank, cp_rank: position inside the replica.
        is_output_rank: this rank's results represent its replica (last PP stage, TP 0, CP 0).
        node_ip, pid: where the worker process runs (for error messages).
        devices: the accelerator ids Ray gave it (CUDA_VISIBLE_DEVICES), "" on CPU slots.
        node_id: the Ray node it runs on (hex; several nodes may share an IP).
        rendezvous: ``host:port`` of the torch.distributed world it joined (its role's rank 0).
    """

    rank: int
    dp_rank: int
    dp_size: int
    tp_rank: int = 0
    pp_rank: int = 0
    cp_rank: int = 0
    is_output_rank: bool = True
    node_ip: str = ""
    pid: int = 0
    devices: str = ""
    node_id: str = ""
    rendezvous: str = ""

    def where(self) -> str:
        coords = f"dp {self.dp_rank}, tp {self.tp_rank}, pp {self.pp_rank}"
        if self.cp_rank:
            coords += f", cp {self.cp_rank}"
        node = f", Ray node {self.node_id[:8]}" if self.node_id else ""
        return f"{coords}; pid {self.pid} on {self.node_ip or '?'}{node}"


@dataclass
class DispatchContext:
    """What collect needs to know about the dispatched call."""

    seq_len: int | None = None  # S of the dispatched TokenBatch (DP_CONCAT pads to it)
    shard_sizes: list[int] = field(default_factory=list)


def _split_value(value: Any, dp: int, name: str) -> tuple[list[Any], list[int]]:
    """``dp`` contiguous shards of ``value`` and the first row index of each."""
    if isinstance(value, TokenBatch):
        if value.batch_size % dp:
            raise ValueError(
                f"{name}: a batch of {value.batch_size} sequences does not split over {dp} "
                f"data-parallel replicas; make the batch size a multiple of {dp}")
        n = value.batch_size // dp
        return [value.shard(d, dp) for d in range(dp)], [d * n for d in range(dp)]
    if isinstance(value, (list, tuple)):
        q, r = divmod(len(value), dp)
        shards, offsets, start = [], [], 0
        for d in range(dp):
            n = q + (1 if d < r else 0)
            shards.append(list(value[start:start + n]))
            offsets.append(start)
            start += n
        return shards, offsets
    raise TypeError(f"{name}: Dispatch.DP_SPLIT splits a TokenBatch or a list, got "
                    f"{type(value).__name__}")


def dispatch_args(spec: MethodSpec, fn: Callable, ranks: Sequence[RankInfo], args: tuple,
                  kwargs: dict, put: Callable[[Any], Any] = lambda v: v
                  ) -> tuple[list[tuple[tuple, dict]], DispatchContext]:
    """The ``(args, kwargs)`` each rank receives, in rank order.

    ``put`` stores a value once and returns what to send instead (``ray.put``: an object ref
    that every rank of a replica shares); identity by default.
    """
    ctx = DispatchContext()
    if spec.dispatch is Dispatch.ONE_TO_ALL:
        a = tuple(put(v) for v in args)
        k = {n: put(v) for n, v in kwargs.items()}
        return [(a, dict(k)) for _ in ranks], ctx  # a dict each: Ray may add keys to it
    # DP_SPLIT: bind by name so split arguments may be positional or keywords.
    # (Defaults are left to the worker; Ray adds a ``_ray_trace_ctx`` parameter to methods.)
    bound = inspect.signature(fn).bind(None, *args, **kwargs)  # None stands for self
    values = dict(bound.arguments)
    values.pop(next(iter(values)))  # self
    missing = [n for n in spec.split if n not in values]
    if missing:
        raise TypeError(f"{fn.__qualname__}: missing the argument(s) to split: {missing}")
    dp = ranks[0].dp_size
    shards: dict[str, list[Any]] = {}
    offsets: list[int] = [0] * dp
    for name in spec.split:
        v = values[name]
        if isinstance(v, TokenBatch) and ctx.seq_len is None:
            ctx.seq_len = v.input_ids.shape[1]
        shards[name], offsets = _split_value(v, dp, name)
        ctx.shard_sizes = [len(s) if isinstance(s, list) else s.batch_size
                           for s in shards[name]]
    shared = {n: put(v) for n, v in values.items() if n not in shards}
    per_replica = []
    for d in range(dp):
        k = dict(shared)
        for name, s in shards.items():
            k[name] = put(s[d])
        if spec.offset_arg:
            k[spec.offset_arg] = offsets[d]
        per_replica.append(k)
    return [((), dict(per_replica[r.dp_rank])) for r in ranks], ctx


def _pad_cat(parts: list[torch.Tensor], seq_len: int | None) -> torch.Tensor:
    if parts[0].dim() >= 2 and seq_len is not None:
        parts = [torch.nn.functional.pad(p, (0, seq_len - p.shape[1])) if p.shape[1] < seq_len
                 else p for p in parts]
    return torch.cat(parts, dim=0)


def _concat(parts: list[Any], seq_len: int | None) -> Any:
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return _pad_cat(parts, seq_len)
    if isinstance(first, dict):
        return {k: _concat([p[k] for p in parts], seq_len) for k in first}
    if isinstance(first, (list, tuple)):
        return [x for p in parts for x in p]
    raise TypeError(f"Collect.DP_CONCAT cannot concatenate {type(first).__name__} results")


def collect_results(spec: MethodSpec, ranks: Sequence[RankInfo], results: Sequence[Any],
                    ctx: DispatchContext) -> Any:
    """What the driver gets back from the per-rank ``results`` (in rank order)."""
    if spec.collect is Collect.ALL:
        return list(results)
    if spec.collect is Collect.RANK0:
        return results[0]
    outputs = {r.dp_rank: i for i, r in enumerate(ranks) if r.is_output_rank}
    if spec.collect is Collect.OUTPUT_RANK0:
        return results[outputs[0]]
    parts = [results[outputs[d]] for d in range(ranks[0].dp_size)]
    return _concat(parts, ctx.seq_len)
