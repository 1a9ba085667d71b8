"""Bad input never destroys a user's files, never trains a broken model, never ends in a
traceback, and `validate` / `plan` refuse what `train` refuses (issue 15).

Every case runs the real CLI (``megarlhf.cli.main``) on real files and asserts the exit code,
that the message names the field or file, and that no file outside the command's output was
touched. Ray and the workers are replaced by a tripwire: each refusal must come before they
would start.
"""

import json
import os
import shutil

import pytest

from _inputs import grpo_config, make_inputs, set_dotted, sft_config, snapshot, write_config
from megarlhf.checkpoint.outputs import write_marker

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("inputs"))
    got = make_inputs(d)
    got["root"] = d
    trunc = os.path.join(d, "trunc")
    shutil.copytree(got["lm"], trunc)
    size = os.path.getsize(os.path.join(trunc, "model.safetensors"))
    with open(os.path.join(trunc, "model.safetensors"), "r+b") as f:
        f.truncate(size // 2)  # an interrupted download
    got["trunc"] = trunc
    return got


@pytest.fixture(autouse=True)
def no_workers(monkeypatch):
    """Refusals come before Ray: starting a cluster or a rank fails the test."""
    import megarlhf.controller.cluster as placement
    import megarlhf.platform.launch as launch

    def tripwire(*a, **k):
        raise AssertionError("Ray / worker processes were started before the refusal")

    monkeypatch.setattr(placement, "init_ray", tripwire)
    monkeypatch.setattr(launch, "run_distributed", tripwire)


def run_cli(argv, inputs, tmp_path, capsys, *, output=None):
    """Runs ``megarlhf argv``; returns (exit code, stderr). Asserts that nothing outside
    ``output`` changed, neither in the inputs nor in ``tmp_path``."""
    from megarlhf.cli import main

    skip = (output,) if output else ()
    before = (snapshot(inputs["root"]), snapshot(str(tmp_path), skip=skip))
    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    after = (snapshot(inputs["root"]), snapshot(str(tmp_path), skip=skip))
    assert after == before, "a file outside the command's output was touched"
    assert "Traceback" not in err
    return code, err


def expect(code_err, code, *needles):
    got, err = code_err
    assert got == code, err
    for n in needles:
        assert n in err, f"{n!r} not in: {err}"


def previous_run(out):
    """A finished run as megarlhf leaves it: marked, checkpoints, hf/, config."""
    step = os.path.join(out, "checkpoints", "step_000003")
    os.makedirs(os.path.join(step, "actor", "model"))
    open(os.path.join(step, "COMPLETE"), "w").write("x")
    with open(os.path.join(step, "driver_state.json"), "w") as f:
        json.dump({"step": 3}, f)
    open(os.path.join(out, "checkpoints", "latest"), "w").write("step_000003")
    os.makedirs(os.path.join(out, "hf"))
    open(os.path.join(out, "hf", "model.safetensors"), "w").write("trained weights")
    open(os.path.join(out, "config.yaml"), "w").write("kind: sft\n")
    write_marker(out, "train sft")


def foreign_dir(path):
    os.makedirs(path)
    open(os.path.join(path, "thesis.tex"), "w").write("years of work")
    return path


def bon_config(inputs, out):
    return {"kind": "bon", "output_dir": out,
            "cluster": {"num_nodes": 1, "gpus_per_node": 2, "device": "cpu"},
            "actor": {"model": {"hf_dir": inputs["lm"], "dtype": "fp32"}},
            "reward_model": {"model": {"hf_dir": inputs["lm"], "dtype": "fp32"}},
            "reward": {"sources": {"rm": 1.0}}, "rollout": {"engine": "hf", "max_new_tokens": 16},
            "bon": {"n_values": [1, 2]},
            "data": {"eval_path": inputs["prompts_heldout"], "max_prompt_len": 24}}


# ----------------------------------------------------------------------- 1. files are never lost
def test_convert_out_equal_to_hf_dir_is_refused(inputs, tmp_path, capsys):
    """If this fails, `convert --out` = `--hf-dir` --overwrite deletes the source model."""
    lm = inputs["lm"]
    expect(run_cli(["convert", "hf-to-megatron", "--hf-dir", lm, "--out", lm, "--overwrite"],
                   inputs, tmp_path, capsys), 2, f"--out = {lm} is --hf-dir")


def test_convert_overwrite_never_deletes_a_foreign_folder(inputs, tmp_path, capsys):
    """If this fails, `convert ... --overwrite` deletes an arbitrary existing folder."""
    out = foreign_dir(str(tmp_path / "docs"))
    expect(run_cli(["convert", "hf-to-megatron", "--hf-dir", inputs["lm"], "--out", out,
                    "--overwrite"], inputs, tmp_path, capsys), 2,
           f"--out = {out} holds files megarlhf did not write (thesis.tex)")


@pytest.mark.parametrize("direction", ["hf-to-megatron", "megatron-to-hf"])
def test_convert_overwrite_keeps_a_users_file_in_its_earlier_output(direction, inputs, tmp_path,
                                                                     capsys):
    """If this fails, `convert --out DIR --overwrite`, where DIR is an earlier megarlhf output
    to which the user added a file, replaces the whole directory: the user's file is gone."""
    out = tmp_path / "earlier"
    (out / "model").mkdir(parents=True)
    (out / "model" / "weights.bin").write_text("megarlhf's")
    write_marker(str(out), "convert", files=["model/weights.bin"])
    (out / "model" / "my_notes.txt").write_text("the user's")
    src = ["--hf-dir", inputs["lm"]] if direction == "hf-to-megatron" else \
        ["--ckpt", inputs["ckpt"]] if "ckpt" in inputs else ["--ckpt", inputs["lm"]]
    expect(run_cli(["convert", direction, *src, "--out", out, "--overwrite"], inputs, tmp_path,
                   capsys), 2, "holds files megarlhf did not write (model/my_notes.txt)")
    assert (out / "model" / "my_notes.txt").read_text() == "the user's"


def test_train_overwrite_keeps_a_users_file_inside_its_earlier_run(inputs, tmp_path, capsys):
    """If this fails, `train --overwrite` deletes a file the user put inside the previous run's
    own directories (tensorboard/, hf/, checkpoints/) along with them."""
    out = str(tmp_path / "run")
    previous_run(out)
    os.makedirs(os.path.join(out, "tensorboard"))
    open(os.path.join(out, "tensorboard", "metrics.jsonl"), "w").write("{}\n")
    open(os.path.join(out, "tensorboard", "my_analysis.ipynb"), "w").write("keep")
    cfg = write_config(str(tmp_path / "sft.yaml"), sft_config(inputs, out))
    expect(run_cli(["train", "sft", cfg, "--overwrite"], inputs, tmp_path, capsys), 2,
           "would delete files megarlhf did not write", "tensorboard/my_analysis.ipynb")
    assert open(os.path.join(out, "tensorboard", "my_analysis.ipynb")).read() == "keep"


def test_convert_out_inside_its_checkpoint_is_refused(inputs, tmp_path, capsys):
    """If this fails, megatron-to-hf writes (and on --overwrite deletes) inside its input."""
    ck = tmp_path / "ck"
    ck.mkdir()
    expect(run_cli(["convert", "megatron-to-hf", "--ckpt", ck, "--out", ck / "hf", "--overwrite"],
                   inputs, tmp_path, capsys), 2, "is inside --ckpt")


def test_score_output_equal_to_input_is_refused(inputs, tmp_path, capsys):
    """If this fails, `score --output` = `--input` overwrites the input."""
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"input_ids": [1, 2, 3]}\n')
    expect(run_cli(["score", "--hf-dir", inputs["lm"], "--input", inp, "--output", inp],
                   inputs, tmp_path, capsys), 2, f"--output = {inp} is --input")


def test_score_never_replaces_a_foreign_file(inputs, tmp_path, capsys):
    """If this fails, `score --output X --overwrite` replaces a file megarlhf did not write."""
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"input_ids": [1, 2, 3]}\n')
    mine = tmp_path / "results.jsonl"
    mine.write_text("my notes\n")
    expect(run_cli(["score", "--hf-dir", inputs["lm"], "--input", inp, "--output", mine,
                    "--overwrite"], inputs, tmp_path, capsys), 2,
           f"--output = {mine} exists and is not a megarlhf output")


def test_train_into_a_finished_run_needs_resume_or_overwrite(inputs, tmp_path, capsys):
    """If this fails, `train` into an output_dir holding a finished run replaces its
    checkpoints and hf/ without --resume or --overwrite."""
    out = str(tmp_path / "run")
    previous_run(out)
    cfg = write_config(str(tmp_path / "sft.yaml"), sft_config(inputs, out))
    expect(run_cli(["train", "sft", cfg], inputs, tmp_path, capsys), 2,
           f"output_dir = {out} holds a previous run", "--resume", "--overwrite")


def test_grpo_reading_its_own_output_dir_is_refused(inputs, tmp_path, capsys):
    """If this fails, a GRPO job whose hf_dir is the SFT run's <output_dir>/hf with the same
    output_dir deletes the SFT checkpoint and overwrites the model it reads."""
    out = str(tmp_path / "run")
    previous_run(out)
    shutil.rmtree(os.path.join(out, "hf"))
    shutil.copytree(inputs["lm"], os.path.join(out, "hf"))
    cfg = write_config(str(tmp_path / "grpo.yaml"), grpo_config(
        inputs, out, **{"actor.model.hf_dir": os.path.join(out, "hf")}))
    expect(run_cli(["train", "grpo", cfg, "--overwrite"], inputs, tmp_path, capsys), 2,
           f"output_dir = {out} contains actor.model.hf_dir = {out}/hf")


@pytest.mark.parametrize("command", ["train", "demo", "eval"])
def test_writers_refuse_a_foreign_output_dir_even_with_overwrite(command, inputs, tmp_path,
                                                                  capsys):
    """If this fails, a run, the demo or an evaluation writes into (or clears) a folder that
    holds the user's files."""
    out = foreign_dir(str(tmp_path / "docs"))
    if command == "train":
        argv = ["train", "sft", write_config(str(tmp_path / "c.yaml"), sft_config(inputs, out)),
                "--overwrite"]
    elif command == "eval":
        argv = ["eval", "bon", write_config(str(tmp_path / "c.yaml"), bon_config(inputs, out)),
                "--overwrite"]
    else:
        argv = ["demo", "--output-dir", out, "--overwrite"]
    expect(run_cli(argv, inputs, tmp_path, capsys), 2, f"= {out} holds files megarlhf did not "
           "write (thesis.tex)")


# ------------------------------------------------------------------ 2. nothing broken is trained
def test_infinite_learning_rate_is_refused(inputs, tmp_path, capsys):
    """If this fails, actor.optimizer.lr=.inf trains NaN weights and exports them."""
    out = str(tmp_path / "run")
    cfg = write_config(str(tmp_path / "sft.yaml"), sft_config(inputs, out))
    expect(run_cli(["train", "sft", cfg, "actor.optimizer.lr=.inf"], inputs, tmp_path, capsys),
           2, "actor.optimizer.lr: inf is not a finite number")
    assert not os.path.exists(out)


def _arch_job(inputs, tmp_path, **arch):
    a = dict(inputs["arch"], **arch)
    return write_config(str(tmp_path / "sft.yaml"), sft_config(inputs, str(tmp_path / "run"), **{
        "actor.model": {"arch": a, "tokenizer": inputs["tokenizer"], "dtype": "fp32"}}))


def test_arch_typo_is_refused_with_the_nearest_name(inputs, tmp_path, capsys):
    """If this fails, a typo inside model.arch (num_hidden_layer) is ignored and the default
    number of layers trained."""
    cfg = _arch_job(inputs, tmp_path, num_hidden_layer=2)
    expect(run_cli(["train", "sft", cfg], inputs, tmp_path, capsys), 2,
           "actor.model.arch.num_hidden_layer", "did you mean actor.model.arch.num_hidden_layers")


def test_model_vocab_below_the_tokenizer_is_refused(inputs, tmp_path, capsys):
    """If this fails, a model that cannot embed the tokenizer's ids is trained and exported."""
    cfg = _arch_job(inputs, tmp_path, vocab_size=inputs["tok_vocab"] - 7)
    expect(run_cli(["train", "sft", cfg], inputs, tmp_path, capsys), 2,
           f"actor.model.arch.vocab_size = {inputs['tok_vocab'] - 7} is below the tokenizer's "
           f"{inputs['tok_vocab']} ids", inputs["tokenizer"])


@pytest.mark.parametrize("command", [["train", "sft"], ["eval", "bon"]])
def test_command_kind_must_match_the_config(command, inputs, tmp_path, capsys):
    """If this fails, `megarlhf train sft` on a kind: grpo config silently trains SFT."""
    cfg = write_config(str(tmp_path / "grpo.yaml"), grpo_config(inputs, str(tmp_path / "r")))
    expect(run_cli(command + [cfg], inputs, tmp_path, capsys), 2,
           "says kind: grpo", f"megarlhf {command[0]} grpo")


# --------------------------------------------------------------------- 3. no traceback, ever
def _bad_data(tmp_path, what):
    p = tmp_path / ("d.parquet" if "parquet" in what else "d.jsonl")
    if what == "deep json":
        p.write_text("[" * 100000 + "]" * 100000 + "\n")
    elif what == "corrupt parquet":
        from megarlhf.data.datasets import write_parquet

        write_parquet(p, [{"prompt": "1+1=", "response": "2"}] * 3)
        raw = p.read_bytes()
        p.write_bytes(raw[:8] + b"\0" * 40 + raw[48:])
    elif what == "directory":
        p = tmp_path / "data_dir"
        p.mkdir()
    elif what == "not an object":
        p.write_text('{"prompt": "1+1=", "response": "2"}\n[1, 2]\n')
    return p


@pytest.mark.parametrize("what,needle", [
    ("deep json", "line 1: JSON nested too deeply"),
    ("corrupt parquet", "d.parquet: unreadable from row 0 on"),
    ("directory", "data_dir is a directory"),
    ("not an object", "line 2: a JSON list instead of an object"),
])
@pytest.mark.parametrize("command", ["validate", "train"])
def test_malformed_data_files(command, what, needle, inputs, tmp_path, capsys):
    """If this fails, a malformed data file ends in a Python traceback."""
    path = _bad_data(tmp_path, what)
    out = tmp_path / "run"
    cfg = write_config(str(tmp_path / "sft.yaml"), sft_config(
        inputs, str(out), **{"data.train_path": str(path)}))
    argv = ["validate", cfg] if command == "validate" else ["train", "sft", cfg]
    # train reads its data after claiming output_dir (before any worker): only that is written.
    expect(run_cli(argv, inputs, tmp_path, capsys, output=str(out)), 2, str(path), needle)


@pytest.mark.parametrize("argv", [
    ["convert", "hf-to-megatron", "--hf-dir", "{trunc}", "--out", "{tmp}/ck"],
    ["score", "--hf-dir", "{trunc}", "--input", "{tmp}/in.jsonl"],
    ["validate", "{tmp}/sft.yaml", "actor.model.hf_dir={trunc}"],
    ["train", "sft", "{tmp}/sft.yaml", "actor.model.hf_dir={trunc}"],
], ids=["convert", "score", "validate", "train"])
def test_truncated_safetensors(argv, inputs, tmp_path, capsys):
    """If this fails, a truncated safetensors file ends in a traceback (in a worker, for
    train) instead of one line naming the file."""
    (tmp_path / "in.jsonl").write_text('{"input_ids": [1, 2, 3]}\n')
    write_config(str(tmp_path / "sft.yaml"), sft_config(inputs, str(tmp_path / "run")))
    argv = [a.format(trunc=inputs["trunc"], tmp=tmp_path) for a in argv]
    expect(run_cli(argv, inputs, tmp_path, capsys), 2,
           f"{inputs['trunc']}/model.safetensors: not a readable safetensors file")


@pytest.mark.parametrize("flags,needle", [
    (["--tp", "3"], "2 attention heads are not divisible by --tp 3"),
    (["--pp", "4"], "2 layers are not divisible by pp*vpp = 4"),
    (["--temperature", "0"], "--temperature 0.0: must be a finite number > 0"),
    (["--compare-hf", "--ckpt", "{tmp}"], "--compare-hf"),
    (["--input", "{tmp}/bad.jsonl"], "bad.jsonl, line 2: each row needs 'input_ids' or 'text'"),
    (["--input", "{tmp}/big.jsonl"], "token id 999 >= the model's vocab_size 64"),
    (["--input", "{tmp}/long.jsonl"], "sequence 2 is 300 tokens long (1 of 2 sequences are "
                                      "longer than the model's 256 positions"),
])
def test_score_layout_and_input_errors(flags, needle, inputs, tmp_path, capsys):
    """If this fails, `score` with a layout the model cannot take or a bad input file dies in
    its ranks with a traceback."""
    (tmp_path / "in.jsonl").write_text('{"input_ids": [1, 2, 3]}\n')
    (tmp_path / "bad.jsonl").write_text('{"input_ids": [1]}\n{"oops": 1}\n')
    (tmp_path / "big.jsonl").write_text('{"input_ids": [1, 999]}\n')
    (tmp_path / "long.jsonl").write_text('{"input_ids": [1, 2]}\n'
                                         + json.dumps({"input_ids": [5] * 300}) + "\n")
    argv = ["score", "--input", tmp_path / "in.jsonl"] + [f.format(tmp=tmp_path) for f in flags]
    if "--ckpt" not in flags:
        argv += ["--hf-dir", inputs["lm"]]
    expect(run_cli(argv, inputs, tmp_path, capsys), 2, needle)


def _saved_run(inputs, out, layout, n_rows):
    """A complete checkpoint at step 2 of an SFT run (model metadata, driver state)."""
    step = os.path.join(out, "checkpoints", "step_000002")
    model = os.path.join(step, "actor", "model")
    os.makedirs(model)
    with open(os.path.join(model, "megarlhf_checkpoint.json"), "w") as f:
        json.dump({"format": "megarlhf.model_checkpoint", "format_version": 1,
                   "hf_config": inputs["arch"], "head": "lm", "padded_vocab_size": 128,
                   "vocab_size": 64, "dtype": "float32", "layout": layout, "files": {}}, f)
    with open(os.path.join(step, "driver_state.json"), "w") as f:
        json.dump({"step": 2, "sampler": {"seed": 1, "epoch": 0, "index": 8,
                                          "num_samples": n_rows}}, f)
    open(os.path.join(step, "COMPLETE"), "w").write("x")
    open(os.path.join(out, "checkpoints", "latest"), "w").write("step_000002")
    open(os.path.join(out, "config.yaml"), "w").write("kind: sft\n")
    write_marker(out, "train sft")


TP1 = {"tp": 1, "pp": 1, "vpp": 1, "cp": 1, "dp": 1, "sequence_parallel": False}


@pytest.mark.parametrize("case,needle", [
    ("pointer", "names 'step_000009', which is not a complete checkpoint"),
    ("layout", "actor was saved at TP1/PP1/DP2"),
    ("data", "was saved for a dataset of 7 rows"),
])
def test_resume_errors_come_before_ray(case, needle, inputs, tmp_path, capsys):
    """If this fails, a resume that cannot work starts Ray and the workers and ends in a
    traceback from a worker."""
    out = str(tmp_path / "run")
    n_rows = 60 if case != "data" else 7
    _saved_run(inputs, out, dict(TP1, dp=2) if case == "layout" else TP1, n_rows)
    if case == "pointer":
        open(os.path.join(out, "checkpoints", "latest"), "w").write("step_000009")
    cfg = write_config(str(tmp_path / "sft.yaml"), sft_config(inputs, out))
    # The data check runs in the trainer, after output_dir is claimed (its marker rewritten).
    code_err = run_cli(["train", "sft", cfg, "--resume"], inputs, tmp_path, capsys,
                       output=os.path.join(out, ".megarlhf-output"))
    expect(code_err, 2, needle)


@pytest.mark.parametrize("case,needle", [
    ("layout", "is not one megarlhf reads"),
    ("config", "records a model config megarlhf cannot read"),
])
def test_unreadable_saved_state_is_refused_not_skipped(case, needle, inputs, tmp_path, capsys):
    """If this fails, a checkpoint whose saved layout or model config megarlhf cannot read
    passes the resume checks (they were skipped on any exception) and fails later, in a
    worker."""
    out = str(tmp_path / "run")
    _saved_run(inputs, out, {"bogus": 1} if case == "layout" else TP1, 60)
    if case == "config":
        meta = os.path.join(out, "checkpoints", "step_000002", "actor", "model",
                            "megarlhf_checkpoint.json")
        with open(meta) as f:
            d = json.load(f)
        d["hf_config"] = {"model_type": "no_such_family"}
        with open(meta, "w") as f:
            json.dump(d, f)
    cfg = write_config(str(tmp_path / "sft.yaml"), sft_config(inputs, out))
    code_err = run_cli(["train", "sft", cfg, "--resume"], inputs, tmp_path, capsys,
                       output=os.path.join(out, ".megarlhf-output"))
    expect(code_err, 2, needle)


def test_demo_stages_are_checked_before_the_first_one_runs(inputs, tmp_path, capsys):
    """If this fails, `demo --rl-steps 0` runs SFT and the reward model before refusing."""
    out = tmp_path / "demo"
    expect(run_cli(["demo", "--output-dir", out, "--rl-steps", "0"], inputs, tmp_path, capsys),
           2, "--rl-steps 0")
    assert not out.exists()
    from megarlhf.config import ConfigError
    from megarlhf.demo import check_stages

    with pytest.raises(ConfigError, match="rl_steps=0"):
        check_stages(str(out), rl_steps=0)


# ------------------------------------------- 4. validate and plan refuse what train does
CASES = {
    "fp8 without Transformer Engine": ({"actor.model.fp8": "hybrid", "actor.model.dtype": "bf16"},
                                       "model.fp8=hybrid needs Transformer Engine"),
    "fp8 with local layers": ({"actor.model.fp8": "hybrid", "actor.model.dtype": "bf16",
                               "actor.model.transformer_impl": "local"},
                              "actor.model.transformer_impl=local"),
    "missing data file": ({"data.train_path": "/nonexistent/train.jsonl"},
                          "data.train_path = /nonexistent/train.jsonl: no such file"),
    "missing tokenizer": ({"actor.model.tokenizer": "/nonexistent/tok.model"},
                          "actor.model.tokenizer = /nonexistent/tok.model: no such file"),
    "n_samples_per_prompt=1e9": ({"batch.n_samples_per_prompt": 1e9},
                                 "batch.n_samples_per_prompt"),
    "a role the job does not start": ({"critic": {"num_gpus": 1}},
                                      "critic: this kind=grpo job does not start a critic"),
    "unset data": ({"data.train_path": None}, "data.train_path: not set"),
    "prompt + response past the model's positions": (
        {"rollout.max_new_tokens": 400},
        "data.max_prompt_len + rollout.max_new_tokens = 24 + 400 = 424 tokens, but the actor's "
        "model has 256 positions"),
    "weight sync that never waits": ({"rollout.weight_sync_timeout_s": 0},
                                     "rollout.weight_sync_timeout_s must be > 0"),
    "weight sync without buckets": ({"rollout.weight_sync_bucket_mib": 0},
                                    "rollout.weight_sync_bucket_mib must be >= 1"),
    "async rollout sharing the actor's GPUs": (
        {"asynchronous.enabled": True, "algorithm.use_behaviour_logprobs": True,
         "cluster.placement": "colocate_pairs"}, "set cluster.placement=split"),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("command", ["validate", "plan", "train"])
def test_validate_and_plan_refuse_what_train_refuses(command, case, inputs, tmp_path, capsys):
    """If this fails, `validate` or `plan` accepts a config that `train` refuses (or `train`
    starts it)."""
    over, needle = CASES[case]
    if case == "unset data" and command == "plan":
        pytest.skip("plan lists unset inputs as notes (planning templates have no data)")
    job = set_dotted(grpo_config(inputs, str(tmp_path / "run")), dict(over))
    cfg = write_config(str(tmp_path / "grpo.yaml"), job)
    argv = {"validate": ["validate", cfg], "plan": ["plan", cfg],
            "train": ["train", "grpo", cfg]}[command]
    expect(run_cli(argv, inputs, tmp_path, capsys), 2, needle)
    assert not (tmp_path / "run").exists()


def test_plan_refuses_negative_overhead_and_notes_unset_inputs(inputs, tmp_path, capsys):
    """If this fails, `plan --overhead-gib -50` prints a plan, or plan hides what train needs."""
    cfg = write_config(str(tmp_path / "grpo.yaml"), grpo_config(inputs, str(tmp_path / "r")))
    expect(run_cli(["plan", cfg, "--overhead-gib", "-50"], inputs, tmp_path, capsys), 2,
           "--overhead-gib -50")
    code, err = run_cli(["plan", cfg, "data.train_path=null"], inputs, tmp_path, capsys)
    assert code == 0 and "note: needed to train: data.train_path: not set" in err


# ---------------------------------------------------- 5. messages name what exists, once
def test_messages_name_the_field_once(inputs, tmp_path, capsys):
    """If this fails, a message prints a field path twice (actor.optimizer.optimizer.lr) or
    says "batch sizes must be >= 1" without the field."""
    cfg = write_config(str(tmp_path / "grpo.yaml"), grpo_config(inputs, str(tmp_path / "r")))
    code, err = run_cli(["validate", cfg, "actor.optimizer.lr=-1"], inputs, tmp_path, capsys)
    assert code == 2 and "actor.optimizer.lr must be > 0" in err
    assert "optimizer.optimizer" not in err
    code, err = run_cli(["validate", cfg, "batch.n_samples_per_prompt=0"], inputs, tmp_path,
                        capsys)
    assert code == 2 and "batch.n_samples_per_prompt must be >= 1" in err
    code, err = run_cli(["validate", cfg, "critic.optimizer.adam_eps=0"], inputs, tmp_path,
                        capsys)
    assert code == 2 and "critic.optimizer.adam_eps must be > 0" in err


def test_a_training_checkpoint_is_named_as_such(inputs, tmp_path, capsys):
    """If this fails, a complete training checkpoint is called "not a megarlhf checkpoint"
    and the user is not told that the model is in step_N/<role>/model."""
    out = str(tmp_path / "run")
    _saved_run(inputs, out, TP1, 60)
    step = os.path.join(out, "checkpoints", "step_000002")
    expect(run_cli(["convert", "megatron-to-hf", "--ckpt", step, "--out", tmp_path / "hf"],
                   inputs, tmp_path, capsys), 2, "is a complete training checkpoint",
           os.path.join(step, "actor", "model"))
    expect(run_cli(["convert", "megatron-to-hf", "--ckpt", os.path.join(out, "checkpoints"),
                    "--out", tmp_path / "hf"], inputs, tmp_path, capsys), 2,
           "run's checkpoint directory", os.path.join(step, "actor", "model"))


def test_demo_reruns_only_with_overwrite(inputs, tmp_path, capsys, monkeypatch):
    """If this fails, a second `megarlhf demo` silently replaces the first one's results, or
    --overwrite deletes a file the user put next to them."""
    import megarlhf.controller.sft as sft

    class Stop(Exception):
        pass

    def stop(job):  # the demo got past its checks and its data stage
        raise Stop

    monkeypatch.setattr(sft, "train_sft", stop)
    from megarlhf.demo import run_demo

    out = tmp_path / "demo"
    with pytest.raises(Stop):
        run_demo(str(out), progress=False)
    (out / "my_notes.txt").write_text("keep")
    expect(run_cli(["demo", "--output-dir", out], inputs, tmp_path, capsys), 2,
           f"--output-dir = {out} holds a previous run (data)", "pass --overwrite")
    with pytest.raises(Stop):
        run_demo(str(out), progress=False, overwrite=True)
    assert (out / "my_notes.txt").read_text() == "keep"
    # A file of the user's inside one of the demo's own entries: refused, kept.
    (out / "data" / "my_prompts.txt").write_text("keep too")
    expect(run_cli(["demo", "--output-dir", out, "--overwrite"], inputs, tmp_path, capsys), 2,
           "would delete files megarlhf did not write", "data/my_prompts.txt")
    assert (out / "data" / "my_prompts.txt").read_text() == "keep too"


# ------------------------------------------------------------- 6. issue 30, second round
@pytest.fixture(scope="module")
def top1_moe(tmp_path_factory):
    """A qwen3_moe with one expert per token and renormalised routing weights (every weight
    is 1: megatron-core refuses to build it)."""
    from megarlhf.models.tiny import save_tiny_hf_model, tiny_arch, tiny_moe_fields

    d = str(tmp_path_factory.mktemp("top1") / "m")
    save_tiny_hf_model(d, tiny_arch("qwen3_moe", vocab_size=64, num_layers=2,
                                    **tiny_moe_fields("qwen3_moe", num_experts=4, topk=1)))
    return d


@pytest.mark.parametrize("command", ["convert", "score", "validate"])
def test_a_moe_megatron_cannot_build_is_refused_up_front(command, top1_moe, inputs, tmp_path,
                                                         capsys):
    """If this fails, a top-1 MoE with renormalised weights dies in megatron-core's own check
    (a traceback from a rank) instead of one message naming the field and the fix."""
    (tmp_path / "in.jsonl").write_text('{"input_ids": [1, 2, 3]}\n')
    if command == "convert":
        argv = ["convert", "hf-to-megatron", "--hf-dir", top1_moe, "--out", tmp_path / "c"]
    elif command == "score":
        argv = ["score", "--hf-dir", top1_moe, "--input", tmp_path / "in.jsonl"]
    else:
        job = grpo_config(inputs, str(tmp_path / "run"))
        job["actor"]["model"] = {"arch": json.load(open(os.path.join(top1_moe, "config.json"))),
                                 "tokenizer": inputs["tokenizer"], "dtype": "fp32"}
        argv = ["validate", write_config(str(tmp_path / "g.yaml"), job)]
    expect(run_cli(argv, inputs, tmp_path, capsys), 2,
           "num_experts_per_tok=1 with renormalised routing weights",
           "set norm_topk_prob=false")
    assert not (tmp_path / "c").exists()


WARNINGS = {
    "penalty without a buffer": ({"algorithm.overlong_penalty": 0.5},
                                 "algorithm.overlong_penalty=0.5 does nothing without "
                                 "algorithm.overlong_buffer"),
    "dynamic sampling, no refill": ({"algorithm.dynamic_sampling": True,
                                     "algorithm.dynamic_sampling_max_rounds": 0},
                                    "dynamic_sampling_max_rounds=0 never generates a refill"),
    "gspo on gae": ({"kind": "ppo", "critic": {"num_gpus": 1}, "cluster.gpus_per_node": 3,
                     "algorithm.policy_loss": "gspo",
                     "algorithm.loss_agg_mode": "seq_mean_token_mean"},
                    "algorithm.policy_loss=gspo weights each response by one advantage, the "
                    "mean of its tokens' GAE advantages"),
    "policy-gradient options on dpo": (
        {"kind": "dpo", "reference": {"num_gpus": 1}, "cluster.gpus_per_node": 3,
         "actor.micro_batch_size_per_rank": 8, "algorithm.clip_eps_high": 0.28,
         "algorithm.entropy_coef": 0.01},
        "algorithm.clip_eps_high=0.28, algorithm.entropy_coef=0.01 do nothing here"),
}


@pytest.mark.parametrize("case", sorted(WARNINGS))
@pytest.mark.parametrize("command", ["validate", "plan"])
def test_options_that_do_nothing_are_named_in_a_warning(command, case, inputs, tmp_path,
                                                        capsys):
    """If this fails, a legal setting that does nothing in this job (or averages away what it
    is given) passes `validate` / `plan` without a word; `train` prints the same line."""
    over, needle = WARNINGS[case]
    job = set_dotted(grpo_config(inputs, str(tmp_path / "run")), dict(over))
    cfg = write_config(str(tmp_path / "g.yaml"), job)
    argv = ["validate", cfg, "--quiet"] if command == "validate" else ["plan", cfg]
    code, err = run_cli(argv, inputs, tmp_path, capsys)
    assert code == 0, err
    assert f"megarlhf {command}: warning: " in err and needle in err, err
    # The default config warns about nothing.
    cfg = write_config(str(tmp_path / "ok.yaml"), grpo_config(inputs, str(tmp_path / "run")))
    code, err = run_cli(["validate", cfg, "--quiet"], inputs, tmp_path, capsys)
    assert code == 0 and "warning" not in err, err


def test_train_prints_the_warnings_before_it_starts(inputs, tmp_path, capsys, monkeypatch):
    """If this fails, `train` starts a job with a no-op setting without naming it."""
    import megarlhf.controller.rl as rl_mod

    def stop(job):
        raise AssertionError("reached the trainer")

    monkeypatch.setattr(rl_mod, "train_rl", stop)
    job = set_dotted(grpo_config(inputs, str(tmp_path / "run")),
                     {"algorithm.overlong_penalty": 0.5})
    cfg = write_config(str(tmp_path / "g.yaml"), job)
    from megarlhf.cli import main

    capsys.readouterr()
    with pytest.raises(AssertionError, match="reached the trainer"):
        main(["train", "grpo", cfg])
    assert "megarlhf train: warning: algorithm.overlong_penalty=0.5" in capsys.readouterr().err


def test_resume_of_a_directory_that_never_held_a_run_is_refused(inputs, tmp_path, capsys):
    """If this fails, `--resume` on a new (or empty) output_dir silently trains from step 0:
    a mistyped output_dir restarts a week-long run from scratch."""
    cfg = write_config(str(tmp_path / "sft.yaml"), sft_config(inputs, str(tmp_path / "new")))
    (tmp_path / "empty").mkdir()
    for out in ("new", "empty"):
        expect(run_cli(["train", "sft", cfg, "--resume", f"output_dir={tmp_path / out}"],
                       inputs, tmp_path, capsys), 2,
               f"output_dir = {tmp_path / out} never held a megarlhf run", "drop --resume")
    assert not (tmp_path / "new").exists()


def test_overrides_may_follow_a_flag(inputs, tmp_path, capsys):
    """If this fails, `validate CFG --quiet k=v` (or `train sft CFG --overwrite k=v`) is
    rejected as an unrecognized argument, or the override is silently dropped."""
    cfg = write_config(str(tmp_path / "sft.yaml"), sft_config(inputs, str(tmp_path / "r")))
    expect(run_cli(["validate", cfg, "--quiet", "actor.optimizer.lr=-1"], inputs, tmp_path,
                   capsys), 2, "actor.optimizer.lr")
    code, err = run_cli(["validate", cfg, "train.steps=5", "--quiet", "train.steps=6"],
                        inputs, tmp_path, capsys)
    assert code == 0 and err == "", err
    from megarlhf.cli import main

    with pytest.raises(SystemExit) as e:  # anything else after the flags is still refused
        main(["validate", cfg, "--quiet", "--bogus"])
    assert e.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


AGENT = {"rollout.agent": {"env": "calculator", "max_tokens": 64},
         "reward.sources": {"env": 1.0}}
AGENT_CASES = {
    "unknown environment": ({"rollout.agent.env": "calculatr"},
                            "rollout.agent.env = 'calculatr': not a built-in environment"),
    "environment not importable": ({"rollout.agent.env": "no_such_module:Env"},
                                   "cannot import no_such_module"),
    "options the environment does not take": ({"rollout.agent.options": {"bogus": 1}},
                                              "do not fit CalculatorEnv"),
    "agent rewarded by a verifier only": ({"reward.sources": {"math": 1.0}},
                                          "add reward.sources.env"),
    "no chat template": ({"data.apply_chat_template": False},
                         "set data.apply_chat_template=true"),
    "overlong shaping of a trajectory": ({"algorithm.overlong_buffer": 8},
                                         "set overlong_buffer=null"),
    "trajectory budget below one turn": ({"rollout.agent.max_tokens": 8},
                                         "rollout.agent.max_tokens = 8 is below one turn's"),
    "trajectory past the positions": ({"rollout.agent.max_tokens": 300},
                                      "data.max_prompt_len + rollout.agent.max_tokens = 24 + "
                                      "300 = 324 tokens"),
    "zero turns": ({"rollout.agent.max_turns": 0}, "rollout.agent.max_turns must be >= 1"),
    "environment and program": ({"rollout.agent.program": "agent_programs:solve"},
                                "give exactly one of env"),
    "program not importable": ({"rollout.agent.env": "", "rollout.agent.program":
                                "no_such_module:solve"},
                               "rollout.agent.program = 'no_such_module:solve': cannot import"),
    "program without module": ({"rollout.agent.env": "", "rollout.agent.program": "solve"},
                               "give module:function"),
}


@pytest.mark.parametrize("case", sorted(AGENT_CASES))
@pytest.mark.parametrize("command", ["validate", "train"])
def test_agent_settings_are_refused_before_anything_starts(command, case, inputs, tmp_path,
                                                           capsys):
    """If this fails, a multi-turn agent job with a bad environment, reward or budget starts
    (and fails in the rollout, or trains on the wrong reward) instead of one message."""
    over, needle = AGENT_CASES[case]
    job = set_dotted(grpo_config(inputs, str(tmp_path / "run")),
                     {k: (dict(v) if isinstance(v, dict) else v) for k, v in AGENT.items()})
    job = set_dotted(job, dict(over))
    cfg = write_config(str(tmp_path / "agent.yaml"), job)
    argv = ["validate", cfg] if command == "validate" else ["train", "grpo", cfg]
    expect(run_cli(argv, inputs, tmp_path, capsys), 2, needle)
    assert not (tmp_path / "run").exists()


def test_env_reward_without_an_environment_is_refused(inputs, tmp_path, capsys):
    """If this fails, reward.sources.env on a single-turn job trains on rewards nobody gives."""
    job = set_dotted(grpo_config(inputs, str(tmp_path / "run")), {"reward.sources": {"env": 1.0}})
    cfg = write_config(str(tmp_path / "g.yaml"), job)
    expect(run_cli(["validate", cfg], inputs, tmp_path, capsys), 2,
           "reward.sources uses 'env' (an environment's reward), but there is no environment")
    # the valid agent job passes, asynchronous too (a batch's trajectories share one version)
    job = set_dotted(grpo_config(inputs, str(tmp_path / "run")), dict(AGENT))
    cfg = write_config(str(tmp_path / "ok.yaml"), job)
    code, err = run_cli(["validate", cfg, "--quiet"], inputs, tmp_path, capsys)
    assert code == 0, err
    job = set_dotted(job, {"asynchronous.enabled": True, "cluster.gpus_per_node": 3,
                           "algorithm.use_behaviour_logprobs": True,
                           "cluster.placement": "split"})
    cfg = write_config(str(tmp_path / "async.yaml"), job)
    code, err = run_cli(["validate", cfg, "--quiet"], inputs, tmp_path, capsys)
    assert code == 0, err
