"""A NaN / infinite loss or grad norm stops the run: non-zero exit, no export, the last good
checkpoint kept (megarlhf/observability/divergence.py and its call in the SFT loop)."""

import math
import os
from types import SimpleNamespace

import pytest

from _inputs import make_inputs, sft_config, snapshot, write_config
from megarlhf.observability.divergence import DivergenceError, check_finite, non_finite

pytestmark = pytest.mark.unit


def test_only_losses_and_grad_norms_are_watched():
    """If this fails, a NaN loss passes, or a harmless NaN metric (an AUC without positives)
    stops a healthy run."""
    nan, inf = float("nan"), float("inf")
    assert non_finite({"sft/loss": 1.0, "sft/grad_norm": 2.0}) == {}
    assert set(non_finite({"policy/pg_loss": nan, "critic/value_loss": 1.0,
                           "critic/grad_norm": inf, "rm/eval_binary_auc": nan,
                           "perf/tokens_per_s": inf})) == {"policy/pg_loss", "critic/grad_norm"}
    with pytest.raises(DivergenceError) as e:
        check_finite({"policy/grad_norm": inf}, step=7, lr_settings="actor.optimizer.lr")
    msg = str(e.value)
    assert "at step 7" in msg and "policy/grad_norm = inf" in msg and "actor.optimizer.lr" in msg
    assert "no checkpoint had been saved" in msg


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(str(tmp_path_factory.mktemp("inputs")))


class _FakeActor:
    """The actor group of a Cluster: ``train`` returns the scripted losses; saves create the
    role directory (the driver then writes driver_state, COMPLETE and latest itself)."""

    def __init__(self, losses):
        self.losses = list(losses)
        self.calls = []

    def train(self, batch, spec):
        return SimpleNamespace(metrics={"loss": self.losses.pop(0)}, grad_norm=0.5, lr=1e-3)

    def execute(self, fn, *args, **kwargs):
        self.calls.append(fn.__name__)
        if fn.__name__ == "save_role_state":
            step_dir, role = args
            os.makedirs(os.path.join(step_dir, role, "model"), exist_ok=True)


def _fake_cluster(actor):
    class FakeCluster:
        def __init__(self, job, **kwargs):
            pass

        def __getitem__(self, role):
            return actor

        def __contains__(self, role):
            return role == "actor"

        def describe(self):
            return "n0 -> this process (fake)"

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

    return FakeCluster


def test_nan_loss_stops_sft_without_saving_or_exporting(inputs, tmp_path, monkeypatch, capsys):
    """If this fails, a diverged SFT run saves and exports NaN weights with exit 0, or its last
    good checkpoint is lost."""
    import megarlhf.controller.run as run
    from megarlhf.cli import main

    actor = _FakeActor([2.0, 1.5, math.nan, 1.0])
    monkeypatch.setattr(run, "Cluster", _fake_cluster(actor))  # the run skeleton's cluster
    out = tmp_path / "run"
    cfg = write_config(str(tmp_path / "sft.yaml"), sft_config(
        inputs, str(out), **{"train.steps": 4, "checkpoint.save_every": 1}))
    before = snapshot(str(tmp_path), skip=(str(out),))
    assert main(["train", "sft", cfg]) == 1
    err = capsys.readouterr().err
    assert "training diverged at step 3" in err and "sft/loss = nan" in err
    assert "step_000002" in err and "Traceback" not in err
    ck = out / "checkpoints"
    assert (ck / "latest").read_text() == "step_000002"
    assert not (ck / "step_000003").exists()  # the broken step was never saved
    assert not (out / "hf").exists() and "export_role_hf" not in actor.calls
    assert snapshot(str(tmp_path), skip=(str(out),)) == before
