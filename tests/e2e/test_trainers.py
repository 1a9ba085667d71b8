"""The user-facing jobs end to end on CPU: the demo, PPO, online DPO, kill -9 and resume."""

import glob
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from _e2e_helpers import check_rl_step_metrics, read_metrics, set_dotted

pytestmark = pytest.mark.e2e

# Metrics every RL step must log (methods.md 2.5; names from megarlhf.observability).
STEP_METRICS = [
    "reward/raw_mean", "reward/raw_std", "reward/normalized_mean", "reward/accuracy",
    "policy/kl_ref", "policy/entropy", "policy/clip_frac", "policy/approx_kl",
    "policy/grad_norm", "policy/lr", "policy/response_length", "rollout/logprob_diff_max",
    "rollout/logprob_diff_mean", "rollout/truncated_frac", "perf/tokens_per_s",
    "perf/samples_per_s", "perf/weight_sync_gb_per_s", "time/generate", "time/reward",
    "time/logprob", "time/train", "time/weight_sync", "time/step",
]
# Deterministic on CPU (seeded sampling, deterministic kernels and gloo reductions).
DETERMINISTIC = ["reward/raw_mean", "reward/raw_std", "policy/kl_ref", "policy/entropy",
                 "policy/clip_frac", "policy/approx_kl", "policy/grad_norm",
                 "policy/response_length", "policy/pg_loss"]


def test_demo_rl_beats_sft(demo_run):
    """If this fails, the README's demo no longer shows RL improving the SFT policy."""
    s = demo_run["summary"]
    assert s["rl_accuracy"] - s["sft_accuracy"] >= 0.10, s
    assert 0.1 < s["sft_accuracy"] < 0.9, "SFT should reach partial accuracy"
    assert s["minutes"] < 15, s


def test_demo_keeps_library_output_in_its_log_files(demo_run):
    """If this fails, vLLM's, megatron's and Ray's messages flood the demo's console again
    (they belong in each stage's logs/), or a stage's workers wrote no log file."""
    grpo_logs = os.path.join(demo_run["dir"], "grpo", "logs")
    names = sorted(os.listdir(grpo_logs))
    assert {"driver.log", "actor-0.log", "actor-1.log", "rollout-0.log"} <= set(names), names
    with open(os.path.join(grpo_logs, "rollout-0.log"), errors="replace") as f:
        rollout = f.read()
    assert "vllm" in rollout.lower()  # vLLM's start-up output landed here, not on the console


def test_demo_output_is_all_megarlhfs_own(demo_run):
    """If this fails, `megarlhf demo --overwrite` on a finished demo refuses because megarlhf's
    own files (e.g. the tokenizer written next to an exported model) are not recorded as its
    own, so a rerun would need the user to delete the demo by hand."""
    from megarlhf.checkpoint.outputs import DEMO_FILES, DEMO_OUTPUTS, foreign_files

    assert foreign_files(demo_run["dir"], DEMO_OUTPUTS, DEMO_FILES) == []


def test_demo_logs_every_metric_to_tensorboard(demo_run):
    """If this fails, a metric of methods.md 2.5 (or a phase timing) is missing from the logs."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = read_metrics(os.path.join(demo_run["dir"], "grpo"))
    steps = [r for r in rows if r["step"] > 0]
    for name in STEP_METRICS:
        assert all(name in r for r in steps), f"{name} missing from some steps"
    assert any("eval/accuracy" in r for r in rows)
    events = glob.glob(os.path.join(demo_run["dir"], "grpo", "tensorboard", "events.*"))
    assert events
    acc = EventAccumulator(os.path.dirname(events[0]))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert set(STEP_METRICS) <= tags and "eval/accuracy" in tags
    assert len(acc.Scalars("reward/raw_mean")) == len(steps)
    sft_rows = read_metrics(os.path.join(demo_run["dir"], "sft"))
    assert sft_rows[-1]["sft/loss"] < sft_rows[0]["sft/loss"] / 3


def _rl_job(demo_run, out, kind, **over):
    """A short RL job on the demo task from the demo's SFT model."""
    job = yaml.safe_load(open(os.path.join(os.path.dirname(__import__("megarlhf.demo").demo
                                                          .__file__), "grpo.yaml")))
    job.update(kind=kind, output_dir=str(out))
    job["actor"]["model"]["hf_dir"] = demo_run["sft_hf"]
    job["data"].update(train_path=demo_run["prompts_train"],
                       eval_path=demo_run["prompts_heldout"])
    job["logging"] = {"progress_bar": False}
    set_dotted(job, over)
    path = os.path.join(str(out) + ".yaml")
    with open(path, "w") as f:
        yaml.safe_dump(job, f)
    return path


# Tests other than the demo run the actor at TP1: every run pays for its workers' start (the
# suite's time), and what they test (an algorithm, resume) does not depend on the layout.
TP1 = {"actor.parallel.tp": 1, "actor.num_gpus": 1}


def _reward_gain(rows, k):
    r = [x["reward/raw_mean"] for x in rows if "reward/raw_mean" in x]
    return sum(r[-k:]) / k - sum(r[:k]) / k


# GAE with the KL penalty in the reward (k3): the PPO path of every estimator option.
PPO_ALGO = {"advantage_estimator": "gae", "gamma": 1.0, "lam": 0.95, "whiten_advantages": True,
            "track_kl": True, "kl_in_reward": True, "kl_coef": 0.05, "kl_estimator": "k3"}


def test_ppo_raises_verifier_reward(demo_run, tmp_path):
    """If this fails, PPO (critic, GAE with the KL in the reward, clipped losses) does not learn
    on the demo task, or logs a metric that cannot be right."""
    from megarlhf.config import load_config
    from megarlhf.controller.rl import train_rl

    cfg = _rl_job(demo_run, tmp_path / "ppo", "ppo", **{
        **TP1,  # the demo covers the actor at TP2
        "critic": {"parallel": {"pp": 2}, "num_gpus": 2, "micro_batch_size_per_rank": 128,
                   "optimizer": {"lr": 1.0e-3}},
        "algorithm": PPO_ALGO,
        "train": {"steps": 24, "eval_every": 24, "eval_prompts": 200}})
    hist = train_rl(load_config(cfg))
    (s0, a0), (s1, a1) = hist["eval"][0], hist["eval"][-1]
    rows = read_metrics(str(tmp_path / "ppo"))
    assert a1 > a0 + 0.03, hist["eval"]
    assert _reward_gain(rows, 8) > 0.02
    check_rl_step_metrics([r for r in rows if r["step"] > 0], PPO_ALGO, kind="ppo")


def test_online_dpo_raises_verifier_reward(demo_run, tmp_path):
    """If this fails, online DPO (best/worst pairs vs the reference) does not learn."""
    from megarlhf.config import load_config
    from megarlhf.controller.rl import train_rl

    cfg = _rl_job(demo_run, tmp_path / "dpo", "dpo", **{
        **TP1, "actor.micro_batch_size_per_rank": 64, "actor.optimizer.lr": 4.0e-4,
        "algorithm": {"dpo_beta": 0.1}, "train": {"steps": 30, "eval_every": 30}})
    train_rl(load_config(cfg))
    rows = read_metrics(str(tmp_path / "dpo"))
    assert _reward_gain(rows, 10) > 0.015
    assert all("dpo/reward_accuracy" in r for r in rows if r["step"] > 0)


# ---------------------------------------------------------------- kill -9 and resume
def _launch(cfg, *extra):
    """``megarlhf train grpo CFG`` in a process of its own, joining this process's Ray cluster
    (started by the runs before it) as a job would join a cluster's: a local cluster per launch
    costs its start-up (GCS, raylet, dashboard: seconds of 2 busy cores) each time."""
    import ray

    env = dict(os.environ)
    if ray.is_initialized():
        env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    log = open(cfg + ".log", "ab")  # a file, not a pipe: a full pipe would block the run
    p = subprocess.Popen([sys.executable, "-m", "megarlhf.cli", "train", "grpo", cfg, *extra],
                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    p.log_path = cfg + ".log"
    return p


def _tail(p):
    with open(p.log_path, "rb") as f:
        return f.read().decode(errors="replace")[-3000:]


def _kill_tree(p):
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait(timeout=60)


def _wait_for(pred, proc, timeout):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early:\n{_tail(proc)}")
        time.sleep(0.01)
    raise AssertionError("timed out")


def test_sigterm_kill9_and_resume_continue_exactly(demo_run, tmp_path):
    """If this fails, SIGTERM does not stop cleanly with a checkpoint, a kill -9 during a save
    corrupts the latest checkpoint, or a resumed run diverges from an uninterrupted one (GRPO
    with token TIS; or GRPO with ``tis_cap`` logs a metric that cannot be right)."""
    over = {"train": {"steps": 6, "eval_every": 0},
            "batch": {"rollout_prompts_global": 16, "train_prompts_global": 16,
                      "n_samples_per_prompt": 4},
            **TP1, "actor.micro_batch_size_per_rank": 64,
            "algorithm.track_kl": False,  # one actor worker and the engine: 4 runs start
            "algorithm.tis_cap": 2.0}  # GRPO with token TIS (its metrics checked below)
    ref_cfg = _rl_job(demo_run, tmp_path / "ref", "grpo", **over)
    from megarlhf.config import load_config
    from megarlhf.controller.rl import train_rl

    train_rl(load_config(ref_cfg))
    ref = {r["step"]: r for r in read_metrics(str(tmp_path / "ref"))}
    check_rl_step_metrics([r for s, r in sorted(ref.items()) if s > 0],
                          {"track_kl": False, "tis_cap": 2.0})

    out = tmp_path / "crash"
    cfg = _rl_job(demo_run, out, "grpo", **over, checkpoint={"save_every": 1, "keep_last": 3})
    ckpt = out / "checkpoints"
    metrics = out / "tensorboard" / "metrics.jsonl"

    # 1) SIGTERM in the middle of training: the run saves at the end of the step and exits 0.
    p = _launch(cfg)
    _wait_for(lambda: (ckpt / "step_000002" / "COMPLETE").exists(), p, 600)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=300) == 0, _tail(p)
    stopped = (ckpt / "latest").read_text().strip()
    assert (ckpt / stopped / "COMPLETE").exists() and int(stopped[-6:]) < 6

    # 2) resume, then kill -9 while a checkpoint is being written.
    p = _launch(cfg, "--resume")

    def saving():
        for d in glob.glob(str(ckpt / "step_*")):
            if int(d[-6:]) >= 4 and not os.path.exists(os.path.join(d, "COMPLETE")) \
                    and glob.glob(os.path.join(d, "*", "*")):
                return True
        return False

    _wait_for(saving, p, 600)
    _kill_tree(p)
    partial = [d for d in glob.glob(str(ckpt / "step_*"))
               if not os.path.exists(os.path.join(d, "COMPLETE"))]
    assert partial, "the kill did not land inside a save"
    latest = (ckpt / "latest").read_text().strip()
    assert (ckpt / latest / "COMPLETE").exists()
    assert int(latest[-6:]) < max(int(d[-6:]) for d in partial)

    # 3) resume from the last complete checkpoint and finish.
    p = _launch(cfg, "--resume")
    assert p.wait(timeout=900) == 0, _tail(p)
    got: dict[int, dict] = {}
    for r in read_metrics(str(out)):
        got[r["step"]] = r  # the last occurrence of a step is the resumed run's
    assert sorted(got) == sorted(ref)
    for step in sorted(ref):
        for k in DETERMINISTIC:
            if k in ref[step]:
                assert got[step][k] == pytest.approx(ref[step][k], rel=1e-6, abs=1e-9), \
                    (step, k, got[step][k], ref[step][k])
