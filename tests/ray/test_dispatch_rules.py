"""The dispatch/collect rules of worker methods, without Ray (pure functions; unit tier).

They live beside the Ray tests because they define what every worker group call does.
"""

import pytest
import torch

from megarlhf.engine.batch import TokenBatch
from megarlhf.workers.dispatch import (
    Collect,
    Dispatch,
    RankInfo,
    collect_results,
    dispatch_args,
    register,
    registered_methods,
)


class _Worker:
    @register(Dispatch.DP_SPLIT, Collect.DP_CONCAT, split=("batch",))
    def forward(self, batch, temperature=1.0):
        pass

    @register(Dispatch.DP_SPLIT, Collect.DP_CONCAT, split=("prompts",), offset_arg="first")
    def generate(self, prompts, params, first=0):
        pass

    @register(Dispatch.DP_SPLIT, Collect.OUTPUT_RANK0, split=("batch",))
    def train(self, batch, spec):
        pass

    @register()
    def offload(self):
        pass


def _ranks_tp2_pp2_dp2():
    """Megatron's order (tp fastest, then dp, then pp) for TP2/PP2/DP2 on 8 ranks."""
    out = []
    for rank in range(8):
        tp, dp, pp = rank % 2, (rank // 2) % 2, rank // 4
        out.append(RankInfo(rank=rank, dp_rank=dp, dp_size=2, tp_rank=tp, pp_rank=pp,
                            is_output_rank=pp == 1 and tp == 0))
    return out


def _batch():
    seqs = [[1] * n for n in (3, 5, 2, 7)]
    return TokenBatch.from_sequences(seqs)


def test_registry_lists_declared_methods():
    """If this fails, worker groups would not bind (or would mis-declare) worker methods."""
    specs = registered_methods(_Worker)
    assert set(specs) == {"forward", "generate", "train", "offload"}
    assert specs["offload"].dispatch is Dispatch.ONE_TO_ALL
    with pytest.raises(ValueError, match="split="):
        register(Dispatch.DP_SPLIT)
    with pytest.raises(ValueError, match="not a parameter"):
        register(Dispatch.DP_SPLIT, split=("nope",))(_Worker.forward)


def test_dp_split_sends_each_replica_its_shard_once():
    """If this fails, ranks of one DP replica get different rows, or a shard is stored per rank."""
    ranks = _ranks_tp2_pp2_dp2()
    stored = []

    def put(v):
        stored.append(v)
        return v

    spec = registered_methods(_Worker)["forward"]
    batch = _batch()
    per_rank, ctx = dispatch_args(spec, _Worker.forward, ranks, (batch,), {"temperature": 0.7},
                                  put)
    assert ctx.seq_len == 7
    shards = [kw["batch"] for _, kw in per_rank]
    for r, shard in zip(ranks, shards):
        want = batch.shard(r.dp_rank, 2)
        assert torch.equal(shard.input_ids, want.input_ids)
    assert all(kw["temperature"] == 0.7 for _, kw in per_rank)
    assert sum(isinstance(v, TokenBatch) for v in stored) == 2  # one per replica
    assert shards[0] is shards[1] is shards[4] is shards[5]  # every rank of replica 0


def test_dp_concat_takes_output_ranks_in_dp_order_padded_to_the_batch():
    """If this fails, results come from the wrong PP stage/TP rank, out of DP order, or ragged."""
    ranks = _ranks_tp2_pp2_dp2()
    spec = registered_methods(_Worker)["forward"]
    _, ctx = dispatch_args(spec, _Worker.forward, ranks, (_batch(),), {})
    results = []
    for r in ranks:  # replica d's shard is trimmed to its longest row: 5, then 7 tokens
        s = 5 if r.dp_rank == 0 else 7
        val = float(10 * r.dp_rank + r.rank) if r.is_output_rank else float("nan")
        results.append({"logp": torch.full((2, s), val)})
    out = collect_results(spec, ranks, results, ctx)["logp"]
    assert out.shape == (4, 7)
    assert torch.all(out[:2, :5] == 4.0) and torch.all(out[:2, 5:] == 0)  # rank 4: pp1 tp0 dp0
    assert torch.all(out[2:] == 16.0)  # rank 6: pp1 tp0 dp1
    train = registered_methods(_Worker)["train"]
    assert collect_results(train, ranks, list(range(8)), ctx) == 4


def test_list_split_is_contiguous_with_offsets():
    """If this fails, rollout prompts are split unevenly, reordered, or seeds not offset."""
    ranks = [RankInfo(rank=k, dp_rank=k, dp_size=3) for k in range(3)]
    spec = registered_methods(_Worker)["generate"]
    per_rank, ctx = dispatch_args(spec, _Worker.generate, ranks, ([[1], [2], [3], [4], [5]],
                                                                 "params"), {})
    assert [kw["prompts"] for _, kw in per_rank] == [[[1], [2]], [[3], [4]], [[5]]]
    assert [kw["first"] for _, kw in per_rank] == [0, 2, 4]
    assert all(kw["params"] == "params" for _, kw in per_rank)
    out = collect_results(spec, ranks, [["a", "b"], ["c", "d"], ["e"]], ctx)
    assert out == ["a", "b", "c", "d", "e"]


def test_uneven_batch_is_refused():
    """If this fails, a batch that does not split over DP replicas is silently truncated."""
    ranks = [RankInfo(rank=k, dp_rank=k, dp_size=3) for k in range(3)]
    spec = registered_methods(_Worker)["forward"]
    with pytest.raises(ValueError, match="multiple of 3"):
        dispatch_args(spec, _Worker.forward, ranks, (_batch(),), {})
