"""A real multi-node Ray cluster on one machine (``ray.cluster_utils.Cluster``): a head without
GPUs and two worker nodes with 2 declared GPUs each, every node its own raylet.

* GRPO steps on 2 nodes (``RLTrainer``, the production driver) against the single-process
  engine: *split* (actor TP2 on one node; reference and one rollout replica on the other) and
  *colocated* (actor TP2/PP2 over both nodes, one pipeline stage per node, a rollout replica
  on the first stage's GPU). Each run checks where the ranks landed against the plan (each
  logical node on a Ray node of its own, every TP group inside a node, one rendezvous per role
  at its rank 0) and, in one process with the same HF weights, re-scores and re-trains the
  batch the first step trained on with the same loss spec. Tolerances as in
  test_worker_groups.py (fp32; TP/PP only reorder float sums): log-probs before and after the
  optimizer step within 1e-5 absolute, loss and grad norm within 1e-5 relative.
* A lost node: the node holding the reference and the rollout replica is removed (its raylet
  and workers killed) in the middle of a run driven by ``megarlhf train`` connected to the
  cluster; the run must end within 60 s naming the node, what it held and the last complete
  checkpoint, and ``--resume`` on a replacement node must reproduce the uninterrupted run.
* ``ray job submit`` (the head runs Ray's dashboard / job server): a 2-node SFT job submitted
  with a runtime environment (``working_dir`` carrying megarlhf's source, ``env_vars``) runs
  to completion, connecting through the ``RAY_ADDRESS`` Ray gives its entrypoint.
"""

import glob
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from megarlhf.platform.launch import run_distributed

pytestmark = pytest.mark.ray
ray = pytest.importorskip("ray")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GPUS_PER_NODE = 2
# Deterministic on CPU (seeded sampling, deterministic kernels and gloo reductions).
DETERMINISTIC = ["reward/raw_mean", "reward/raw_std", "policy/kl_ref", "policy/entropy",
                 "policy/clip_frac", "policy/approx_kl", "policy/grad_norm",
                 "policy/response_length", "policy/pg_loss"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """Head (no GPUs, the dashboard for job submission) + 2 worker nodes x 2 fake GPUs."""
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    port = _free_port()
    c = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=1, num_gpus=0, include_dashboard=True, dashboard_host="127.0.0.1",
        dashboard_port=port, dashboard_agent_listen_port=_free_port()))
    try:
        # Each node's dashboard agent (runtime envs, job submission) on a port of its own: the
        # default (52365) may be held by another Ray on the machine, and then job submission
        # answers "No available agent".
        for _ in range(2):
            c.add_node(num_cpus=1, num_gpus=GPUS_PER_NODE,
                       dashboard_agent_listen_port=_free_port())
        c.wait_for_nodes()
        # cluster_utils records this cluster as the machine's "current" one, which a plain
        # ray.init() elsewhere on the machine would join; nothing here relies on it.
        ray._common.utils.reset_ray_address()
        ray.init(address=c.address, log_to_driver=False, configure_logging=False)
        c.dashboard_url = f"http://127.0.0.1:{port}"
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from unit._inputs import make_inputs

    return make_inputs(str(tmp_path_factory.mktemp("inputs")))


def _grpo(inputs, out, placement, **over):
    from unit._inputs import grpo_config, set_dotted

    job = grpo_config(inputs, str(out), **{
        "cluster": {"num_nodes": 2, "gpus_per_node": GPUS_PER_NODE, "device": "auto",
                    "placement": placement},
        "actor.optimizer": {"name": "sgd", "lr": 0.05, "clip_grad": 1.0,
                            "use_distributed_optimizer": False},
        "train.steps": 1, "logging.tensorboard": True})
    return set_dotted(job, over)


def _split(inputs, out, **over):
    """Actor TP2 on node n0; reference (KL tracked) and one rollout replica on node n1."""
    return _grpo(inputs, out, "split", **{
        "actor.parallel": {"tp": 2}, "actor.num_gpus": 2,
        "reference": {"num_gpus": 1}, "algorithm.track_kl": True, **over})


def _colocated(inputs, out, **over):
    """Actor TP2/PP2 on all 4 GPUs (pp 0 on n0, pp 1 on n1); the rollout replica on n0:0."""
    return _grpo(inputs, out, "colocate_all", **{
        "actor.parallel": {"tp": 2, "pp": 2}, "actor.num_gpus": 4,
        "actor.micro_batch_size_per_rank": 4, "algorithm.track_kl": False, **over})


def _recording_trainer(job):
    """RLTrainer, recording what its first actor update trained on and where every rank ran."""
    from megarlhf.controller.rl import RLTrainer

    class Recording(RLTrainer):
        record = None

        def train_policy(self, cl, batch):
            if self.record is not None:
                return super().train_policy(cl, batch)
            actor, calls = cl["actor"], []
            train = actor.train

            def spy(mini, spec, **kw):
                calls.append((mini, spec))
                return train(mini, spec, **kw)

            actor.train = spy
            try:
                metrics = super().train_policy(cl, batch)
            finally:
                actor.train = train
            cl.activate("actor")
            groups = dict(cl.groups, rollout=cl.rollout)
            self.record = {
                "calls": calls, "batch": batch, "metrics": metrics,
                "after": actor.forward(calls[0][0])["logp"], "plan": cl.plan,
                "nodes": {k: n.node_id for k, n in cl.placement.nodes.items()},
                "ranks": {role: list(g.ranks) for role, g in groups.items()},
            }
            return metrics

    return Recording(job)


def single_process_oracle(lm_dir, mini, spec):
    """The one-process engine from the same HF weights: log-probs, one step, log-probs."""
    from megarlhf.config.schema import ModelConfig, OptimizerConfig
    from megarlhf.engine.engine import MegatronEngine
    from megarlhf.models.builder import build_model
    from megarlhf.parallel.layout import ParallelLayout, initialize_parallel
    from megarlhf.weights.loader import load_hf_dir

    ctx = initialize_parallel(ParallelLayout(), seed=1)
    bundle = build_model(ModelConfig(hf_dir=lm_dir, dtype="fp32"), ctx, head="lm",
                         for_training=True, init_weights=False, seed=1,
                         use_distributed_optimizer=False)
    load_hf_dir(bundle, lm_dir)
    opt = OptimizerConfig(name="sgd", lr=0.05, clip_grad=1.0, use_distributed_optimizer=False)
    eng = MegatronEngine(bundle, opt, total_steps=1, micro_batch_size=16)
    before = eng.forward(mini)["logp"]
    step = eng.train(mini, spec)
    after = eng.forward(mini)["logp"]
    return {"before": before, "after": after, "loss": step.metrics["loss"],
            "grad_norm": step.grad_norm}


def _check_against_oracle(rec, lm_dir):
    [(mini, spec)] = rec["calls"]  # train_prompts_global = rollout_prompts_global: one step
    ref = run_distributed(single_process_oracle, 1, lm_dir, mini, spec, timeout=300)[0]
    mask = mini.fields["response_mask"].bool()

    def err(a, b):
        return (a - b)[mask].abs().max().item()

    assert err(mini.fields["logp_old"], ref["before"]) < 1e-5
    if "logp_ref" in mini.fields:  # the frozen reference scores the initial weights
        assert err(mini.fields["logp_ref"], ref["before"]) < 1e-5
    assert err(rec["after"], ref["after"]) < 1e-5, err(rec["after"], ref["after"])
    m = rec["metrics"]
    assert abs(m["policy/loss"] - ref["loss"]) <= 1e-5 * abs(ref["loss"]) + 1e-8
    assert abs(m["policy/grad_norm"] - ref["grad_norm"]) <= 1e-5 * ref["grad_norm"]


def _check_ranks_follow_plan(rec):
    """Every rank on the Ray node its logical node is bound to; nodes distinct; one rendezvous
    per role at its rank 0's node."""
    plan, nodes, ranks = rec["plan"], rec["nodes"], rec["ranks"]
    assert sorted(nodes) == [0, 1] and nodes[0] != nodes[1]
    for role, infos in ranks.items():
        rp = plan.role(role)
        size = rp.tp if role == "rollout" else 1
        for info in infos:
            assert info.node_id == nodes[rp.slots[info.rank * size].node], (role, info)
        if role == "rollout":
            continue
        assert len({i.rendezvous for i in infos}) == 1, (role, [i.rendezvous for i in infos])
        assert infos[0].rendezvous.rsplit(":", 1)[0] == infos[0].node_ip
        # Each TP group inside one node.
        groups = {}
        for i in infos:
            groups.setdefault((i.pp_rank, i.dp_rank), set()).add(i.node_id)
        assert all(len(g) == 1 for g in groups.values()), groups
    rdv = [infos[0].rendezvous for role, infos in ranks.items() if role != "rollout"]
    assert len(set(rdv)) == len(rdv)  # each role its own world


@pytest.fixture(scope="module")
def split_run(cluster, inputs, tmp_path_factory):
    """The split job, 3 steps, run by the driver in this process: the record of its first
    actor update and its metrics (the uninterrupted reference of the lost-node test)."""
    from megarlhf.config import load_config
    from unit._inputs import write_config

    tmp = tmp_path_factory.mktemp("split")
    cfg = write_config(str(tmp / "split.yaml"), _split(inputs, tmp / "out", **SPLIT_STEPS))
    t = _recording_trainer(load_config(cfg))
    t.run()
    return t.record, _metrics(str(tmp / "out"))


SPLIT_STEPS = {"train.steps": 3}


def test_split_grpo_step_on_two_nodes_matches_single_process(split_run, inputs):
    """If this fails, a GRPO step whose roles sit on different nodes (actor on one, reference
    and rollout on the other) differs from the one-process engine, or its ranks do not land
    where `megarlhf plan` puts them."""
    rec, _ = split_run
    _check_ranks_follow_plan(rec)
    n0, n1 = rec["nodes"][0], rec["nodes"][1]
    assert {i.node_id for i in rec["ranks"]["actor"]} == {n0}
    assert {i.node_id for i in rec["ranks"]["reference"]} == {n1}
    assert {i.node_id for i in rec["ranks"]["rollout"]} == {n1}
    assert len({i.devices for i in rec["ranks"]["actor"]}) == 2  # a GPU per rank
    _check_against_oracle(rec, inputs["lm"])


def test_colocated_grpo_step_over_two_nodes_matches_single_process(cluster, inputs, tmp_path):
    """If this fails, a colocated GRPO step whose actor spans two nodes (TP inside a node, PP
    across nodes) differs from the one-process engine, or its ranks do not land as planned."""
    from megarlhf.config import load_config
    from unit._inputs import write_config

    cfg = write_config(str(tmp_path / "coloc.yaml"), _colocated(inputs, tmp_path / "coloc"))
    t = _recording_trainer(load_config(cfg))
    t.run()
    rec = t.record
    _check_ranks_follow_plan(rec)
    actor = rec["ranks"]["actor"]
    assert [(i.tp_rank, i.pp_rank) for i in actor] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert actor[0].node_id == actor[1].node_id != actor[2].node_id == actor[3].node_id
    [replica] = rec["ranks"]["rollout"]
    # Colocated: the replica shares rank 0's (fake) GPU on rank 0's node.
    assert (replica.node_id, replica.devices) == (actor[0].node_id, actor[0].devices)
    _check_against_oracle(rec, inputs["lm"])


# ------------------------------------------------------------------ a lost node
def _launch(cfg, log, *extra):
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    with open(log, "ab") as f:  # a file, not a pipe: a full pipe would block the run
        return subprocess.Popen([sys.executable, "-m", "megarlhf.cli", "train", "grpo", cfg,
                                 *extra], stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)


def _metrics(out):
    rows = {}
    with open(os.path.join(out, "tensorboard", "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            rows[r["step"]] = r  # the last occurrence of a step is the resumed run's
    return rows


def _node_of(cluster, node_id):
    for n in cluster.list_all_nodes():
        if n.node_id == node_id:
            return n
    raise AssertionError(f"no cluster node {node_id}")


def _bound_node(logical: int) -> str:
    """The Ray node a running job's placement groups of logical node ``logical`` are on."""
    from ray.util.placement_group import placement_group_table

    for pg in placement_group_table().values():
        if pg["name"].endswith(f"-n{logical}") and pg["state"] == "CREATED":
            return pg["bundles_to_node_id"][0]
    return ""


def test_lost_node_ends_the_run_and_resume_continues_exactly(cluster, inputs, split_run,
                                                             tmp_path):
    """If this fails, losing a node mid-run hangs the job, ends it without saying which node,
    roles, ranks and checkpoint, or a resume on a replacement node diverges from an
    uninterrupted run."""
    from unit._inputs import write_config

    _, ref = split_run  # the same job, uninterrupted
    over = {**SPLIT_STEPS, "checkpoint": {"save_every": 1, "keep_last": 3}}
    out = tmp_path / "lost"
    cfg = write_config(str(tmp_path / "lost.yaml"), _split(
        inputs, out, **over, **{"cluster.ray_address": cluster.address}))
    log = str(tmp_path / "lost.log")
    p = _launch(cfg, log)
    ckpt = out / "checkpoints"
    try:
        end = time.monotonic() + 600
        while not (ckpt / "step_000001" / "COMPLETE").exists():
            assert p.poll() is None, open(log).read()[-3000:]
            assert time.monotonic() < end, "step 1 was never saved"
            time.sleep(0.05)
        victim = _bound_node(1)  # reference rank 0 and rollout replica 0
        assert victim
        t0 = time.monotonic()
        cluster.remove_node(_node_of(cluster, victim), allow_graceful=False)
        code = p.wait(timeout=120)
        elapsed = time.monotonic() - t0
    finally:
        if p.poll() is None:
            os.killpg(p.pid, 9)
            p.wait()
    text = open(log).read()
    assert code == 1, text[-3000:]
    assert elapsed < 60, elapsed
    latest = (ckpt / "latest").read_text().strip()
    assert f"lost 1 Ray node" in text, text[-3000:]
    assert f"Ray node {victim[:8]} (" in text and "placement node n1): reference rank 0; " \
        "rollout replica 0" in text, text[-3000:]
    assert f"The last complete checkpoint is {ckpt / latest} (step {int(latest[-6:])})" in text
    assert "Traceback" not in text[text.index("lost 1 Ray node") - 200:]

    # A replacement node joins; --resume continues from the checkpoint, exactly.
    cluster.add_node(num_cpus=1, num_gpus=GPUS_PER_NODE)
    cluster.wait_for_nodes()
    p = _launch(cfg, log, "--resume")
    assert p.wait(timeout=600) == 0, open(log).read()[-3000:]
    text = open(log).read()
    assert f"resumed from {ckpt / latest}" in text
    got = _metrics(str(out))
    assert sorted(got) == sorted(ref)
    for step in sorted(ref):
        for k in DETERMINISTIC:
            if k in ref[step]:
                assert got[step][k] == pytest.approx(ref[step][k], rel=1e-6, abs=1e-9), \
                    (step, k, got[step][k], ref[step][k])


# ------------------------------------------------------------------ ray job submit
def test_ray_job_submit_with_a_runtime_env_runs_a_two_node_job(cluster, inputs, tmp_path):
    """If this fails, the README's `ray job submit` launch does not work: the entrypoint does
    not find the cluster, or the workers do not get the job's runtime environment."""
    from unit._inputs import sft_config, write_config

    out = tmp_path / "sft"
    job = sft_config(inputs, str(out), **{
        "cluster": {"num_nodes": 2, "gpus_per_node": 1, "device": "auto"},
        "actor.num_gpus": 2, "actor.micro_batch_size_per_rank": 2, "train.steps": 2})
    cfg = write_config(str(tmp_path / "sft.yaml"), job)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    runtime_env = {"working_dir": ROOT,
                   "excludes": [".git", ".venv", "tests", "docs", "outputs", "*.egg-info"],
                   "env_vars": {"PYTHONUNBUFFERED": "1"}}
    # The head's job agent registers a few seconds after the nodes: until then the dashboard
    # answers "No available agent to submit job, please try again later" (nothing ran).
    for attempt in range(12):
        r = _submit(cluster, runtime_env, cfg, env)
        if r.returncode == 0 or "No available agent" not in r.stdout + r.stderr:
            break
        time.sleep(5)
    text = r.stdout + r.stderr
    assert r.returncode == 0, text[-4000:]
    assert "succeeded" in text.lower(), text[-4000:]
    # The driver ran megarlhf from the job's working_dir (a copy Ray unpacked), not the repo.
    src = [line for line in text.splitlines() if line.startswith("megarlhf from")]
    assert src and not src[0].endswith(os.path.join(ROOT, "megarlhf")), src
    # Both ranks on worker nodes of their own (the head has no GPUs).
    assert "megarlhf: placement: n0 -> Ray node" in text and ", n1 -> Ray node" in text
    assert os.path.isdir(out / "hf") and glob.glob(str(out / "checkpoints" / "step_*"))


def _submit(cluster, runtime_env, cfg, env):
    """``ray job submit`` of a 2-step SFT job (the README's command), waiting for its end."""
    return subprocess.run(
        [sys.executable, "-m", "ray.scripts.scripts", "job", "submit",
         "--address", cluster.dashboard_url, "--runtime-env-json", json.dumps(runtime_env),
         "--", sys.executable, "-c",
         "import megarlhf, os, sys; print('megarlhf from', os.path.dirname(megarlhf.__file__));"
         "from megarlhf.cli import main; sys.exit(main(['train', 'sft', " + repr(cfg) + "]))"],
        env=env, capture_output=True, text=True, timeout=600)
