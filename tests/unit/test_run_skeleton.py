"""The run skeleton every trainer shares (megarlhf.controller.run.Trainer), without Ray: a fake
cluster whose roles record the saves, a trainer whose step can raise SIGTERM."""

import os
import signal

import pytest

from megarlhf.checkpoint.training import CheckpointDir
from megarlhf.config import JobConfig, from_dict
from megarlhf.controller import run as run_mod
from megarlhf.models.tiny import tiny_arch

pytestmark = pytest.mark.unit


class FakeGroup:
    """A role: ``execute(fn, *args)`` stands in for running ``fn`` on every rank."""

    def __init__(self, log):
        self.log = log

    def execute(self, fn, *args):
        name = fn.__name__
        if name == "save_role_state":
            step_dir, role = args
            os.makedirs(os.path.join(step_dir, role, "model"))  # where a role's weights go
            self.log.append(("save", os.path.basename(step_dir)))
        elif name == "load_role_state":
            self.log.append(("load", os.path.basename(args[0])))
        elif name == "export_role_hf":
            os.makedirs(args[0], exist_ok=True)
            open(os.path.join(args[0], "tokenizer_config.json"), "w").close()
            self.log.append(("export", args[0]))
        else:
            raise AssertionError(name)


class FakeCluster(dict):
    def describe(self):
        return "n0 -> this process"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


class FakeTokenizer:
    pad_id = 0


class CountingTrainer(run_mod.Trainer):
    """Counts steps; asks to stop with a real SIGTERM during step ``sigterm_at``."""

    desc = "fake"

    def __init__(self, job, sigterm_at=None):
        super().__init__(job)
        self.log: list = []
        self.sigterm_at = sigterm_at
        self.done = 0

    def open_cluster(self):
        return FakeCluster(actor=FakeGroup(self.log))

    def step(self, cl, step):
        if step == self.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)  # the session's handler asks to stop
        self.done += 1
        return {"fake/step": float(step)}

    def state_dict(self):
        return {"done": self.done}

    def load_state_dict(self, state):
        self.done = state["done"]


@pytest.fixture(autouse=True)
def no_resume_file_checks(monkeypatch):
    """The fake roles write no megatron checkpoint files; the checks of a resume pointer's files
    (megarlhf.checkpoint.outputs.resume_errors) have tests of their own."""
    import megarlhf.checkpoint.outputs as outputs

    monkeypatch.setattr(outputs, "resume_errors", lambda job: [])


def _job(tmp_path, **ckpt):
    return from_dict(JobConfig, {
        "kind": "sft", "output_dir": str(tmp_path / "run"),
        "cluster": {"num_nodes": 1, "gpus_per_node": 1, "device": "cpu"},
        "actor": {"model": {"arch": tiny_arch("llama", num_layers=2)}, "num_gpus": 1},
        "train": {"steps": 5, "global_batch_size": 2},
        "checkpoint": {"save_every": 0, **ckpt},
        "logging": {"tensorboard": False, "progress_bar": False},
    })


@pytest.fixture(autouse=True)
def _no_tokenizer(monkeypatch):
    monkeypatch.setattr(run_mod, "load_job_tokenizer", lambda job: FakeTokenizer())


def _saves(log):
    return [s for kind, s in log if kind == "save"]


def test_sigterm_at_a_step_without_a_due_save_saves_that_step_once(tmp_path):
    """If this fails, SIGTERM at a step with no save due saves the step twice - and the second
    save deletes the directory `latest` points to - or does not save it at all."""
    job = _job(tmp_path)
    t = CountingTrainer(job, sigterm_at=1)
    before = signal.getsignal(signal.SIGTERM)
    out = t.run()
    assert signal.getsignal(signal.SIGTERM) is before  # the session restored the handler
    assert _saves(t.log) == ["step_000002"]
    ckpt = CheckpointDir(os.path.join(job.output_dir, "checkpoints"), keep_last=3)
    latest = ckpt.latest_step_dir()  # raises if `latest` points at a missing/incomplete save
    assert latest == ckpt.step_dir(2)
    assert ckpt.read_driver_state(latest)["done"] == 2
    assert out["step"] == 2 and "hf_dir" not in out  # stopped early: no export


@pytest.mark.parametrize("save_every,saves", [(0, ["step_000005"]),
                                              (2, ["step_000002", "step_000004", "step_000005"]),
                                              (5, ["step_000005"])])
def test_one_save_per_step_when_due_and_at_the_end(tmp_path, save_every, saves):
    """If this fails, a step is saved twice (due and final) or a due save is skipped."""
    t = CountingTrainer(_job(tmp_path, save_every=save_every))
    out = t.run()
    assert _saves(t.log) == saves
    assert out["hf_dir"].endswith("hf") and ("export", out["hf_dir"]) in t.log


def test_sigterm_on_a_due_step_saves_once_and_resume_continues(tmp_path):
    """If this fails, a stop on a step whose save is due saves it twice, or a resumed run does
    not continue from the saved step and state (or saves the resumed step again)."""
    job = _job(tmp_path, save_every=2)
    t = CountingTrainer(job, sigterm_at=3)
    t.run()
    assert _saves(t.log) == ["step_000002", "step_000004"]
    resumed = CountingTrainer(_job(tmp_path, save_every=2, resume=True))
    out = resumed.run()
    assert resumed.log[0] == ("load", "step_000004")
    assert _saves(resumed.log) == ["step_000005"]
    assert resumed.done == 5 and out["step"] == 5
    # A finished run resumed again: nothing to train, nothing saved, the export redone.
    again = CountingTrainer(_job(tmp_path, save_every=2, resume=True))
    again.run()
    assert _saves(again.log) == [] and again.done == 5


class NodeLossCluster(FakeCluster):
    """Ray node "deadbeef..." held actor ranks 2-3 and rollout replica 1; it is reported lost."""

    lost = ["deadbeef00112233"]

    def lost_nodes(self, wait_s=0.0):
        self.waited = wait_s
        return list(self.lost)

    def node_lost_error(self, lost, *, during, resume_hint):
        from megarlhf.controller.cluster import node_lost_error
        from megarlhf.planning.placement import NodeSlots

        held = {"deadbeef00112233": {"actor": [3, 2], "rollout": [1]},
                "cafe": {"actor": [0, 1], "rollout": [0]}}
        nodes = {0: NodeSlots("cafe", "10.0.0.1", 2, 0),
                 1: NodeSlots("deadbeef00112233", "10.0.0.2", 2, 0)}
        return node_lost_error(lost, held, nodes, during=during, resume_hint=resume_hint)


class DyingTrainer(CountingTrainer):
    """A rank dies in step ``die_at`` (0-based), as when its node goes away."""

    def __init__(self, job, die_at, lost=True):
        super().__init__(job)
        self.die_at = die_at
        self.cluster = NodeLossCluster(actor=FakeGroup(self.log))
        if not lost:
            self.cluster.lost = []

    def open_cluster(self):
        return self.cluster

    def step(self, cl, step):
        from megarlhf.workers import WorkerDiedError

        if step == self.die_at:
            raise WorkerDiedError("actor rank 2 died during train() after 1.0 s", role="actor",
                                  ranks=[2], method="train")
        return super().step(cl, step)


def test_lost_node_ends_the_run_naming_node_roles_ranks_and_checkpoint(tmp_path):
    """If this fails, a lost node ends a run with one role's 'rank died' (or a hang) instead of
    the node, everything it held, and the checkpoint to resume from."""
    from megarlhf.cli import user_error_code
    from megarlhf.controller.cluster import NodeLostError
    from megarlhf.workers import WorkerDiedError

    job = _job(tmp_path, save_every=2)
    t = DyingTrainer(job, die_at=3)
    with pytest.raises(NodeLostError) as e:
        t.run()
    msg = str(e.value)
    assert msg.startswith("lost 1 Ray node during step 4; the run stopped")
    assert "Ray node deadbeef (10.0.0.2, placement node n1): actor ranks 2-3; rollout " \
           "replica 1" in msg
    ckpt = os.path.join(job.output_dir, "checkpoints", "step_000002")
    assert f"The last complete checkpoint is {ckpt} (step 2)" in msg
    assert "megarlhf train sft CONFIG --resume" in msg
    assert e.value.nodes == ["deadbeef00112233"]
    assert e.value.held == {"deadbeef00112233": {"actor": [3, 2], "rollout": [1]}}
    assert isinstance(e.value.__cause__, WorkerDiedError)
    assert t.cluster.waited == run_mod.NODE_VERDICT_S  # a dead rank: wait for Ray's verdict
    assert user_error_code(e.value) == 1  # the CLI prints it without a traceback, exit 1

    # Before any checkpoint: a restart begins at step 0, and says so.
    t = DyingTrainer(_job(tmp_path / "b", save_every=0), die_at=0)
    with pytest.raises(NodeLostError, match="No complete checkpoint yet .* a restart begins "
                                            "at step 0"):
        t.run()

    # A rank that died on a node that is still there: the worker's own error, unchanged.
    t = DyingTrainer(_job(tmp_path / "c"), die_at=1, lost=False)
    with pytest.raises(WorkerDiedError, match="actor rank 2 died"):
        t.run()
