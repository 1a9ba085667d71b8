"""The resharder: a megatron model sharded over TP/PP/VPP/DP/EP -> HF-named full tensors, bucketed.

One function feeds every path weights take out of a megatron model - HF export (``megarlhf
convert megatron-to-hf``), weight sync into the rollout engine, test oracles:

    for bucket in iter_hf_weights(bundle, bucket_bytes=1 << 30, dtype=torch.bfloat16):
        engine.update_weights(bucket)      # on dst_rank; [] on every other rank

It is a *collective* generator: every rank of the role's world calls it with the same arguments
and exhausts it. All ranks iterate the same number of buckets; only ``dst_rank`` receives
tensors, the others yield empty lists.

How it works
------------
1. Plan (one ``all_gather_object`` of metadata, :func:`plan_hf_weights`): every rank of DP
   replica 0 (and CP rank 0) reports its parameters - HF names (global layer numbers, so PP and
   VPP offsets are already applied), kind, shard shape, dtype. The plan orders them as
   transformers does (embeddings, layer 0..L-1, final norm, head) and records which global rank
   holds TP shard i of each. The embedding tied to the output layer is taken once, from the
   first stage. Replicated tensors (norms, the scalar head, MoE routers) come from TP rank 0
   only. MoE experts: every expert-parallel rank of expert-DP replica 0 reports its own
   experts (global expert numbers in their HF names), each split over the expert-TP ranks; so
   an expert travels straight from the rank that holds it, like any other tensor, and the
   bucket bound applies unchanged.
2. Buckets: HF tensors in that order, greedily packed up to ``bucket_bytes`` (in the output
   dtype); a tensor larger than the bound travels alone. Every rank computes the same buckets.
3. Transfer: a TP shard covers a few rectangular regions of the HF tensors
   (:func:`megarlhf.weights.transforms.shard_pieces`: a block of q, k and v rows for a group of
   query heads, a block of gate and of up rows, a block of vocabulary rows without the padding,
   a block of columns for row-parallel weights). Each owning rank sends each region straight to
   ``dst_rank`` (point-to-point, cast to the output dtype first), and ``dst_rank`` receives it
   *in place* into the output tensor - no gather on an intermediate rank, no unshard copy. Only
   column blocks (row-parallel weights at TP > 1) land in a buffer first.

Design notes: shards go to ``dst_rank`` directly rather than through an all-gather on TP rank 0
of the owning stage, because every byte must reach ``dst_rank`` anyway: the direct route moves
each byte once, and needs no full-tensor staging on the owning stage. The HF layout conversion
(q/k/v split for any GQA ratio, gate/up split, padding removal) happens in the addressing: the
sender reorders at most one shard (q/k/v rows of several groups), the receiver none.

Memory (per rank, on top of the model): ``dst_rank`` holds the bucket being filled (at most
``max(bucket_bytes, largest HF tensor)``) plus, for row-parallel weights, the column blocks of
one HF tensor in flight; a sender holds at most copies of its own regions of one bucket (none when
they are views of its parameters: gate/up, vocab, row blocks and q/k/v of one query group per
rank, without a dtype cast). Bound: one bucket plus the largest tensor.

Devices: regions travel on the platform device (CUDA with NCCL, CPU with gloo) and the output is
moved to ``device`` on ``dst_rank`` if another is asked for (e.g. ``"cpu"`` to write files).
A single-rank role works the same (everything is a local copy).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from megarlhf.models.builder import ModelBundle
from megarlhf.models.families import ArchSpec
from megarlhf.weights.mapping import expected_hf_names, local_params
from megarlhf.weights.transforms import (
    REPLICATED,
    ShardPiece,
    hf_shapes,
    megatron_full_shape,
    shard_pieces,
)

_ALIGN = 64  # byte alignment of tensors inside a reused bucket buffer


class ReshardError(RuntimeError):
    """The model's parameters do not make up a whole HF model (a mapping or ownership bug)."""


@dataclass(frozen=True)
class WeightUnit:
    """One megatron parameter (all its TP shards) and the HF tensor(s) it becomes.

    Attributes:
        hf_names: HF names, global layer numbers (q, k, v for a fused qkv).
        hf_shapes: their HF shapes.
        kind: how the parameter is split over TP (see :mod:`megarlhf.weights.transforms`).
        shard_shape: shape of each TP shard.
        dtype: the parameter's dtype.
        sources: global rank holding shard i, i = 0..n-1 (n = 1 when not split over TP).
        chunk: virtual pipeline chunk of the parameter on its owning ranks.
        name: megatron name of the parameter inside that chunk.
    """

    hf_names: tuple[str, ...]
    hf_shapes: tuple[tuple[int, ...], ...]
    kind: str
    shard_shape: tuple[int, ...]
    dtype: torch.dtype
    sources: tuple[int, ...]
    chunk: int
    name: str


@dataclass(frozen=True)
class HFEntry:
    """One HF tensor of the stream: ``unit.hf_names[index]``."""

    name: str
    shape: tuple[int, ...]
    unit: int
    index: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class _Transfer:
    """One region of one TP shard into one HF tensor of a bucket."""

    pos: int  # position of the HF tensor in the bucket
    unit: int
    shard: int  # TP shard index (into unit.sources)
    piece: int  # index into shard_pieces(...)
    geom: ShardPiece  # geometry (view is a meta tensor)
    tag: int


@dataclass
class ReshardPlan:
    """Who holds what, in HF order; identical on every rank of the role.

    Built collectively by :func:`plan_hf_weights`; reuse it across calls of
    :func:`iter_hf_weights` for the same model (it depends only on the layout and the
    architecture, not on the weight values).
    """

    spec: ArchSpec
    units: tuple[WeightUnit, ...]
    entries: tuple[HFEntry, ...]
    world_size: int
    _pieces: dict = field(default_factory=dict, repr=False)
    _buffer: torch.Tensor | None = field(default=None, repr=False)

    def receive_buffer(self, nbytes: int, device: torch.device) -> torch.Tensor:
        """The reusable bucket buffer of ``reuse_buffer`` (kept across calls: page faults
        and allocator work happen once, not once per bucket and sync)."""
        b = self._buffer
        if b is None or b.numel() < nbytes or b.device != device:
            self._buffer = None  # free the old one before allocating
            b = self._buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
        return b

    def free_buffer(self) -> None:
        """Releases the buffer kept by ``reuse_buffer`` (until the next call that needs it)."""
        self._buffer = None

    def out_dtype(self, entry: HFEntry, dtype: torch.dtype | None) -> torch.dtype:
        unit = self.units[entry.unit]
        if unit.kind == "fp32":
            return torch.float32
        return dtype or unit.dtype

    def nbytes(self, entry: HFEntry, dtype: torch.dtype | None = None) -> int:
        """Bytes of one HF tensor in the output dtype."""
        return entry.numel * self.out_dtype(entry, dtype).itemsize

    def total_bytes(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of the whole HF state dict in the output dtype."""
        return sum(self.nbytes(e, dtype) for e in self.entries)

    def largest_bytes(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of the largest HF tensor in the output dtype."""
        return max(self.nbytes(e, dtype) for e in self.entries)

    def buckets(self, bucket_bytes: int, dtype: torch.dtype | None = None) -> list[list[int]]:
        """Entry indices per bucket: greedy, in order, each <= bucket_bytes unless one tensor."""
        _check_bucket_bytes(bucket_bytes)
        out: list[list[int]] = []
        cur: list[int] = []
        size = 0
        for i, e in enumerate(self.entries):
            n = self.nbytes(e, dtype)
            if cur and size + n > bucket_bytes:
                out.append(cur)
                cur, size = [], 0
            cur.append(i)
            size += n
        if cur:
            out.append(cur)
        return out

    def owner(self, entry: int) -> int:
        """The global rank that assembles HF tensor ``entry`` and sends it on (weight sync):
        the holder of its first TP shard (expert-TP shard), i.e. TP rank 0 of the pipeline
        stage (or expert-parallel rank) that holds it."""
        return self.units[self.entries[entry].unit].sources[0]

    def owners(self) -> tuple[int, ...]:
        """Every owner rank (see :meth:`owner`), ascending."""
        return tuple(sorted({self.owner(i) for i in range(len(self.entries))}))

    def owned_buckets(self, bucket_bytes: int, dtype: torch.dtype | None = None
                      ) -> list[tuple[int, list[int]]]:
        """``(owner, entry indices)`` per bucket: each owner's tensors in HF order, greedily
        packed up to ``bucket_bytes`` (aligned as :func:`bucket_layout` lays them out; a larger
        tensor travels alone). The list is in the order the buckets close, the same on every
        rank; a rank takes part only in the buckets of its owner(s)."""
        _check_bucket_bytes(bucket_bytes)
        out: list[tuple[int, list[int]]] = []
        cur: dict[int, list[int]] = {}
        size: dict[int, int] = {}
        for i, e in enumerate(self.entries):
            o = self.owner(i)
            n = self.nbytes(e, dtype)
            end = -(-size.get(o, 0) // _ALIGN) * _ALIGN + n
            if cur.get(o) and end > bucket_bytes:
                out.append((o, cur.pop(o)))
                size[o], end = 0, n
            cur.setdefault(o, []).append(i)
            size[o] = end
        out.extend((o, b) for o, b in sorted(cur.items()))
        return out

    def pieces(self, unit: int, shard: int) -> list[ShardPiece]:
        """Geometry of shard ``shard`` of ``unit`` (views are meta tensors)."""
        key = (unit, shard)
        if key not in self._pieces:
            u = self.units[unit]
            meta = torch.empty(u.shard_shape, device="meta")
            self._pieces[key] = shard_pieces(u.kind, meta, self.spec, len(u.sources), shard)
        return self._pieces[key]

    def transfers(self, bucket: list[int], first_tag: int) -> list[_Transfer]:
        """Every region moving for ``bucket``, in the order all ranks post them."""
        out = []
        tag = first_tag
        for pos, ei in enumerate(bucket):
            e = self.entries[ei]
            for s in range(len(self.units[e.unit].sources)):
                for pi, g in enumerate(self.pieces(e.unit, s)):
                    if g.hf_index == e.index:
                        out.append(_Transfer(pos, e.unit, s, pi, g, tag))
                        tag += 1
        return out


def _check_bucket_bytes(bucket_bytes) -> None:
    if not isinstance(bucket_bytes, int) or isinstance(bucket_bytes, bool) or bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be a positive integer, got {bucket_bytes!r}")


def bucket_layout(plan: ReshardPlan, bucket: list[int], dtype: torch.dtype | None = None
                  ) -> tuple[list[int], int]:
    """Byte offset of each tensor of ``bucket`` in its packed form (each start aligned to
    64 bytes), and the packed size: how a bucket lies in the receive buffer, in the flat
    bytes an owner sends, and in the buffer a rollout worker receives into."""
    offsets, off = [], 0
    for i in bucket:
        off = -(-off // _ALIGN) * _ALIGN
        offsets.append(off)
        off += plan.nbytes(plan.entries[i], dtype)
    return offsets, off


def _rank_world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def plan_hf_weights(bundle: ModelBundle) -> ReshardPlan:
    """Collective: the :class:`ReshardPlan` of ``bundle`` (every rank of the role calls it).

    Raises:
        ReshardError: the ranks' parameters do not cover the HF model exactly once.
    """
    ctx = bundle.ctx
    rank, world = _rank_world()
    mine = []
    for lp in local_params(bundle):
        # Dense weights come from DP replica 0 (CP rank 0); expert weights from expert-DP
        # replica 0 - every expert-parallel rank of it holds different experts.
        if lp.expert:
            if ctx.edp_rank != 0:
                continue
        elif ctx.dp_rank != 0 or ctx.cp_rank != 0:
            continue
        split = lp.kind not in REPLICATED and lp.split_size > 1
        if not split and lp.split_rank != 0:
            continue
        mine.append(dict(hf_names=lp.hf_names, kind=lp.kind, shape=tuple(lp.param.shape),
                         dtype=lp.param.dtype, stage=(ctx.pp_rank, lp.chunk), chunk=lp.chunk,
                         name=lp.name, shard=lp.split_rank if split else 0,
                         n=lp.split_size if split else 1, rank=rank))
    if world > 1:
        every: list = [None] * world
        torch.distributed.all_gather_object(every, mine)
    else:
        every = [mine]

    # hf_names -> owning stage -> shard index -> report
    by_unit: dict[tuple[str, ...], dict[tuple[int, int], dict[int, dict]]] = {}
    for reports in every:
        for r in reports:
            by_unit.setdefault(r["hf_names"], {}).setdefault(r["stage"], {})[r["shard"]] = r
    order = {n: i for i, n in enumerate(expected_hf_names(bundle))}
    unknown = [k for k in by_unit if k[0] not in order]
    if unknown:
        raise ReshardError(f"parameters map to HF names outside the model: {unknown[:4]}")
    units = []
    for key in sorted(by_unit, key=lambda k: order[k[0]]):
        stage = min(by_unit[key])  # tied embeddings: the first stage's copy
        shards = by_unit[key][stage]
        first = shards[min(shards)]
        n = first["n"]
        if sorted(shards) != list(range(n)):
            raise ReshardError(f"{'+'.join(key)}: TP shards {sorted(shards)} of {n} were "
                               "reported (a rank is missing from the plan)")
        if any(s["shape"] != first["shape"] for s in shards.values()):
            raise ReshardError(f"{'+'.join(key)}: TP shards differ in shape")
        full = megatron_full_shape(first["kind"], first["shape"], n)
        shapes = tuple(hf_shapes(first["kind"], full, bundle.spec))
        units.append(WeightUnit(hf_names=key, hf_shapes=shapes, kind=first["kind"],
                                shard_shape=first["shape"], dtype=first["dtype"],
                                sources=tuple(shards[i]["rank"] for i in range(n)),
                                chunk=first["chunk"], name=first["name"]))
    entries = tuple(HFEntry(name, shape, ui, i) for ui, u in enumerate(units)
                    for i, (name, shape) in enumerate(zip(u.hf_names, u.hf_shapes)))
    got = [e.name for e in entries]
    if sorted(got) != sorted(order):
        missing = sorted(set(order) - set(got))
        extra = sorted(n for n in set(got) if got.count(n) > 1)
        raise ReshardError(f"the ranks' parameters do not cover the HF model exactly once: "
                           f"missing {missing[:8]}, duplicated {extra[:8]}")
    return ReshardPlan(spec=bundle.spec, units=tuple(units), entries=entries, world_size=world)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(-1).view(torch.uint8)


def iter_hf_weights(bundle: ModelBundle, *, bucket_bytes: int,
                    dtype: torch.dtype | None = None, dst_rank: int = 0,
                    device: torch.device | str | None = None, plan: ReshardPlan | None = None,
                    reuse_buffer: bool = False) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Collective generator: the model as HF-named full tensors, in buckets, on ``dst_rank``.

    Every rank of the role calls it with the same arguments and iterates it to the end (all
    ranks see the same number of buckets).

    Args:
        bundle: this rank's model (any TP/PP/VPP/DP/CP layout).
        bucket_bytes: bound on a bucket's bytes (in the output dtype); a larger tensor travels
            alone.
        dtype: output dtype (e.g. ``torch.bfloat16``); default: the parameters' dtype.
        dst_rank: global rank that receives the tensors.
        device: where ``dst_rank``'s tensors are returned; default: the platform device
            (where they travel).
        plan: a plan from :func:`plan_hf_weights` (computed here when None - a collective).
        reuse_buffer: receive every bucket into one buffer, kept by ``plan`` across calls
            (:meth:`ReshardPlan.free_buffer` releases it). Faster - page faults and allocator
            work happen once, not per bucket and sync - but a bucket's tensors are only valid
            until the next bucket is requested: consume or copy them first. A bucket holding a
            single tensor larger than ``bucket_bytes`` gets its own tensor.

    Yields:
        On ``dst_rank``: ``[(hf_name, tensor), ...]`` in transformers' order (HF layout, vocab
        padding removed, no tied ``lm_head``). Elsewhere: ``[]``.

    Memory: the generator keeps no reference to a bucket once it is yielded. A ``for`` loop
    keeps its loop variable alive while the next bucket is produced, so a consumer that wants
    the one-bucket bound with fresh tensors ends its loop body with ``del bucket``; with
    ``reuse_buffer`` the buffer is shared and this does not matter.
    """
    from megarlhf.platform import current_platform

    if plan is None:
        plan = plan_hf_weights(bundle)
    rank, world = _rank_world()
    if not 0 <= dst_rank < world:
        raise ValueError(f"dst_rank={dst_rank} is not a rank of this world of {world}")
    if plan.world_size != world:
        raise ValueError(f"the plan was made in a world of {plan.world_size} ranks, this one "
                         f"has {world}; make a new plan with plan_hf_weights")
    comm_device = current_platform().device if world > 1 else None
    local = {(lp.chunk, lp.name): lp.param.detach() for lp in local_params(bundle)}
    buckets = plan.buckets(bucket_bytes, dtype)
    arena = None
    tag = 0
    for bucket in buckets:
        transfers = plan.transfers(bucket, tag)
        tag += len(transfers)
        if rank == dst_rank:
            if reuse_buffer and (len(bucket) > 1
                                 or plan.nbytes(plan.entries[bucket[0]], dtype) <= bucket_bytes):
                if arena is None:
                    arena = plan.receive_buffer(_arena_bytes(plan, buckets, bucket_bytes, dtype),
                                                _dev(comm_device, local))
                outs = _views(plan, bucket, dtype, arena)
            else:
                outs = [torch.empty(plan.entries[i].shape, dtype=plan.out_dtype(plan.entries[i],
                                                                                dtype),
                                    device=_dev(comm_device, local)) for i in bucket]
            with torch.no_grad():
                _receive(plan, transfers, outs, rank, local)
                if device is not None:
                    outs = [o.to(device) for o in outs]
            batch = [(plan.entries[i].name, o) for i, o in zip(bucket, outs)]
            # Hold no reference while the next bucket is received. (This is also why the
            # function is not decorated with torch.no_grad(): its generator wrapper keeps the
            # last yielded value alive while it produces the next one.)
            del outs
            yield batch
            del batch
        else:
            with torch.no_grad():
                _send(plan, transfers, dtype, rank, dst_rank, local)
            yield []


@dataclass
class OwnedBucket:
    """One bucket on the rank that owns it (:func:`iter_owned_buckets`).

    Attributes:
        index: its position in ``plan.owned_buckets(bucket_bytes, dtype)`` (the same on every
            rank and on the receivers).
        names: HF names, in HF order.
        tensors: the full HF tensors, views of ``flat``.
        flat: the packed bytes (uint8, laid out by :func:`bucket_layout`): what goes on the wire.
    """

    index: int
    names: list[str]
    tensors: list[torch.Tensor]
    flat: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.flat.numel()


def iter_owned_buckets(bundle: ModelBundle, *, bucket_bytes: int,
                       dtype: torch.dtype | None = None, plan: ReshardPlan | None = None,
                       reuse_buffer: bool = True, to_all: bool = False
                       ) -> Iterator[OwnedBucket]:
    """Collective generator: every owner rank assembles its own share of the HF model.

    The weight-sync form of :func:`iter_hf_weights`: instead of one destination for the whole
    model, each HF tensor is assembled on its owner (:meth:`ReshardPlan.owner`: TP rank 0 of the
    pipeline stage that holds it; under expert parallelism the rank holding the expert), which
    receives the other TP ranks' regions of it (inside its stage) and yields whole buckets of
    its own tensors. No rank receives another stage's weights; owners work concurrently (a rank
    waits only for the TP peers of its own stage).

    Every rank of the role calls it with the same arguments and iterates it to the end; a rank
    yields only the buckets it owns (none on ranks that own nothing).

    Args:
        bucket_bytes: bound on one owner's bucket (packed, in the output dtype); a larger tensor
            travels alone.
        dtype: output dtype; default the parameters'.
        plan: from :func:`plan_hf_weights` (a collective when None).
        reuse_buffer: every bucket of this rank lands in one buffer kept by ``plan`` (sized to
            this rank's largest bucket): a bucket is valid until the next is requested.
        to_all: every rank yields every bucket: the owner broadcasts each bucket over the
            role's world once assembled (colocated CUDA-IPC sync, where each GPU's rollout
            worker reads the whole model from the trainer rank on its own GPU).

    Memory (per rank, beyond the model): one buffer of this rank's largest bucket (at most
    ``max(bucket_bytes, largest tensor)``), plus on a sender copies of its regions of one bucket.
    """
    from megarlhf.platform import current_platform

    if plan is None:
        plan = plan_hf_weights(bundle)
    rank, world = _rank_world()
    if plan.world_size != world:
        raise ValueError(f"the plan was made in a world of {plan.world_size} ranks, this one "
                         f"has {world}; make a new plan with plan_hf_weights")
    comm_device = current_platform().device if world > 1 else None
    local = {(lp.chunk, lp.name): lp.param.detach() for lp in local_params(bundle)}
    buckets = plan.owned_buckets(bucket_bytes, dtype)
    mine = [b for o, b in buckets if o == rank or to_all]
    arena_bytes = max((bucket_layout(plan, b, dtype)[1] for b in mine), default=0)
    tag = 0
    for index, (owner, bucket) in enumerate(buckets):
        transfers = plan.transfers(bucket, tag)
        tag += len(transfers)
        if rank == owner or to_all:
            offsets, total = bucket_layout(plan, bucket, dtype)
            device = _dev(comm_device, local)
            arena = (plan.receive_buffer(arena_bytes, device) if reuse_buffer
                     else torch.empty(total, dtype=torch.uint8, device=device))
            outs = []
            for i, off in zip(bucket, offsets):
                e = plan.entries[i]
                n = plan.nbytes(e, dtype)
                outs.append(arena[off: off + n].view(plan.out_dtype(e, dtype)).view(e.shape))
            with torch.no_grad():
                if rank == owner:
                    _receive(plan, transfers, outs, rank, local)
                elif any(plan.units[t.unit].sources[t.shard] == rank for t in transfers):
                    _send(plan, transfers, dtype, rank, owner, local)
                if to_all and world > 1:
                    torch.distributed.broadcast(arena[:total], src=owner)
            item = OwnedBucket(index, [plan.entries[i].name for i in bucket], outs,
                               arena[:total])
            del outs, arena
            yield item
            del item
        elif any(plan.units[t.unit].sources[t.shard] == rank for t in transfers):
            with torch.no_grad():
                _send(plan, transfers, dtype, rank, owner, local)


def _dev(comm_device, local) -> torch.device:
    if comm_device is not None:
        return comm_device
    return next(iter(local.values())).device if local else torch.device("cpu")


def _arena_bytes(plan, buckets, bucket_bytes, dtype) -> int:
    """Bytes of a buffer that holds any bucket but a single oversize tensor (aligned)."""
    size = 0
    for b in buckets:
        off = 0
        for i in b:
            off = -(-off // _ALIGN) * _ALIGN + plan.nbytes(plan.entries[i], dtype)
        if len(b) > 1 or off <= bucket_bytes:
            size = max(size, off)
    return size


def _views(plan, bucket, dtype, arena) -> list[torch.Tensor]:
    outs, off = [], 0
    for i in bucket:
        e = plan.entries[i]
        off = -(-off // _ALIGN) * _ALIGN
        n = plan.nbytes(e, dtype)
        outs.append(arena[off: off + n].view(plan.out_dtype(e, dtype)).view(e.shape))
        off += n
    return outs


def _local_region(plan, tr: _Transfer, local, out_dtype, region_shape) -> torch.Tensor:
    """This rank's data for a transfer: the region of its shard, HF-shaped, in ``out_dtype``."""
    u = plan.units[tr.unit]
    param = local[(u.chunk, u.name)]
    view = shard_pieces(u.kind, param, plan.spec, len(u.sources), tr.shard)[tr.piece].view
    return view.reshape(region_shape).to(out_dtype)


def _send(plan, transfers, dtype, rank, dst_rank, local) -> None:
    works, keep = [], []
    for tr in transfers:
        u = plan.units[tr.unit]
        if u.sources[tr.shard] != rank:
            continue
        e_shape = u.hf_shapes[tr.geom.hf_index]
        out_dtype = torch.float32 if u.kind == "fp32" else dtype or u.dtype
        data = _local_region(plan, tr, local, out_dtype, tr.geom.region_shape(e_shape))
        data = data.contiguous()
        keep.append(data)
        works.append(torch.distributed.isend(_as_bytes(data), dst_rank, tag=tr.tag))
    for w in works:
        w.wait()


def _receive(plan, transfers, outs, rank, local) -> None:
    """Posts every region of the bucket; waits for all of them before returning.

    Row blocks land in place in ``outs``. Column blocks (row-parallel weights at TP > 1) land in
    buffers of one shard each, copied into their strided destination once the next HF tensor
    begins: buffers exist for one HF tensor at a time, so they add at most one tensor to the
    bucket (and the TP ranks' blocks still travel concurrently).
    """
    works = []
    pending: list[tuple[object, torch.Tensor, torch.Tensor]] = []  # column blocks in flight
    pos = -1
    for tr in transfers:
        if tr.pos != pos:
            _finish(pending)
            pos = tr.pos
        u = plan.units[tr.unit]
        out = outs[tr.pos]
        g = tr.geom
        dest = g.region_of(out)
        src = u.sources[tr.shard]
        if src == rank:
            dest.copy_(_local_region(plan, tr, local, out.dtype, dest.shape))
        elif g.cols is None:
            works.append(torch.distributed.irecv(_as_bytes(dest), src, tag=tr.tag))
        else:
            buf = torch.empty(dest.shape, dtype=out.dtype, device=out.device)
            pending.append((torch.distributed.irecv(_as_bytes(buf), src, tag=tr.tag), buf, dest))
    _finish(pending)
    # Each work is waited for exactly once (a second wait() on a finished gloo recv can block).
    for w in works:
        w.wait()


def _finish(pending) -> None:
    for work, buf, dest in pending:
        work.wait()
        dest.copy_(buf)
    pending.clear()


def gather_hf_state_dict(bundle: ModelBundle, *, dtype: torch.dtype | None = None,
                         dst_rank: int = 0, device: torch.device | str | None = "cpu",
                         bucket_bytes: int = 1 << 28) -> dict[str, torch.Tensor]:
    """Collective: the whole HF state dict on ``dst_rank`` (``{}`` elsewhere).

    A convenience for small models and tests; it holds the whole model on ``dst_rank``.
    """
    out: dict[str, torch.Tensor] = {}
    for bucket in iter_hf_weights(bundle, bucket_bytes=bucket_bytes, dtype=dtype,
                                  dst_rank=dst_rank, device=device):
        out.update(bucket)
    return out
