"""Multi-node placement without Ray: megatron's rank coordinates, the ranks each logical node
holds (what ``megarlhf plan`` prints), and the binding of logical nodes to Ray nodes."""

import pytest

from megarlhf.config.base import from_dict
from megarlhf.config.schema import JobConfig
from megarlhf.parallel.layout import ParallelLayout
from megarlhf.planning.placement import NodeSlots, PlacementError, assign_nodes, plan_placement

pytestmark = pytest.mark.unit

ARCH = {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
        "max_position_embeddings": 128}


def _job(placement="split", **roles):
    data = {"kind": "grpo",
            "cluster": {"num_nodes": 2, "gpus_per_node": 4, "placement": placement},
            "actor": {"model": {"arch": ARCH}, "parallel": {"tp": 2, "pp": 2}, "num_gpus": 4,
                      "optimizer": {"use_distributed_optimizer": False}},
            "reference": {"num_gpus": 2, "parallel": {"tp": 2}},
            "rollout": {"engine": "hf", "num_gpus": 2},
            "algorithm": {"track_kl": True},
            "batch": {"rollout_prompts_global": 4, "train_prompts_global": 4,
                      "n_samples_per_prompt": 2}}
    for k, v in roles.items():
        data[k] = {**data.get(k, {}), **v}
    return from_dict(JobConfig, data)


def test_rank_coords_follow_megatron_order():
    """If this fails, plan reports the wrong pipeline stage / DP replica per node (megatron
    orders ranks tp, cp, dp, pp from fastest to slowest)."""
    lay = ParallelLayout(tp=2, cp=2, dp=2, pp=2)
    seen = set()
    for r in range(lay.world_size):
        c = lay.coords(r)
        assert r == c["tp"] + 2 * (c["cp"] + 2 * (c["dp"] + 2 * c["pp"]))
        seen.add(tuple(c.values()))
    assert len(seen) == 16
    assert ParallelLayout(tp=8, pp=4).coords(17) == {"tp": 1, "cp": 0, "dp": 0, "pp": 2}
    with pytest.raises(ValueError):
        lay.coords(16)


def test_units_on_nodes_and_plan_prints_the_node_of_every_rank():
    """If this fails, `megarlhf plan` does not say which node each role's ranks land on, or says
    something the placement does not do."""
    from megarlhf.planning.plan import format_plan, make_plan, node_rows

    job = _job()
    pl = plan_placement(job)
    # split: actor 4 GPUs = n0 (pp 0 on n0:0-1, pp 1 on n0:2-3); reference n1:0-1; rollout
    # n1:2-3 (two replicas).
    assert pl.units_on("actor", 0) == [0, 1, 2, 3] and pl.units_on("actor", 1) == []
    assert pl.units_on("reference", 1) == [0, 1]
    assert pl.units_on("rollout", 1) == [0, 1]
    assert pl.slots_per_node() == {0: 4, 1: 4}
    rows = node_rows(make_plan(job))
    assert rows == [
        ["n0", "actor", "GPUs 0-3", "ranks 0-3", "pp 0-1; rendezvous (rank 0)"],
        ["n1", "reference", "GPUs 0-1", "ranks 0-1", "the whole role; rendezvous (rank 0)"],
        ["n1", "rollout", "GPUs 2-3", "replicas 0-1", "TP1 each"],
    ]
    text = format_plan(make_plan(job))
    assert "ranks per node" in text and "n1  reference" in text

    # A role over two nodes: TP groups inside a node, one pipeline stage per node.
    job = _job("colocate_all", cluster={"num_nodes": 2, "gpus_per_node": 2},
               reference={"num_gpus": 2}, actor={"num_gpus": 4, "parallel": {"tp": 2, "pp": 2}})
    rows = node_rows(make_plan(job))
    assert ["n0", "actor", "GPUs 0-1", "ranks 0-1", "pp 0; rendezvous (rank 0)"] in rows
    assert ["n1", "actor", "GPUs 0-1", "ranks 2-3", "pp 1"] in rows
    # One node: no per-node section.
    one = _job(cluster={"num_nodes": 1, "gpus_per_node": 8})
    assert "ranks per node" not in format_plan(make_plan(one))


def _nodes(*spec):
    return [NodeSlots(nid, f"10.0.0.{i}", total, avail)
            for i, (nid, total, avail) in enumerate(spec)]


def test_assign_nodes_gives_each_logical_node_its_own_ray_node():
    """If this fails, two logical nodes share a Ray node (or one is split), so the node map of
    `megarlhf plan` is not what runs."""
    pl = plan_placement(_job())  # n0: 4 GPUs, n1: 4 GPUs
    nodes = _nodes(("head", 0, 0), ("bbbb", 4, 4), ("aaaa", 4, 4), ("big", 8, 8))
    got = assign_nodes(pl, nodes)
    # Largest free first, then the lowest id among equals; never the same node twice.
    assert got[0].node_id == "big" and got[1].node_id == "aaaa"
    # A node whose GPUs are busy is taken only when nothing else holds the logical node.
    got = assign_nodes(pl, _nodes(("aaaa", 4, 0), ("bbbb", 4, 4), ("cccc", 4, 4)))
    assert {got[0].node_id, got[1].node_id} == {"bbbb", "cccc"}
    got = assign_nodes(pl, _nodes(("aaaa", 4, 0), ("bbbb", 4, 4)))
    assert {got[0].node_id, got[1].node_id} == {"aaaa", "bbbb"}


def test_assign_nodes_refuses_a_cluster_without_enough_nodes():
    """If this fails, a job starts on fewer Ray nodes than its plan and waits forever, instead
    of saying how many nodes of how many GPUs it needs."""
    pl = plan_placement(_job())
    with pytest.raises(PlacementError) as e:
        assign_nodes(pl, _nodes(("head", 0, 0), ("aaaa", 4, 4)))
    msg = str(e.value)
    assert "node n1 of the placement needs 4 GPUs on one Ray node" in msg
    assert "Start Ray on 2 nodes" in msg and "already bound: n0 -> 10.0.0.1" in msg
    with pytest.raises(PlacementError, match="needs 4 GPUs"):
        assign_nodes(pl, _nodes(("aaaa", 2, 2), ("bbbb", 2, 2), ("cccc", 2, 2)))
