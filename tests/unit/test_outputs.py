"""megarlhf/checkpoint/outputs.py: what megarlhf may write where (issue 15).

Each rule is checked on real directories; every test also asserts that nothing it did not mean
to replace was touched.
"""

import json
import os

import pytest

from megarlhf.checkpoint import outputs as O
from megarlhf.config import from_dict
from megarlhf.config.schema import JobConfig
from megarlhf.models.tiny import tiny_arch

pytestmark = pytest.mark.unit

ARCH = tiny_arch("llama", num_layers=2, hidden_size=64, num_heads=2, num_kv_heads=2)


def snapshot(root, skip=()):
    """path -> (size, mtime_ns, content) of every file under ``root`` outside ``skip``."""
    out = {}
    for d, dirs, files in os.walk(root):
        if any(O.relation(d, s) in ("equal", "inside") for s in skip):
            continue
        for f in files:
            p = os.path.join(d, f)
            if any(O.relation(p, s) in ("equal", "inside") for s in skip):
                continue
            st = os.stat(p)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns, fh.read())
    return out


def job(tmp_path, **over):
    d = {"kind": "sft", "output_dir": str(tmp_path / "run"),
         "cluster": {"num_nodes": 1, "gpus_per_node": 1},
         "actor": {"model": {"arch": dict(ARCH), "tokenizer": str(tmp_path / "tok.model")}},
         "data": {"train_path": str(tmp_path / "sft.jsonl")}}
    for k, v in over.items():
        node = d
        parts = k.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return from_dict(JobConfig, d)


def _fake_step(root, step, *, layout, complete=True, roles=("actor",), arch=ARCH):
    d = os.path.join(root, f"step_{step:06d}")
    for role in roles:
        m = os.path.join(d, role, "model")
        os.makedirs(m, exist_ok=True)
        with open(os.path.join(m, "megarlhf_checkpoint.json"), "w") as f:
            json.dump({"format": "megarlhf.model_checkpoint", "format_version": 1,
                       "hf_config": arch, "head": "lm", "padded_vocab_size": 256,
                       "vocab_size": 256, "dtype": "float32", "layout": layout,
                       "files": {}}, f)
    with open(os.path.join(d, "driver_state.json"), "w") as f:
        json.dump({"step": step, "sampler": {"num_samples": 10, "seed": 0, "epoch": 0,
                                             "index": 3}}, f)
    if complete:
        open(os.path.join(d, "COMPLETE"), "w").write("x")
    return d


TP1 = {"tp": 1, "pp": 1, "vpp": 1, "cp": 1, "dp": 1, "sequence_parallel": False}


def previous_run(out, *, marker=True):
    """A finished run as megarlhf leaves it (checkpoints, hf/, logs)."""
    _fake_step(os.path.join(out, "checkpoints"), 2, layout=TP1)
    open(os.path.join(out, "checkpoints", "latest"), "w").write("step_000002")
    os.makedirs(os.path.join(out, "hf"), exist_ok=True)
    open(os.path.join(out, "hf", "model.safetensors"), "w").write("weights")
    open(os.path.join(out, "config.yaml"), "w").write("kind: sft\nactor: {}\noutput_dir: x\n")
    if marker:
        O.write_marker(out, "train sft")


def test_relation_and_overlap(tmp_path):
    """If this fails, an output equal to, inside or containing an input is not recognised (a
    run would overwrite the model or data it reads)."""
    a, b = str(tmp_path / "a"), str(tmp_path / "a" / "b")
    assert O.relation(a, a) == "equal" and O.relation(b, a) == "inside"
    assert O.relation(a, b) == "contains" and O.relation(a, str(tmp_path / "ab")) is None
    os.symlink(a, tmp_path / "link")
    assert O.relation(str(tmp_path / "link" / "b"), b) == "equal"  # through a symlink
    errs = O.overlap_errors({"--out": b}, {"--hf-dir": a})
    assert errs and "--out" in errs[0] and "is inside --hf-dir" in errs[0]


def test_new_or_empty_output_dir_is_claimed_and_marked(tmp_path):
    """If this fails, a fresh run cannot start, or its directory is not marked as megarlhf's
    (and could never be resumed or overwritten)."""
    j = job(tmp_path)
    assert O.run_dir_errors(j) == []
    out = O.claim_run_dir(j)
    assert O.read_marker(out)["writer"] == "train sft"
    os.makedirs(tmp_path / "empty")
    assert O.run_dir_errors(job(tmp_path, output_dir=str(tmp_path / "empty"))) == []


def test_previous_run_needs_resume_or_overwrite(tmp_path):
    """If this fails, a new run silently replaces a finished run's checkpoints and hf/."""
    j = job(tmp_path)
    previous_run(j.output_dir)
    before = snapshot(tmp_path)
    errs = O.run_dir_errors(j)
    assert len(errs) == 1 and "holds a previous run" in errs[0] and "--resume" in errs[0] \
        and "--overwrite" in errs[0]
    with pytest.raises(O.OutputError, match="previous run"):
        O.claim_run_dir(j)
    assert snapshot(tmp_path) == before
    assert O.run_dir_errors(job(tmp_path, **{"checkpoint.resume": True})) == []


def test_overwrite_replaces_only_megarlhf_entries(tmp_path):
    """If this fails, --overwrite deletes files megarlhf did not write inside an output_dir."""
    j = job(tmp_path, **{"checkpoint.overwrite": True})
    previous_run(j.output_dir)
    open(os.path.join(j.output_dir, "notes.txt"), "w").write("mine")
    O.claim_run_dir(j)
    left = sorted(os.listdir(j.output_dir))
    assert left == [O.MARKER, "notes.txt"]
    assert open(os.path.join(j.output_dir, "notes.txt")).read() == "mine"


def test_foreign_directory_is_refused_whatever_the_flags(tmp_path):
    """If this fails, a run (even with --overwrite) writes into or deletes a user's folder."""
    out = tmp_path / "docs"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    (out / "hf").mkdir()  # even a name megarlhf uses: the folder is not megarlhf's
    before = snapshot(tmp_path)
    for flags in ({}, {"checkpoint.overwrite": True}, {"checkpoint.resume": True}):
        j = job(tmp_path, output_dir=str(out), **flags)
        with pytest.raises(O.OutputError, match="did not write .*thesis.tex"):
            O.claim_run_dir(j)
    assert snapshot(tmp_path) == before


def test_legacy_run_without_marker_is_recognised(tmp_path):
    """If this fails, runs written before the marker existed can no longer be resumed."""
    j = job(tmp_path, **{"checkpoint.resume": True})
    previous_run(j.output_dir, marker=False)
    with open(os.path.join(j.output_dir, "config.yaml"), "w") as f:
        f.write("kind: sft\nactor: {}\noutput_dir: run\n")
    assert O.run_dir_errors(j) == []


def test_input_inside_output_is_refused(tmp_path):
    """If this fails, a GRPO job reading <output_dir>/hf with the same output_dir deletes the
    SFT run and overwrites the model it reads (the README's flow with one output_dir)."""
    out = tmp_path / "run"
    previous_run(str(out))
    j = from_dict(JobConfig, {"kind": "grpo", "output_dir": str(out),
                              "actor": {"model": {"hf_dir": str(out / "hf")}},
                              "checkpoint": {"overwrite": True}})
    before = snapshot(tmp_path)
    with pytest.raises(O.OutputError, match="output_dir = .* contains actor.model.hf_dir"):
        O.claim_run_dir(j)
    assert snapshot(tmp_path) == before


def test_separate_checkpoint_dir_is_checked_too(tmp_path):
    """If this fails, checkpoint.dir pointing at a user's folder gets step directories (and
    their pruning) in it."""
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "data.csv").write_text("1,2")
    j = job(tmp_path, **{"checkpoint.dir": str(ck)})
    errs = O.run_dir_errors(j)
    assert errs and "checkpoint.dir" in errs[0] and "data.csv" in errs[0]


def test_whole_directory_targets(tmp_path):
    """If this fails, `convert --overwrite` deletes a folder megarlhf did not write, or cannot
    replace its own earlier output."""
    src = str(tmp_path / "src")
    os.makedirs(src)
    assert O.check_target(str(tmp_path / "new"), what="--out", inputs={"--hf-dir": src},
                          overwrite=False) is False
    os.makedirs(tmp_path / "empty")
    assert O.check_target(str(tmp_path / "empty"), what="--out", inputs={}, overwrite=False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "a.bin").write_text("x")
    with pytest.raises(O.OutputError, match="did not write"):
        O.check_target(str(foreign), what="--out", inputs={}, overwrite=True)
    own = tmp_path / "own"
    (own / "sub").mkdir(parents=True)
    (own / "model.safetensors").write_text("x")
    (own / "sub" / "shard.bin").write_text("x")
    O.write_marker(str(own), "convert", files=["model.safetensors", "sub/shard.bin"])
    with pytest.raises(O.OutputError, match="pass --overwrite"):
        O.check_target(str(own), what="--out", inputs={}, overwrite=False)
    assert O.check_target(str(own), what="--out", inputs={}, overwrite=True)
    # A file the user added to megarlhf's output, at any depth: refused, named.
    (own / "sub" / "notes.txt").write_text("mine")
    with pytest.raises(O.OutputError, match=r"did not write \(sub/notes.txt\)"):
        O.check_target(str(own), what="--out", inputs={}, overwrite=True)
    # An older output that recorded no files: refused (cannot tell them apart), not deleted.
    old = tmp_path / "old"
    old.mkdir()
    (old / "model.safetensors").write_text("x")
    O.write_marker(str(old), "convert")
    with pytest.raises(O.OutputError, match="did not record its files"):
        O.check_target(str(old), what="--out", inputs={}, overwrite=True)
    with pytest.raises(O.OutputError, match="--out = .* is --hf-dir"):
        O.check_target(src, what="--out", inputs={"--hf-dir": src}, overwrite=True)
    run = tmp_path / "run"  # a whole training run is never replaced by one model
    previous_run(str(run))
    with pytest.raises(O.OutputError, match="directory of a megarlhf run"):
        O.check_target(str(run), what="--out", inputs={}, overwrite=True)


def test_file_targets(tmp_path):
    """If this fails, `score --output` replaces a user's file or its own input."""
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"input_ids": [1]}\n')
    ours = lambda p: "logprobs" in open(p).read()  # noqa: E731
    assert O.file_target_errors(str(inp), what="--output", inputs={"--input": str(inp)},
                                overwrite=True, ours=ours)[0].startswith("--output = ")
    mine = tmp_path / "mine.jsonl"
    mine.write_text("precious")
    assert "not a megarlhf output" in O.file_target_errors(
        str(mine), what="--output", inputs={}, overwrite=True, ours=ours)[0]
    old = tmp_path / "old.jsonl"
    old.write_text('{"input_ids": [1], "logprobs": [0.0]}\n')
    assert O.file_target_errors(str(old), what="--output", inputs={}, overwrite=True,
                                ours=ours) == []
    assert "pass --overwrite" in O.file_target_errors(str(old), what="--output", inputs={},
                                                      overwrite=False, ours=ours)[0]


def test_resume_pointer_roles_layout_and_data_are_checked(tmp_path):
    """If this fails, a resume that cannot work is found after Ray and the workers started
    (a traceback from a worker) instead of before anything starts."""
    j = job(tmp_path, **{"checkpoint.resume": True})
    root = O.checkpoint_root(j)
    _fake_step(root, 2, layout=TP1)
    _fake_step(root, 4, layout=TP1, complete=False)
    O.write_marker(j.output_dir, "train sft")
    with open(os.path.join(root, "latest"), "w") as f:
        f.write("step_000004")
    errs = O.run_dir_errors(j)
    assert len(errs) == 1 and "not a complete checkpoint" in errs[0] and "step_000002" in errs[0]
    with open(os.path.join(root, "latest"), "w") as f:
        f.write("step_000002")
    assert O.run_dir_errors(j) == []
    # Another layout than the saved one: the optimizer state cannot be resumed.
    j2 = job(tmp_path, **{"checkpoint.resume": True, "actor.num_gpus": 2, "actor.parallel":
                          {"tp": 2}, "cluster.gpus_per_node": 2})
    errs = O.run_dir_errors(j2)
    assert len(errs) == 1 and "saved at TP1/PP1/DP1" in errs[0] and "TP2/PP1/DP1" in errs[0] \
        and "actor.parallel" in errs[0]
    # Another model.
    j3 = job(tmp_path, **{"checkpoint.resume": True,
                          "actor.model.arch": dict(ARCH, num_hidden_layers=4)})
    assert "num_layers: saved 2, config 4" in O.run_dir_errors(j3)[0]
    # Changed data: the sampler state was saved for 10 rows.
    with pytest.raises(O.OutputError, match="dataset of 10 rows .* now has 12"):
        O.check_resume_data(j, {"sampler": 12})
    O.check_resume_data(j, {"sampler": 10})
