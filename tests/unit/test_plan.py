"""``megarlhf plan``: placement rules and the memory estimate against hand calculations."""

import glob
import os

import pytest

from megarlhf.config.base import ConfigError, from_dict
from megarlhf.config.schema import JobConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))

LLAMA3_70B = {
    "model_type": "llama", "vocab_size": 128256, "hidden_size": 8192,
    "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
    "num_key_value_heads": 8, "max_position_embeddings": 8192, "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "hidden_act": "silu",
}


def _job(**over):
    data = {
        "kind": "grpo",
        "cluster": {"num_nodes": 8, "gpus_per_node": 8, "gpu_memory_gib": 80,
                    "placement": "colocate_all"},
        "actor": {"model": {"arch": LLAMA3_70B, "dtype": "bf16", "recompute": "selective"},
                  "parallel": {"tp": 8, "pp": 4, "sequence_parallel": True}, "num_gpus": 64,
                  "max_tokens_per_micro_batch": 4096, "offload": True,
                  "optimizer": {"name": "adam", "use_distributed_optimizer": True}},
        "rollout": {"engine": "vllm", "tp": 8, "num_gpus": 64, "max_new_tokens": 1024,
                    "gpu_memory_utilization": 0.6},
        "batch": {"rollout_prompts_global": 64, "train_prompts_global": 64,
                  "n_samples_per_prompt": 4},
    }
    for key, value in over.items():
        node = data
        *path, last = key.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    return from_dict(JobConfig, data)


def test_llama3_70b_state_memory_matches_hand_calculation():
    """If this fails, plan miscounts weights, grads or optimizer state and accepts OOM layouts."""
    from megarlhf.planning.plan import ModelShape, estimate_role

    # Llama-3-70B: L=80, h=8192, F=28672, a=64 heads, g=8 KV heads, d=128, V=128256, untied.
    h, F, a, g, d, L, V = 8192, 28672, 64, 8, 128, 80, 128256
    split = 2 * h * a * d + 2 * h * g * d + 3 * h * F  # q,o + k,v + gate,up,down
    assert split == 855_638_016
    replicated = 2 * h  # the two RMSNorms of a layer
    shape = ModelShape.from_model(_job().actor.model)
    assert shape.total_params("lm") == L * (split + replicated) + 2 * V * h + h \
        == 70_553_706_496  # Llama-3-70B's published 70.6B

    # TP8/PP4 on 64 GPUs -> DP2. Each stage: 20 layers, linear weights / 8, norms replicated.
    per_layer = split // 8 + replicated  # 106,971,136
    vocab_padded = 129_024  # 128256 rounded up to a multiple of 128 * tp = 1024
    embedding = vocab_padded * h // 8  # 132,120,576 per TP rank
    first = 20 * per_layer + embedding  # 2,271,543,296
    last = 20 * per_layer + h + embedding  # + final norm + LM head = 2,271,551,488
    est = estimate_role(_job(), "actor")
    assert est.layout.dp == 2
    assert [s.params for s in est.stages] == [first, 20 * per_layer, 20 * per_layer, last]

    # bf16 weights 2 B, fp32 grads 4 B (megatron DDP grad buffer), DistributedOptimizer:
    # fp32 main params 4 B + Adam m, v 8 B = 12 B sharded over DP=2 -> 6 B per parameter.
    st = est.stages[-1]
    assert st.weights == last * 2 == 4_543_102_976  # 4.23 GiB
    assert st.grads == last * 4 == 9_086_205_952  # 8.46 GiB
    assert st.optimizer == last * 12 / 2 == 13_629_308_928  # 12.69 GiB
    # Without the DistributedOptimizer the 12 bytes are not sharded.
    st1 = estimate_role(_job(**{"actor.optimizer.use_distributed_optimizer": False}),
                        "actor").stages[-1]
    assert st1.optimizer == last * 12


def test_activation_formula_reduces_to_the_papers_gpt_layer():
    """If this fails, activations no longer follow Korthikanti et al.'s per-layer formulas."""
    from megarlhf.planning.plan import ModelShape, layer_activation_bytes
    from megarlhf.parallel.layout import ParallelLayout

    h, a, s, b = 4096, 32, 2048, 1
    # SwiGLU with F = 2h has the paper's 4h-GeLU MLP term: 3 + 8F/h = 3 + 16 = 19.
    gpt = ModelShape(num_layers=1, hidden=h, ffn=2 * h, heads=a, kv_groups=a, head_dim=h // a,
                     vocab=32000, tied=False, qkv_bias=False, qk_norm=False)
    A = layer_activation_bytes(gpt, s, b, ParallelLayout(), recompute="none", flash=False)
    assert A == pytest.approx(s * b * h * (34 + 5 * a * s / h))
    t = 8
    A = layer_activation_bytes(gpt, s, b, ParallelLayout(tp=t), recompute="none", flash=False)
    assert A == pytest.approx(s * b * h * (10 + 24 / t + 5 * a * s / (h * t)))
    A = layer_activation_bytes(gpt, s, b, ParallelLayout(tp=t, sequence_parallel=True),
                               recompute="selective", flash=False)
    assert A == pytest.approx(s * b * h * 34 / t)


def test_plan_rejects_a_layout_that_cannot_fit():
    """If this fails, plan accepts a layout that cannot fit, or refuses it without the fix."""
    from megarlhf.cli import main
    from megarlhf.planning.plan import PlanError, check_plan, make_plan

    # 70B on one node: TP8 alone, DP1 -> ~17 B/param x 8.8B params per GPU.
    job = _job(**{"cluster.num_nodes": 1, "actor.parallel": {"tp": 8}, "actor.num_gpus": 8,
                  "rollout.num_gpus": 8})
    plan = make_plan(job)
    assert not plan.fits
    msg = plan.problems[0]
    assert msg.startswith("actor does not fit") and "cluster.gpu_memory_gib = 80" in msg
    assert "GiB per GPU" in msg and "actor.parallel.pp" in msg
    with pytest.raises(PlanError, match="actor does not fit"):
        check_plan(job)
    # Resident roles count while another works: no offload -> the rollout phase overflows.
    plan = make_plan(_job(**{"actor.offload": False, "rollout.gpu_memory_utilization": 0.8}))
    assert make_plan(_job(**{"rollout.gpu_memory_utilization": 0.8})).fits
    assert any(p.startswith("rollout does not fit") and "offload: true on actor" in p
               for p in plan.problems)
    # The command exits non-zero.
    assert main(["plan", CONFIGS[0], "cluster.gpu_memory_gib=20"]) == 1


def test_placement_keeps_tp_groups_inside_nodes():
    """If this fails, a TP group may straddle two nodes or a pool may exceed the cluster."""
    from megarlhf.planning.placement import PlacementError, plan_placement

    with pytest.raises(PlacementError, match=r"actor.parallel.tp = 16 > cluster.gpus_per_node"):
        plan_placement(_job(**{"actor.parallel": {"tp": 16}, "actor.num_gpus": 16,
                               "rollout.num_gpus": 16}))
    # split on 8-GPU nodes: actor 4 GPUs (TP4) at n0:0-3, rollout TP8 must start on node 1.
    job = _job(**{"cluster.num_nodes": 2, "cluster.placement": "split",
                  "actor.parallel": {"tp": 4}, "actor.num_gpus": 4, "rollout.num_gpus": 8})
    plan = plan_placement(job)
    assert [str(s) for s in plan.roles["actor"].slots] == ["n0:0", "n0:1", "n0:2", "n0:3"]
    assert {s.node for s in plan.roles["rollout"].slots} == {1}
    assert plan.roles["actor"].fraction == 1.0
    # colocate_pairs: actor+reference+rollout share a pool, critic+reward model another.
    job = _job(**{"kind": "ppo", "cluster.num_nodes": 2, "cluster.placement": "colocate_pairs",
                  "actor.parallel": {"tp": 8}, "actor.num_gpus": 8, "rollout.num_gpus": 8,
                  "algorithm.kl_coef": 0.1,
                  "critic": {"parallel": {"tp": 8}, "num_gpus": 8}})
    plan = plan_placement(job)
    assert [p.roles for p in plan.pools] == [("actor", "reference", "rollout"), ("critic",)]
    assert plan.roles["actor"].slots == plan.roles["reference"].slots
    assert plan.roles["actor"].fraction == pytest.approx(1 / 3, abs=1e-4)
    assert {s.node for s in plan.roles["critic"].slots} == {1}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from _inputs import make_inputs

    return make_inputs(str(tmp_path_factory.mktemp("inputs")))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_shipped_configs_validate_and_plan(path, inputs, tmp_path, capsys):
    """If this fails, a shipped config no longer plans (or validates once given the tokenizer
    and prompts it leaves to the user) or fits the GPUs it is written for."""
    from megarlhf.cli import main

    assert main(["plan", path, f"output_dir={tmp_path / 'out'}"]) == 0
    captured = capsys.readouterr()
    assert "fits: peak" in captured.out
    # A planning template: plan notes what train needs; validate refuses it until given.
    assert "note: needed to train: data.train_path: not set" in captured.err
    assert main(["validate", "--quiet", path, f"output_dir={tmp_path / 'out'}"]) == 2
    given = [f"output_dir={tmp_path / 'out'}", f"actor.model.tokenizer={inputs['tokenizer']}",
             f"data.train_path={inputs['prompts_train']}"]
    if "reward_model:" in open(path).read():
        given.append(f"reward_model.model.tokenizer={inputs['tokenizer']}")
    assert main(["validate", "--quiet", path] + given) == 0, capsys.readouterr().err


def test_shipped_configs_cover_8b_70b_and_200b_class():
    """If this fails, one of the three reference configs is missing or its model the wrong size."""
    from megarlhf.config import load_config
    from megarlhf.planning.plan import ModelShape

    names = {os.path.basename(p): p for p in CONFIGS}
    sizes = {}
    for name in ("llama3_8b_grpo_8xh100.yaml", "llama3_70b_ppo_4nodes.yaml",
                 "qwen_200b_class_grpo_16nodes.yaml"):
        job = load_config(names[name])
        sizes[name] = ModelShape.from_model(job.actor.model).total_params("lm") / 1e9
    assert 7.5 < sizes["llama3_8b_grpo_8xh100.yaml"] < 8.5
    assert 69 < sizes["llama3_70b_ppo_4nodes.yaml"] < 72
    assert 180 < sizes["qwen_200b_class_grpo_16nodes.yaml"] < 230
    assert load_config(names["qwen_200b_class_grpo_16nodes.yaml"]).cluster.num_nodes >= 16


def test_unfittable_config_is_a_config_error():
    """If this fails, an impossible placement is not reported as a config error by the CLI."""
    from megarlhf.cli import main

    assert main(["plan", CONFIGS[0], "cluster.gpus_per_node=1", "cluster.num_nodes=64"]) == 2
    with pytest.raises(ConfigError):
        from megarlhf.planning.placement import plan_placement

        plan_placement(_job(**{"cluster.gpus_per_node": 4, "actor.parallel": {"tp": 8},
                               "actor.num_gpus": 8, "rollout.num_gpus": 8}))


def test_weight_sync_phase_and_cost_model():
    """If this fails, plan forgets the weight sync: it accepts a colocated layout whose actor
    (fully onloaded) plus vLLM's weights do not fit, miscounts the owners, or prints no
    seconds for the sync."""
    from megarlhf.planning.plan import GIB, IB_GB_S, make_plan

    job = _job()  # 70B, TP8/PP4 colocated with 8 vLLM TP8 replicas on 8 nodes, actor offloads
    plan = make_plan(job)
    (sync_phase,) = [p for p in plan.phases if p.active == "weight sync"]
    actor = plan.roles["actor"]
    # Only the actor's weights come back for a sync (grads and optimizer stay in host memory).
    assert sync_phase.parts["actor weights"] == max(st.weights for st in actor.stages)
    assert sync_phase.parts["vLLM weights"] == plan.rollout.weights
    s = plan.sync
    assert s.colocated and s.multi_node and s.owners == 4  # PP4: TP rank 0 of each stage
    assert s.total_bytes == pytest.approx(70_553_706_496 * 2)
    assert s.wire_s == pytest.approx(s.total_bytes / (IB_GB_S * 1e9))
    assert s.bucket_bytes == 512 * 2**20  # IPC: one bucket in flight, the whole budget
    assert plan.fits
    # Buckets too large for what is left next to both models' weights: refused, with the fix.
    tight = make_plan(_job(**{"rollout.weight_sync_bucket_mib": 32_000}))
    assert [p for p in tight.problems if "weight sync does not fit" in p
            and "lower rollout.weight_sync_bucket_mib" in p], tight.problems
    # Colocated rollout GPUs without an actor rank: CUDA IPC cannot reach them.
    bare = make_plan(_job(**{"actor.num_gpus": 32, "actor.parallel.pp": 2}))
    assert any("cannot reach the rollout GPUs" in p for p in bare.problems), bare.problems
    # Split: the rollout's GPUs hold vLLM's whole share plus the buckets in flight.
    split = make_plan(_job(**{"cluster.placement": "split", "cluster.num_nodes": 24}))
    rollout_phase = [p for p in split.phases if p.active == "weight sync"
                     and "rollout (awake)" in p.parts][0]
    assert rollout_phase.parts["buckets in flight (rollout)"] == 512 * 2**20
    assert not split.sync.colocated and split.sync.bucket_bytes == 128 * 2**20  # 512 / 4
    assert sync_phase.total < 80 * GIB
