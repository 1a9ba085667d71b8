"""``megarlhf study``: sweep expansion, validation messages, resume after a kill, aggregation,
the nine findings' verdicts on synthetic metrics, the report and plot, and the shipped study
files (examples/studies/). Jobs are faked here (a launcher that writes what a job writes);
tests/e2e/test_study_end_to_end.py runs a tiny real study."""

import glob
import json
import os
import shlex

import pytest
import yaml

from megarlhf.checkpoint.atomic import mark_complete, read_complete
from megarlhf.study import stats
from megarlhf.study.aggregate import JobData, RunData, collect, read_job
from megarlhf.study.findings import FINDINGS
from megarlhf.study.runner import RayJobLauncher, job_entry, run_study
from megarlhf.study.spec import Factor, StudyError, load_study
from megarlhf.study.sweep import expand, validate_plan

pytestmark = pytest.mark.unit

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STUDIES = os.path.join(ROOT, "examples", "studies")
BASE = os.path.join(STUDIES, "_base")


def _study(tmp_path, **over) -> str:
    """A responses-per-prompt study on the shipped miniature configs: data -> sft -> rl."""
    doc = {
        "study": "responses_per_prompt",
        "output_dir": str(tmp_path / "out"),
        "jobs": {
            "data": {"builtin": "demo-data", "params": {"n_train": 50, "tokenizer": False}},
            "sft": {"command": "train sft", "config": os.path.join(BASE, "mini_sft.yaml"),
                    "seeded": False,
                    "overrides": ["data.train_path=${data}/sft_train.jsonl",
                                  "actor.model.tokenizer=${data}/tokenizer.model"]},
            "rl": {"command": "train grpo", "config": os.path.join(BASE, "mini_grpo.yaml"),
                   "overrides": ["actor.model.hf_dir=${sft}/hf",
                                 "data.train_path=${data}/prompts_train.jsonl",
                                 "actor.micro_batch_size_per_rank=32"]},
        },
        "sweep": {"factors": {"rl.batch.n_samples_per_prompt": [1, 4, 16]}, "seeds": [1, 2]},
    }
    for k, v in over.items():
        node = doc
        parts = k.split(".")
        for p in parts[:-1]:
            node = node[p]
        if v is None:
            node.pop(parts[-1], None)
        else:
            node[parts[-1]] = v
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(path)


# ------------------------------------------------------------------------------ expansion
def test_expansion_shares_unseeded_jobs_and_names_each_run(tmp_path):
    """If this fails, a sweep runs the wrong set of jobs: shared SFT/data jobs run once per run
    (wasting the budget), or runs of different N/seed write into one directory."""
    plan = expand(load_study(_study(tmp_path)))
    assert len(plan.runs) == 6  # 3 values x 2 seeds
    keys = list(plan.instances)
    assert keys[:2] == ["data/base", "sft/base"]  # unseeded, no factor: once per study
    rl = [k for k in keys if k.startswith("rl/")]
    assert rl == [f"rl/n_samples_per_prompt-{n}+seed-{s}" for n in (1, 4, 16) for s in (1, 2)]
    inst = plan.instances["rl/n_samples_per_prompt-4+seed-2"]
    sft_dir = plan.instances["sft/base"].out_dir
    assert f"actor.model.hf_dir={sft_dir}/hf" in inst.overrides
    assert "batch.n_samples_per_prompt=4" in inst.overrides and "seed=2" in inst.overrides
    assert inst.out_dir == os.path.join(str(tmp_path / "out"), "jobs", "rl",
                                        "n_samples_per_prompt-4+seed-2")
    assert inst.deps == ["data/base", "sft/base"]
    argv = inst.argv()
    assert argv[:3] == ["train", "grpo", os.path.join(BASE, "mini_grpo.yaml")]
    assert f"output_dir={inst.out_dir}" in argv and argv[-1] == "--resume"
    assert all(r.jobs["sft"] == "sft/base" for r in plan.runs)


def test_factor_on_an_upstream_job_splits_its_downstream_jobs(tmp_path):
    """If this fails, a factor swept on an upstream job (the SFT model's size) would feed one
    downstream RL job for all its values: the sweep would compare a run with itself."""
    path = _study(tmp_path, **{"study": "policy_size", "sweep.factors": {
        "sft.actor.model.arch.hidden_size": [64, 128]}, "sweep.seeds": [1, 2, 3]})
    plan = expand(load_study(path))
    assert [k for k in plan.instances if k.startswith("sft/")] == [
        "sft/hidden_size-64", "sft/hidden_size-128"]
    rl = plan.instances["rl/hidden_size-128+seed-3"]
    assert rl.deps == ["data/base", "sft/hidden_size-128"]
    assert any(o.endswith("/jobs/sft/hidden_size-128/hf") for o in rl.overrides)
    assert len(plan.runs) == 6 and len(plan.instances) == 1 + 2 + 6


def test_two_factors_and_variants_expand_to_the_cartesian_product(tmp_path):
    """If this fails, a two-factor sweep (algorithm x staleness) misses combinations, or a
    variant's settings are not applied together."""
    path = _study(tmp_path, **{"study": "staleness", "jobs.rl.command": "train",
                               "sweep.factors": {
        "rl.method": {"grpo": {"kind": "grpo"},
                      "dpo": {"kind": "dpo", "algorithm.dpo_beta": 0.1}},
        "rl.asynchronous.max_staleness": [0, 2]}, "sweep.seeds": [7]})
    plan = expand(load_study(path))
    assert [r.point for r in plan.runs] == [
        {"rl.method": m, "rl.asynchronous.max_staleness": k}
        for m in ("grpo", "dpo") for k in (0, 2)]
    dpo = plan.instances["rl/method-dpo+max_staleness-2+seed-7"]
    assert {"kind=dpo", "algorithm.dpo_beta=0.1", "asynchronous.max_staleness=2",
            "seed=7"} <= set(dpo.overrides)
    validate_plan(plan)
    assert dpo.argv()[:2] == ["train", "dpo"]  # what the CLI's kind check compares


def test_command_line_overrides_reach_jobs_and_study_settings(tmp_path):
    """If this fails, `megarlhf study FILE rl.train.steps=5 sweep.seeds=[3]` is ignored or
    applied to the wrong place."""
    spec = load_study(_study(tmp_path), ["rl.train.steps=5", "sweep.seeds=[3]",
                                         f"output_dir={tmp_path / 'elsewhere'}"])
    assert spec.seeds == [3] and spec.output_dir == str(tmp_path / "elsewhere")
    assert spec.jobs["rl"].overrides[-1] == "train.steps=5"


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("over, words", [
    ({"sweep.factors": {"rl.batch.n_sample_per_prompt": [1, 4]}},
     ["rl.batch.n_sample_per_prompt", "n_samples_per_prompt"]),
    ({"sweep.factors": {"rl.batch.n_samples_per_prompt": ["four", 8]}},
     ["n_samples_per_prompt", "expected an integer", "'four'"]),
    ({"sweep.factors": {"rl.batch.n_samples_per_prompt": []}}, ["the sweep is empty"]),
    ({"sweep.factors": {}, "sweep.seeds": [1]}, ["the sweep is empty"]),
    ({"sweep": None}, ["the sweep is empty"]),
    ({"sweep.seeds": []}, ["the sweep is empty"]),
    ({"sweep.factors": {"policy.batch.n_samples_per_prompt": [1, 4, 16]}},
     ["policy.batch.n_samples_per_prompt", "data, sft, rl"]),
    ({"sweep.factors": {"rl.rollout.engine": ["vllm", "tensorrt"]}},
     ["rollout.engine", "'tensorrt'"]),
    ({"study": "bigger_is_better"}, ["bigger_is_better", "responses_per_prompt"]),
    ({"jobs.rl.overrides": ["actor.model.hf_dir=${sfft}/hf"]}, ["${sfft}", "names no job"]),
    ({"jobs.samples": {"builtin": "policy-samples", "seeded": False, "params": {
        "policy": "${sft}/hf", "prompts": "${data}/prompts_train.jsonl", "n_per_prompt": 1}}},
     ["samples", "n_per_prompt must be >= 2"]),
])
def test_bad_study_gets_one_message_naming_the_setting(tmp_path, capsys, over, words):
    """If this fails, a study with a nonexistent key, a wrongly typed value or an empty sweep
    starts (and fails later, or silently sweeps nothing) instead of one message up front."""
    from megarlhf.cli import main

    path = _study(tmp_path, **over)
    assert main(["study", path, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("megarlhf study: error: ") and "Traceback" not in err
    for w in words:
        assert w in err, err
    assert not os.path.exists(tmp_path / "out"), "nothing is written before the study is valid"


def test_invalid_job_config_is_found_before_anything_runs(tmp_path, capsys):
    """If this fails, a sweep value that makes one run's config invalid (a micro-batch of 48
    does not divide the batch of 128 sequences) is found only when that run starts, after the
    others spent their time."""
    from megarlhf.cli import main

    path = _study(tmp_path, **{"study": "custom", "analysis": {"job": "rl"},
                               "sweep.factors": {"rl.actor.micro_batch_size_per_rank": [32, 48]}})
    assert main(["study", path, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "nothing was started" in err and "micro_batch_size_per_rank" in err
    assert "rl/micro_batch_size_per_rank-48+seed-1 and 1 more" in err
    assert not os.path.exists(tmp_path / "out")


def test_models_an_earlier_job_will_produce_validate_with_its_architecture(tmp_path):
    """If this fails, a study whose RL job reads the SFT job's future hf/ cannot be validated
    before the SFT runs (or is validated against nothing)."""
    plan = expand(load_study(_study(tmp_path)))
    validate_plan(plan)
    rl = plan.instances["rl/n_samples_per_prompt-1+seed-1"]
    assert rl.kind == "grpo" and rl.arch["hidden_size"] == 64


# ------------------------------------------------------------------------------ fake jobs
def _rows(n: int, value: float):
    return [{"step": 0, "eval/accuracy": 0.5}] + [
        {"step": s, "reward/raw_mean": value, "eval/accuracy": value} for s in range(1, n + 1)]


ARCH = yaml.safe_load(open(os.path.join(BASE, "mini_sft.yaml")))["actor"]["model"]["arch"]


def _entry_inputs(entry):
    """The ``--inputs`` record the runner hands a job (study.job writes it to COMPLETE.json)."""
    return json.loads(entry[entry.index("--inputs") + 1]) if "--inputs" in entry else None


def _write_job(out_dir: str, command, rows=(), complete=True, inputs=None):
    """What a job leaves behind: metrics, the HF export (its config.json), COMPLETE.json (as
    study.job does)."""
    os.makedirs(os.path.join(out_dir, "tensorboard"), exist_ok=True)
    with open(os.path.join(out_dir, "tensorboard", "metrics.jsonl"), "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    if complete:
        os.makedirs(os.path.join(out_dir, "hf"), exist_ok=True)
        open(os.path.join(out_dir, "hf", "config.json"), "w").write(json.dumps(ARCH))
        mark_complete(out_dir, {"command": command, "seconds": 1.0,
                                **({"inputs": inputs} if inputs is not None else {})})


class FakeLauncher:
    """Runs a job by writing its outputs at once (N = value of the sweep -> accuracy);
    ``fail_after`` raises KeyboardInterrupt (a kill) when that many jobs have started."""

    concurrency = 1

    def __init__(self, fail_after=None):
        self.started, self.fail_after = [], fail_after

    def start(self, inst, entry, log_path):
        if self.fail_after is not None and len(self.started) >= self.fail_after:
            raise KeyboardInterrupt
        self.started.append(inst.key)
        assert entry[:2] == ["--out", inst.out_dir]
        cmd = ["builtin", inst.job.builtin] if inst.job.builtin else inst.argv()
        n = inst.point.get("rl.batch.n_samples_per_prompt", 1)
        _write_job(inst.out_dir, cmd, _rows(3, 0.5 + 0.01 * n + 0.001 * (inst.seed or 0)),
                   inputs=_entry_inputs(entry))
        return inst.key

    def poll(self, handle):
        return 0

    def stop(self, handle):
        pass


def test_killed_sweep_resumes_without_rerunning_finished_jobs(tmp_path):
    """If this fails, running a study again after a kill -9 reruns finished jobs (hours on a
    cluster) or skips a half-written one (its run would be analysed from partial metrics)."""
    plan = expand(load_study(_study(tmp_path)))
    validate_plan(plan)
    first = FakeLauncher(fail_after=4)  # data, sft, 2 RL jobs; then the runner is killed
    with pytest.raises(KeyboardInterrupt):
        run_study(plan, first, progress=False, poll_s=0)
    # One more job was half-written when the kill came: metrics, no COMPLETE.json.
    half = plan.instances["rl/n_samples_per_prompt-4+seed-1"]
    _write_job(half.out_dir, half.argv(), [{"step": 1, "reward/raw_mean": 0.1}], complete=False)
    again = FakeLauncher()
    out = run_study(plan, again, progress=False, poll_s=0)
    assert again.started == [k for k in plan.instances if k not in first.started]
    assert half.key in again.started
    assert sorted(out.skipped) == sorted(first.started)
    assert not out.failed and out.results["runs_complete"] == 6
    # The resumed half-written job logged step 1 twice: the later row wins.
    assert read_job(half.out_dir).series("reward/raw_mean")[0][1] != 0.1
    third = FakeLauncher()
    assert run_study(plan, third, progress=False, poll_s=0).ran == [] and third.started == []


def test_a_job_completed_with_other_settings_is_refused_not_overwritten(tmp_path):
    """If this fails, editing a study (more steps) and running it again silently mixes old
    results into the new analysis, or destroys them."""
    plan = expand(load_study(_study(tmp_path)))
    run_study(plan, FakeLauncher(), progress=False, poll_s=0, report=False)
    plan2 = expand(load_study(_study(tmp_path), ["rl.train.steps=5"]))
    with pytest.raises(StudyError, match="completed with .*train.steps=5"):
        run_study(plan2, FakeLauncher(), progress=False, poll_s=0)


def test_a_job_whose_inputs_changed_is_refused_not_reused(tmp_path):
    """If this fails (issue 30), a study run again after its config file or a builtin's
    parameters changed silently reuses the jobs completed with the old ones, or a job that
    read an upstream job which has run again since."""
    import shutil

    cfg = tmp_path / "sft.yaml"
    shutil.copy(os.path.join(BASE, "mini_sft.yaml"), cfg)
    path = _study(tmp_path, **{"jobs.sft.config": str(cfg)})
    plan = expand(load_study(path))
    run_study(plan, FakeLauncher(), progress=False, poll_s=0, report=False)
    again = FakeLauncher()
    run_study(expand(load_study(path)), again, progress=False, poll_s=0, report=False)
    assert again.started == []  # nothing changed: everything is reused
    # The config file changes under the same path.
    cfg.write_text(cfg.read_text().replace("steps:", "steps: 7\n  #", 1))
    with pytest.raises(StudyError, match="another version of its config"):
        run_study(expand(load_study(path)), FakeLauncher(), progress=False, poll_s=0)
    shutil.copy(os.path.join(BASE, "mini_sft.yaml"), cfg)
    # A builtin's parameter changes (the command line of a builtin is only its name).
    changed = _study(tmp_path, **{"jobs.sft.config": str(cfg),
                                  "jobs.data.params": {"n_train": 60, "tokenizer": False}})
    with pytest.raises(StudyError, match="completed with params"):
        run_study(expand(load_study(changed)), FakeLauncher(), progress=False, poll_s=0)
    # The user moves the sft job away (as the message says): it reruns, and the RL jobs that
    # read the old one are refused rather than analysed over the new one.
    shutil.rmtree(plan.instances["sft/base"].out_dir)
    with pytest.raises(StudyError, match="sft/base, which ran again"):
        run_study(expand(load_study(path)), FakeLauncher(), progress=False, poll_s=0)


def test_failed_job_blocks_only_its_own_run(tmp_path):
    """If this fails, one crashed run (exit code 1) either stops the whole sweep or lets the
    jobs that read its output start on nothing."""
    spec = load_study(_study(tmp_path, **{"study": "policy_size", "sweep.factors": {
        "sft.actor.model.arch.hidden_size": [64, 128]}, "sweep.seeds": [1, 2]}))
    plan = expand(spec)

    class Failing(FakeLauncher):
        def start(self, inst, entry, log_path):
            self.started.append(inst.key)
            if inst.key == "sft/hidden_size-64":
                return "fail"
            cmd = ["builtin", inst.job.builtin] if inst.job.builtin else inst.argv()
            _write_job(inst.out_dir, cmd, _rows(2, 0.5), inputs=_entry_inputs(entry))
            return inst.key

        def poll(self, handle):
            return 1 if handle == "fail" else 0

    out = run_study(plan, Failing(), progress=False, poll_s=0)
    assert "exit code 1" in out.failed["sft/hidden_size-64"]
    assert set(out.failed) == {"sft/hidden_size-64", "rl/hidden_size-64+seed-1",
                               "rl/hidden_size-64+seed-2"}
    assert "rl/hidden_size-128+seed-2" in out.ran
    assert out.results["runs_complete"] == 2 and out.results["runs_total"] == 4
    report = open(os.path.join(spec.output_dir, "results", "report.md")).read()
    assert "Not complete (2 runs)" in report and "Failed jobs" in report


def test_study_output_dir_of_someone_else_is_refused(tmp_path):
    """If this fails, `megarlhf study` writes into a directory holding a user's files."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.tex").write_text("x")
    plan = expand(load_study(_study(tmp_path)))
    with pytest.raises(StudyError, match="files megarlhf did not write"):
        run_study(plan, FakeLauncher(), progress=False, poll_s=0)


def test_job_wrapper_marks_complete_only_after_final_outputs(tmp_path):
    """If this fails, a job that stopped early (SIGTERM: exit 0 before the last step) counts as
    complete and its partial metrics are analysed; or a finished builtin is never marked."""
    from megarlhf.study import job

    d = str(tmp_path / "data")
    assert job.main(["--out", d, "--builtin", "demo-data", "--params",
                     json.dumps({"n_train": 20, "n_heldout": 5, "n_pairs": 4,
                                 "n_labelled": 4, "n_heldout_pairs": 2,
                                 "tokenizer": False})]) == 0
    info = read_complete(d)
    assert info["command"] == ["builtin", "demo-data"]
    assert os.path.isfile(os.path.join(d, "pairs_heldout.jsonl"))
    run = str(tmp_path / "run")
    os.makedirs(os.path.join(run, "tensorboard"))
    open(os.path.join(run, "tensorboard", "metrics.jsonl"), "w").write('{"step": 1}\n')
    assert job.final_outputs_missing(["train", "grpo", "c.yaml"], run) == [
        "hf/config.json (the run did not reach train.steps)"]
    assert job.final_outputs_missing(["eval", "bon", "c.yaml"], run) == ["bon.json"]


def test_policy_samples_builtin_labels_the_policys_own_samples(tmp_path, monkeypatch):
    """If this fails, the policy-samples builtin (RM data from the policy's own samples, for
    the reward-model studies) samples another model, with the wrong tokenizer or seed, or
    leaves no summary to mark the job complete with."""
    import megarlhf.controller.rm_data as rm_data
    from megarlhf.study import job

    seen = {}

    def fake(job_cfg, policy, prompts, out_dir, **kw):
        seen.update(job=job_cfg, policy=policy, prompts=prompts, **kw)
        for f in ("labelled.jsonl", "pairs.jsonl"):
            open(os.path.join(out_dir, f), "w").write("{}\n")
        return {"labelled": "l", "pairs": "p", "num_prompts": 3, "num_responses": 24,
                "num_pairs": 5, "accuracy": 0.5}

    monkeypatch.setattr(rm_data, "sample_and_label", fake)
    out = str(tmp_path / "samples")
    os.makedirs(out)
    assert job.main(["--out", out, "--builtin", "policy-samples", "--params", json.dumps(
        {"policy": "/m/hf", "prompts": "/d/p.jsonl", "tokenizer": "/d/tok.model",
         "n_per_prompt": 8, "num_prompts": 3, "step_label_rollouts": 2, "seed": 5})]) == 0
    assert seen["policy"] == "/m/hf" and seen["prompts"] == "/d/p.jsonl"
    assert seen["job"].actor.model.hf_dir == "/m/hf"
    assert seen["job"].actor.model.tokenizer == "/d/tok.model" and seen["job"].seed == 5
    assert seen["job"].rollout.engine == "vllm"  # the demo's rm.yaml lends the rollout
    assert (seen["n_per_prompt"], seen["num_prompts"], seen["step_label_rollouts"]) == (8, 3, 2)
    assert read_complete(out)["result"]["num_pairs"] == 5
    assert json.load(open(os.path.join(out, "summary.json")))["accuracy"] == 0.5


def test_local_launcher_runs_a_job_in_its_own_process(tmp_path):
    """If this fails, the local runner cannot start `python -m megarlhf.study.job` (the path
    every local study takes) or loses the job's output instead of logging it."""
    from megarlhf.study.runner import LocalLauncher

    path = _study(tmp_path, **{"jobs.sft": None, "jobs.rl": None, "study": "custom",
                               "analysis": {"job": "data", "metrics": ["x"]},
                               "sweep.factors": {"data.n_train": [20, 30]}, "sweep.seeds": None})
    spec = load_study(path)
    spec.jobs["data"].params.update(tokenizer=False, n_heldout=5, n_pairs=2, n_labelled=2,
                                    n_heldout_pairs=0)
    plan = expand(spec)
    out = run_study(plan, LocalLauncher(), progress=False, poll_s=0.1)
    assert out.ran == ["data/n_train-20", "data/n_train-30"] and not out.failed
    log = open(os.path.join(spec.output_dir, "logs", "data__n_train-30.log")).read()
    assert "megarlhf.study.job --out" in log


class FakeRayClient:
    """ray.job_submission.JobSubmissionClient's calls the runner makes; a job runs (in
    process, through the same entry point) when its status is first asked after submission."""

    def __init__(self):
        self.jobs, self.max_running = {}, 0

    def submit_job(self, entrypoint, runtime_env=None, metadata=None):
        sid = f"raysubmit_{len(self.jobs)}"
        self.jobs[sid] = {"entry": entrypoint, "status": "PENDING", "polls": 0}
        running = sum(j["status"] in ("PENDING", "RUNNING") for j in self.jobs.values())
        self.max_running = max(self.max_running, running)
        return sid

    def get_job_status(self, sid):
        from megarlhf.study import job

        j = self.jobs[sid]
        j["polls"] += 1
        if j["status"] == "PENDING":
            j["status"] = "RUNNING"
        elif j["status"] == "RUNNING" and j["polls"] >= 3:
            words = shlex.split(j["entry"])
            assert words[:3] == ["python", "-m", "megarlhf.study.job"]
            j["status"] = "SUCCEEDED" if job.main(words[3:]) == 0 else "FAILED"
        return j["status"]

    def get_job_logs(self, sid):
        return f"logs of {sid}\n"

    def stop_job(self, sid):
        self.jobs[sid]["status"] = "STOPPED"


def test_ray_launcher_submits_each_job_with_a_concurrency_limit(tmp_path):
    """If this fails, `megarlhf study --ray-address` submits more jobs at once than asked,
    starts a job before the job it reads from finished, or loses Ray's job logs."""
    path = _study(tmp_path, **{"jobs.sft": None, "jobs.rl": None, "study": "custom",
                               "analysis": {"job": "data", "metrics": ["x"]},
                               "sweep.factors": {"data.n_train": [20, 30, 40, 50, 60]},
                               "sweep.seeds": None})
    spec = load_study(path)
    spec.jobs["data"].params.update(tokenizer=False, n_heldout=5, n_pairs=2, n_labelled=2,
                                    n_heldout_pairs=0)
    plan = expand(spec)
    client = FakeRayClient()
    out = run_study(plan, RayJobLauncher(None, max_concurrent=2, client=client),
                    progress=False, poll_s=0)
    assert len(out.ran) == 5 and not out.failed
    assert client.max_running == 2
    assert "logs of raysubmit_0" in open(os.path.join(spec.output_dir, "logs",
                                                      "data__n_train-20.log")).read()
    assert all(read_complete(i.out_dir) for i in plan.instances.values())


def test_job_entry_is_the_cli_command_line():
    """If this fails, a study job no longer runs the same `megarlhf train ...` a user types."""
    from megarlhf.study.spec import JobSpec
    from megarlhf.study.sweep import JobInstance

    inst = JobInstance(JobSpec("rl", command="train", config="/c.yaml"), "rl/base", "/o/rl",
                       {}, None, [], overrides=["a.b=1"], kind="ppo")
    assert job_entry(inst) == ["--out", "/o/rl", "--", "train", "ppo", "/c.yaml", "a.b=1",
                               "output_dir=/o/rl", "logging.progress_bar=false", "--resume"]


# ------------------------------------------------------------------------------ aggregation
def test_aggregation_reads_resumed_metrics_and_complete_runs_only(tmp_path):
    """If this fails, a resumed run's repeated steps are counted twice, or an incomplete run
    enters the analysis."""
    plan = expand(load_study(_study(tmp_path)))
    run_study(plan, FakeLauncher(), progress=False, poll_s=0, report=False)
    d = plan.instances["rl/n_samples_per_prompt-16+seed-1"].out_dir
    with open(os.path.join(d, "tensorboard", "metrics.jsonl"), "a") as f:
        f.write('{"step": 2, "reward/raw_mean": 0.9}\n{"step": 3, "reward/raw_')  # killed
    job = read_job(d)
    assert [s for s, _ in job.series("reward/raw_mean")] == [1, 2, 3]
    assert job.series("reward/raw_mean")[1][1] == 0.9 and job.last("eval/accuracy") == 0.661
    os.remove(os.path.join(plan.instances["rl/n_samples_per_prompt-1+seed-2"].out_dir,
                           "COMPLETE.json"))
    runs, missing = collect(plan)
    assert len(runs) == 5 and [r.label() for r in missing] == [
        "rl.batch.n_samples_per_prompt=1, seed=2"]


def test_report_writes_plot_table_and_verdict(tmp_path):
    """If this fails, a finished study leaves no PNG, table or verdict (the deliverables)."""
    plan = expand(load_study(_study(tmp_path)))
    out = run_study(plan, FakeLauncher(), progress=False, poll_s=0)
    res = os.path.join(plan.spec.output_dir, "results")
    png = os.path.join(res, "responses_per_prompt.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(png) > 5000
    table = open(os.path.join(res, "table.md")).read()
    assert table.startswith("| N | runs |") and "| 16 | 2 |" in table
    verdict = json.load(open(os.path.join(res, "verdict.json")))
    assert verdict["outcome"] == out.results["outcome"]
    assert "gain N=1->4" in verdict["statistic"] and "SE" in verdict["test"]
    assert not glob.glob(os.path.join(res, "*.tmp-*"))


# ------------------------------------------------------------------------------ verdicts
def J(rows=(), bon=None):
    files = {"bon.json": {"curve": {str(n): {"accuracy": a} for n, a in bon.items()}}} \
        if bon else {}
    return JobData(rows=[dict(r) for r in rows], files=files)


def R(point, seed, **jobs):
    return RunData(point=point, seed=seed, jobs=jobs, label=f"{point} {seed}")


NOISE = (-1.0, 0.0, 1.0)  # three seeds at -d, 0, +d


def _final_eval(v):
    return [{"step": 0, "eval/accuracy": 0.4}, {"step": 30, "eval/accuracy": v}]


def _verdict(name, runs, factors, analysis=None):
    return FINDINGS[name].analyze(runs, factors, analysis or {}).verdict


@pytest.mark.parametrize("means, d, outcome", [
    ({1: 0.50, 4: 0.60, 16: 0.62}, 0.005, stats.REPRODUCED),
    ({1: 0.60, 4: 0.55, 16: 0.50}, 0.005, stats.NOT_REPRODUCED),
    ({1: 0.50, 4: 0.52, 16: 0.51}, 0.10, stats.INCONCLUSIVE),
])
def test_verdict_responses_per_prompt(means, d, outcome):
    """If this fails, finding 1's verdict (gain 1->4 vs 4->16 against the seed spread) is not
    what the numbers show."""
    f = Factor("rl", "batch.n_samples_per_prompt", [1, 4, 16])
    runs = [R({f.name: n}, s, rl=J(_final_eval(m + e * d)))
            for n, m in means.items() for s, e in enumerate(NOISE)]
    v = _verdict("responses_per_prompt", runs, [f])
    assert v.outcome == outcome, v.statistic
    assert "±" in v.statistic


@pytest.mark.parametrize("bon, rl, d, outcome", [
    ({32: 0.50, 64: 0.70}, {32: 0.55, 64: 0.57}, 0.01, stats.REPRODUCED),
    ({32: 0.50, 64: 0.40}, {32: 0.55, 64: 0.57}, 0.01, stats.NOT_REPRODUCED),
    ({32: 0.50, 64: 0.55}, {32: 0.55, 64: 0.56}, 0.15, stats.INCONCLUSIVE),
])
def test_verdict_reward_model_size(bon, rl, d, outcome):
    """If this fails, finding 2's verdict (best-of-N gain vs RL gain of a larger RM) is wrong."""
    f = Factor("rm", "size", [32, 64], {32: ["a=1"], 64: ["a=2"]})
    runs = [R({f.name: z}, s, bon=J(bon={1: 0.3, 16: bon[z] + e * d}),
              rl=J(_final_eval(rl[z] + e * d)))
            for z in (32, 64) for s, e in enumerate(NOISE)]
    assert _verdict("reward_model_size", runs, [f]).outcome == outcome


@pytest.mark.parametrize("gains, d, outcome", [
    ({64: 0.20, 128: 0.10, 256: 0.02}, 0.01, stats.REPRODUCED),
    ({64: 0.02, 128: 0.10, 256: 0.20}, 0.01, stats.NOT_REPRODUCED),
    ({64: 0.10, 128: 0.12, 256: 0.09}, 0.10, stats.INCONCLUSIVE),
])
def test_verdict_policy_size(gains, d, outcome):
    """If this fails, finding 3's verdict (slope of RL gain vs log2 size) is wrong."""
    f = Factor("sft", "actor.model.arch.hidden_size", [64, 128, 256])
    runs = [R({f.name: z}, s, rl=J([{"step": 0, "eval/accuracy": 0.3 + 0.1 * i},
                                    {"step": 30, "eval/accuracy": 0.3 + 0.1 * i + g + e * d}]))
            for i, (z, g) in enumerate(gains.items()) for s, e in enumerate(NOISE)]
    v = _verdict("policy_size", runs, [f])
    assert v.outcome == outcome, v.statistic
    assert v.values["slope"] < 0 if outcome == stats.REPRODUCED else True


def _curves(evals, reward_end, d):
    runs = []
    for s, e in enumerate(NOISE):
        rows = [{"step": t, "reward/raw_mean": 0.3 + (reward_end - 0.3) * t / 30 + e * d}
                for t in range(1, 31)]
        for t, v in zip((0, 15, 30), evals):
            if t:
                rows[t - 1]["eval/accuracy"] = v + e * d
        runs.append(R({}, s, rl=J([{"step": 0, "eval/accuracy": evals[0]}] + rows)))
    return runs


@pytest.mark.parametrize("evals, reward_end, d, outcome", [
    ((0.40, 0.55, 0.56), 0.70, 0.005, stats.REPRODUCED),
    ((0.40, 0.42, 0.60), 0.70, 0.005, stats.NOT_REPRODUCED),
    ((0.40, 0.45, 0.47), 0.32, 0.08, stats.INCONCLUSIVE),
])
def test_verdict_early_downstream(evals, reward_end, d, outcome):
    """If this fails, finding 4's verdict (eval gain early vs late; reward still rising) is
    wrong."""
    v = _verdict("early_downstream", _curves(evals, reward_end, d), [])
    assert v.outcome == outcome, v.statistic


@pytest.mark.parametrize("acc, d, outcome", [
    ({(1000, 1): 0.80, (250, 4): 0.70}, 0.01, stats.REPRODUCED),
    ({(1000, 1): 0.70, (250, 4): 0.80}, 0.01, stats.NOT_REPRODUCED),
    ({(1000, 1): 0.74, (250, 4): 0.72}, 0.10, stats.INCONCLUSIVE),
])
def test_verdict_rm_data_diversity(acc, d, outcome):
    """If this fails, finding 5's verdict (more prompts vs more responses at equal size) is
    wrong."""
    pf = Factor("rm", "data.rm_num_prompts", [250, 1000])
    rf = Factor("rm", "data.rm_responses_per_prompt", [1, 4])
    cells = {(250, 1): 0.6, (1000, 4): 0.85, **acc}
    runs = [R({pf.name: P, rf.name: Q}, s,
              rm=J([{"step": 150, "rm/eval_pair_accuracy": a + e * d}]))
            for (P, Q), a in cells.items() for s, e in enumerate(NOISE)]
    v = _verdict("rm_data_diversity", runs, [pf, rf])
    assert v.outcome == outcome, v.statistic
    assert "1000x1 vs 250x4" in v.statistic


@pytest.mark.parametrize("own, other, d, outcome", [
    ({"orm": 0.60, "prm": 0.70}, {"orm": 0.50, "prm": 0.45}, 0.01, stats.REPRODUCED),
    ({"orm": 0.70, "prm": 0.60}, {"orm": 0.50, "prm": 0.45}, 0.01, stats.NOT_REPRODUCED),
    ({"orm": 0.60, "prm": 0.62}, {"orm": 0.50, "prm": 0.50}, 0.10, stats.INCONCLUSIVE),
])
def test_verdict_prm_vs_orm(own, other, d, outcome):
    """If this fails, finding 6's verdict (PRM - ORM best-of-N on its task vs another) is
    wrong."""
    f = Factor("rm", "reward.rm_type", ["orm", "prm"])
    runs = [R({f.name: t}, s, bon_own=J(bon={16: own[t] + e * d}),
              bon_other=J(bon={16: other[t] + e * d}))
            for t in ("orm", "prm") for s, e in enumerate(NOISE)]
    assert _verdict("prm_vs_orm", runs, [f]).outcome == outcome


def _rl_curve(reward, kl, length, d, e):
    return J([{"step": t, "reward/raw_mean": reward + e * d, "policy/kl_ref": kl * t / 20,
               "policy/response_length": 18 + (length - 18) * t / 20 + e}
              for t in range(1, 21)])


@pytest.mark.parametrize("ppo, grpo, d, outcome", [
    ((0.60, 0.02, 18.0), (0.61, 0.10, 22.0), 0.02, stats.REPRODUCED),
    ((0.40, 0.02, 18.0), (0.70, 0.10, 22.0), 0.01, stats.NOT_REPRODUCED),
    ((0.60, 0.05, 18.0), (0.60, 0.05, 18.0), 0.02, stats.INCONCLUSIVE),
])
def test_verdict_ppo_vs_grpo(ppo, grpo, d, outcome):
    """If this fails, finding 7's verdict (rewards close vs pooled std; GRPO's KL/length drift
    beyond PPO's) is wrong."""
    f = Factor("rl", "method", ["ppo", "grpo"], {"ppo": ["kind=ppo"], "grpo": ["kind=grpo"]})
    runs = [R({f.name: m}, s, rl=_rl_curve(*vals, d, e))
            for m, vals in (("ppo", ppo), ("grpo", grpo)) for s, e in enumerate(NOISE)]
    v = _verdict("ppo_vs_grpo", runs, [f])
    assert v.outcome == outcome, v.statistic
    assert "pooled std" in v.statistic


@pytest.mark.parametrize("slopes, d, outcome", [
    ({"ppo": 0.05, "rloo": 0.04, "dpo": 0.005}, 0.005, stats.REPRODUCED),
    ({"ppo": 0.02, "rloo": 0.01, "dpo": 0.08}, 0.005, stats.NOT_REPRODUCED),
    ({"ppo": 0.03, "rloo": 0.03, "dpo": 0.025}, 0.08, stats.INCONCLUSIVE),
])
def test_verdict_staleness(slopes, d, outcome):
    """If this fails, the off-policy study's verdict (DPO's slope of final reward vs K against
    PPO's and RLOO's) is wrong."""
    mf = Factor("rl", "method", list(slopes), {m: [f"kind={m}"] for m in slopes})
    kf = Factor("rl", "asynchronous.max_staleness", [0, 1, 2, 4])
    runs = [R({mf.name: m, kf.name: k}, s,
              rl=J([{"step": t, "reward/raw_mean": 0.7 - b * k + e * d,
                     "rollout/staleness": float(min(k, t - 1))} for t in range(1, 8)]))
            for m, b in slopes.items() for k in (0, 1, 2, 4) for s, e in enumerate(NOISE)]
    v = _verdict("staleness", runs, [mf, kf])
    assert v.outcome == outcome, v.statistic


def test_staleness_is_fitted_against_the_staleness_each_run_measured():
    """If this fails, the off-policy study puts its runs at the bound K they were given instead
    of the staleness they had: a rollout slower than the learner keeps batches one version old
    whatever K is (asynchronous.fixed_staleness off), and the slope per K would be read off
    points that all sit at staleness 1."""
    mf = Factor("rl", "method", ["ppo", "dpo"], {m: [f"kind={m}"] for m in ("ppo", "dpo")})
    kf = Factor("rl", "asynchronous.max_staleness", [0, 1, 4])

    def runs(measured):  # final reward 0.7 - 0.02 x (the staleness the run had)
        return [R({mf.name: m, kf.name: k}, s, rl=J([
            {"step": t, "reward/raw_mean": 0.7 - 0.02 * measured[k] + e * 0.001,
             "rollout/staleness": float(measured[k])} for t in range(1, 6)]))
            for m in ("ppo", "dpo") for k in (0, 1, 4) for s, e in enumerate(NOISE)]
    exact = FINDINGS["staleness"].analyze(runs({0: 0, 1: 1, 4: 4}), [mf, kf], {})
    capped = FINDINGS["staleness"].analyze(runs({0: 0, 1: 1, 4: 1}), [mf, kf], {})
    for a in (exact, capped):
        assert a.verdict.values["slope_ppo"] == pytest.approx(-0.02, abs=1e-3)
    # Against the nominal K the capped runs would give a slope near -0.004.
    assert "(staleness 1.00)" in capped.rows[0][3] and "(staleness 4.00)" in exact.rows[0][3]
    missing = [R({mf.name: m, kf.name: k}, 1, rl=J([{"step": 1, "reward/raw_mean": 0.5}]))
               for m in ("ppo", "dpo") for k in (0, 1, 4)]
    with pytest.raises(StudyError, match="logged no rollout/staleness"):
        FINDINGS["staleness"].analyze(missing, [mf, kf], {})


@pytest.mark.parametrize("async_dt, outcome", [
    ((0.60, 0.62, 0.58), stats.REPRODUCED),
    ((1.50, 1.45, 1.55), stats.NOT_REPRODUCED),
    ((0.70, 1.40, 1.00), stats.INCONCLUSIVE),
])
def test_verdict_async_speedup(async_dt, outcome):
    """If this fails, the async speed-up verdict (wall-clock to the sync final reward, per
    seed pair) is wrong."""
    f = Factor("rl", "asynchronous.enabled", [False, True])

    def job(dt):
        return J([{"step": t, "reward/raw_mean": 0.3 + 0.01 * t, "time/step": dt}
                  for t in range(1, 31)])
    runs = [R({f.name: False}, s, rl=job(1.0)) for s in range(3)]
    runs += [R({f.name: True}, s, rl=job(dt)) for s, dt in enumerate(async_dt)]
    v = _verdict("async_speedup", runs, [f])
    assert v.outcome == outcome, v.statistic
    assert "sync / async" in v.statistic


def test_every_verdict_is_inconclusive_with_one_seed():
    """If this fails, a study with one seed per point claims a result it has no spread for."""
    f = Factor("rl", "batch.n_samples_per_prompt", [1, 4, 16])
    runs = [R({f.name: n}, 1, rl=J(_final_eval(0.5 + 0.05 * i))) for i, n in enumerate((1, 4,
                                                                                        16))]
    v = _verdict("responses_per_prompt", runs, [f])
    assert v.outcome == stats.INCONCLUSIVE and "no spread" in v.statistic


# ------------------------------------------------------------------------------ shipped
SHIPPED = sorted(glob.glob(os.path.join(STUDIES, "*", "*.yaml")))
SHIPPED = [p for p in SHIPPED if os.path.basename(os.path.dirname(p)) != "_base"]


def test_nine_findings_are_shipped_as_mini_and_8b_studies():
    """If this fails, a finding lost its study file (examples/studies/<finding>/)."""
    names = {f for f in FINDINGS if f != "custom"}
    assert len(names) == 9
    for n in names:
        for size in ("mini", "8b"):
            assert os.path.isfile(os.path.join(STUDIES, n, f"{size}.yaml")), (n, size)
            assert load_study(os.path.join(STUDIES, n, f"{size}.yaml")).study == n


@pytest.mark.parametrize("path", [p for p in SHIPPED if p.endswith("mini.yaml")],
                         ids=lambda p: os.path.basename(os.path.dirname(p)))
def test_shipped_mini_study_validates(path, tmp_path):
    """If this fails, a shipped miniature study no longer validates: its documented command
    fails before running anything."""
    plan = expand(load_study(path, [f"output_dir={tmp_path}"]))
    validate_plan(plan)
    assert len(plan.runs) >= 2


@pytest.fixture(scope="module")
def sparse_8b(tmp_path_factory):
    """A Llama-3-8B HF directory (config.json, sparse safetensors, a test tokenizer)."""
    from _inputs import make_inputs, sparse_hf_model
    from test_examples import LLAMA3_8B

    d = tmp_path_factory.mktemp("sparse8b")
    inputs = make_inputs(str(d / "inputs"))
    return sparse_hf_model(str(d / "llama3_8b"), LLAMA3_8B, head="lm",
                           tokenizer_from=inputs["lm"])


@pytest.mark.parametrize("path", [p for p in SHIPPED if p.endswith("8b.yaml")],
                         ids=lambda p: os.path.basename(os.path.dirname(p)))
def test_shipped_8b_study_plans(path, tmp_path, capsys, sparse_8b):
    """If this fails, a shipped 8B study does not validate or does not fit its GPUs
    (`megarlhf study 8b.yaml --plan` is what its header tells users to run first). Best-of-N
    jobs read their policy's config.json: they get an 8B directory, as a user passes theirs."""
    from megarlhf.cli import main

    spec = load_study(path)
    over = [f"{n}.actor.model.hf_dir={sparse_8b}" for n, j in spec.jobs.items()
            if j.config and j.config.endswith("8b_bon.yaml")]
    assert main(["study", path, f"output_dir={tmp_path}"] + over + ["--plan"]) == 0, \
        capsys.readouterr().err
    assert "DOES NOT FIT" not in capsys.readouterr().out


def test_study_output_dir_holding_an_input_is_refused_by_the_dry_run(tmp_path, capsys):
    """If this fails (issue 30), a study whose output_dir holds one of its inputs (a job's
    config, the study file) passes `--dry-run` and then writes its jobs/ and study.yaml over
    them."""
    import shutil

    from megarlhf.cli import main

    cfgs = tmp_path / "cfgs"
    cfgs.mkdir()
    shutil.copy(os.path.join(BASE, "mini_sft.yaml"), cfgs / "sft.yaml")
    for over, needle in [
            ({"jobs.sft.config": str(cfgs / "sft.yaml"), "output_dir": str(cfgs)},
             f"contains jobs.sft.config = {cfgs / 'sft.yaml'}"),
            ({"output_dir": str(tmp_path)}, "contains the study file")]:
        path = _study(tmp_path, **over)
        capsys.readouterr()
        assert main(["study", path, "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, err
    assert sorted(os.listdir(cfgs)) == ["sft.yaml"]


def test_dry_run_lists_jobs_and_what_is_done_without_writing(tmp_path, capsys):
    """If this fails, `megarlhf study --dry-run` runs or writes something, or misreports which
    jobs a rerun would skip."""
    from megarlhf.cli import main

    path = _study(tmp_path)
    assert main(["study", path, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "6 runs, 8 jobs (0 complete)" in out and out.count("[todo]") == 8
    assert "megarlhf train grpo" in out and not os.path.exists(tmp_path / "out")
    plan = expand(load_study(path))
    with pytest.raises(KeyboardInterrupt):
        run_study(plan, FakeLauncher(fail_after=3), progress=False, poll_s=0)
    assert main(["study", path, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "(3 complete)" in out and out.count("[done]") == 3
    assert main(["study", path, "--report"]) == 1  # 1 of 6 runs complete: not a success
    assert "(1 of 6 runs)" in capsys.readouterr().out


def test_report_of_a_study_never_run_is_refused(tmp_path, capsys):
    """If this fails, `--report` writes results into a directory the study never ran in."""
    from megarlhf.cli import main

    assert main(["study", _study(tmp_path), "--report"]) == 2
    assert "run the study first" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")
