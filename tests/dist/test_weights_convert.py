"""HF <-> megarlhf checkpoint conversion and checkpoint resharding on gloo ranks.

Oracle: the source HF safetensors themselves. Every comparison is exact (``torch.equal``, same
dtype): conversion only moves and casts bits, and HF -> fp32/bf16 parameters -> HF is lossless
when the checkpoint keeps the source dtype.

To stay fast on 2 cores the per-rank work of all cases runs in one 4-rank world
(:func:`rank_convert_and_reload`) through the converters' own per-rank functions
(``prepare_*`` validates and builds the job exactly as ``megarlhf convert`` does); one test
runs the real CLI in subprocesses on a 2-rank conversion.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from megarlhf.platform.launch import run_distributed

pytestmark = pytest.mark.dist

FAMILIES = [
    ("llama_gqa", dict(family="llama"), "lm", torch.float32),
    ("qwen2_qkv_bias", dict(family="qwen2"), "lm", torch.float32),
    ("qwen3_qk_norm", dict(family="qwen3"), "lm", torch.float32),
    ("mistral_bf16", dict(family="mistral"), "lm", torch.bfloat16),
    ("llama_tied_odd_vocab", dict(family="llama", tied=True, vocab_size=251), "lm", torch.float32),
    ("llama_scalar_head", dict(family="llama"), "scalar", torch.float32),
]
TOKENIZER_FILES = {"tokenizer.json": '{"version": "1.0", "model": {"type": "BPE"}}\n',
                   "tokenizer_config.json": '{"model_max_length": 256}\n'}


def _hf_state(d):
    """Every tensor of an HF directory (single file or sharded)."""
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(d, f)))
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from megarlhf.models.tiny import build_hf_model, tiny_arch

    out = {}
    for name, kw, head, dtype in FAMILIES:
        kw = dict(kw)
        d = str(tmp_path_factory.mktemp(name))
        model = build_hf_model(tiny_arch(kw.pop("family"), **kw), seed=7, head=head)
        model.to(dtype).save_pretrained(d, safe_serialization=True)
        for fname, text in TOKENIZER_FILES.items():
            with open(os.path.join(d, fname), "w") as f:
                f.write(text)
        out[name] = d
    return out


def _gather(bundle_fn):
    from megarlhf.weights.resharder import gather_hf_state_dict

    return gather_hf_state_dict(bundle_fn())


def _build(hf_config, head, layout, vocab_multiple=4):
    from megarlhf.config.schema import ModelConfig
    from megarlhf.models.builder import build_model
    from megarlhf.parallel.layout import ParallelLayout, initialize_parallel

    tp, pp, vpp = layout
    world = torch.distributed.get_world_size()
    ctx = initialize_parallel(ParallelLayout.for_world(world, tp=tp, pp=pp, vpp=vpp))
    bundle = build_model(ModelConfig(arch=hf_config, dtype="fp32", vocab_multiple=vocab_multiple),
                         ctx, head=head, init_weights=False)
    for chunk in bundle.unwrapped():  # poison: anything not loaded shows up
        for p in chunk.parameters():
            p.data.fill_(float("nan"))
    return bundle


def _padding_rows(bundle):
    """Sum of |vocabulary padding rows| of this rank's embedding / LM head shards."""
    from megarlhf.weights.mapping import local_params

    total = 0.0
    for lp in local_params(bundle):
        if lp.kind == "vocab":
            rows = lp.param.shape[0]
            start = bundle.ctx.tp_rank * rows
            pad_from = max(0, bundle.spec.vocab_size - start)
            total += float(lp.param.detach()[pad_from:].abs().sum())
    return total


LOAD_LAYOUTS = [(1, 1, 1), (1, 2, 1), (1, 2, 2), (2, 1, 1)]  # in a world of 4: DP 4, 2, 2, 2


def rank_convert_and_reload(jobs, work):
    """All conversions, cross-layout loads and the interrupted save, on every rank."""
    from megarlhf.checkpoint.model import (
        CheckpointError,
        load_model_checkpoint,
        read_checkpoint_meta,
        save_model_checkpoint,
    )
    from megarlhf.checkpoint import convert

    res = {"loads": {}, "padding": {}}
    for name, hf_dir in jobs:
        vpp = 2 if name == "qwen3_qk_norm" else 1  # one VPP conversion
        ck = os.path.join(work, name, "ckpt")
        job = convert.prepare_hf_to_megatron(hf_dir, ck, tp=2, pp=2, vpp=vpp, vocab_multiple=4,
                                             progress=False, tmp_dir=ck + ".tmp-test")
        convert.hf_to_megatron_rank(job)
        out = os.path.join(work, name, "hf")
        shard = "3KB" if name == "llama_gqa" else "5GB"  # many files + index for one model
        job = convert.prepare_megatron_to_hf(ck, out, shard_size=shard, progress=False,
                                             tmp_dir=out + ".tmp-test")
        res[name] = convert.megatron_to_hf_rank(job)

    # A checkpoint saved at TP2/PP2 loads at other TP/PP/VPP/DP layouts (vocab 251 is padded
    # to 256 at TP2 but to 252 at TP1 with vocab_multiple=4; bf16 loads into fp32).
    for name in ("llama_gqa", "llama_tied_odd_vocab", "mistral_bf16", "llama_scalar_head"):
        ck = os.path.join(work, name, "ckpt")
        meta = read_checkpoint_meta(ck)
        for layout in LOAD_LAYOUTS:
            bundle = _build(meta.hf_config, meta.head, layout)
            load_model_checkpoint(bundle, ck)
            res["loads"][(name, layout)] = _gather(lambda: bundle)
    # ... and one saved at TP1 (252 rows) loads at TP2 (256 rows): new padding rows are zero.
    ck1 = os.path.join(work, "tp1_ckpt")
    meta = read_checkpoint_meta(os.path.join(work, "llama_tied_odd_vocab", "ckpt"))
    bundle = _build(meta.hf_config, "lm", (1, 1, 1))
    load_model_checkpoint(bundle, os.path.join(work, "llama_tied_odd_vocab", "ckpt"))
    save_model_checkpoint(bundle, ck1, hf_config=meta.hf_config)
    bundle = _build(meta.hf_config, "lm", (2, 2, 1))
    load_model_checkpoint(bundle, ck1)
    res["padding"] = {"padded_vocab": bundle.padded_vocab_size, "abs": _padding_rows(bundle)}
    res["loads"][("tp1_ckpt", (2, 2, 1))] = _gather(lambda: bundle)

    # An interrupted save (it dies before its metadata file) leaves the previous checkpoint
    # usable, and its temporary directory is refused.
    from megarlhf.checkpoint import model as ckpt_model

    ck = os.path.join(work, "llama_gqa", "ckpt")
    bundle = _build(read_checkpoint_meta(ck).hf_config, "lm", (2, 2, 1))
    load_model_checkpoint(bundle, ck)
    for chunk in bundle.unwrapped():
        for p in chunk.parameters():
            p.data.add_(1.0)  # new weights that must not reach `ck`
    real = ckpt_model._write_marker

    def crash(tmp, meta):
        raise OSError("simulated crash before the metadata file")

    ckpt_model._write_marker = crash
    try:
        save_model_checkpoint(bundle, ck, overwrite=True, tmp_dir=ck + ".tmp-crash")
        res["interrupted"] = "save did not fail"
    except CheckpointError as e:
        res["interrupted"] = str(e)
    finally:
        ckpt_model._write_marker = real
    try:
        read_checkpoint_meta(ck + ".tmp-crash")
        res["tmp_refused"] = None
    except CheckpointError as e:
        res["tmp_refused"] = str(e)
    bundle = _build(read_checkpoint_meta(ck).hf_config, "lm", (1, 2, 1))
    load_model_checkpoint(bundle, ck)
    res["loads"][("after_crash", (1, 2, 1))] = _gather(lambda: bundle)
    return res


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory):
    work = str(tmp_path_factory.mktemp("work"))
    jobs = [(name, sources[name]) for name, *_ in FAMILIES]
    res = run_distributed(rank_convert_and_reload, 4, jobs, work, timeout=400)
    return work, res[0]


@pytest.mark.parametrize("name", [f[0] for f in FAMILIES])
def test_hf_megatron_hf_roundtrip_is_bit_exact(sources, converted, name):
    """If this fails, converting a model of this family to megatron (TP2/PP2) and back changes
    its weights, names, dtype, config or tokenizer files."""
    work, res = converted
    src, out = sources[name], os.path.join(work, name, "hf")
    ref, got = _hf_state(src), _hf_state(out)
    assert list(got) and set(got) == set(ref), set(got) ^ set(ref)
    for n in ref:
        assert got[n].dtype == ref[n].dtype and torch.equal(got[n], ref[n]), n
    with open(os.path.join(src, "config.json")) as f1, open(os.path.join(out, "config.json")) as f2:
        assert json.load(f1) == json.load(f2)
    for fname, text in TOKENIZER_FILES.items():
        with open(os.path.join(out, fname)) as f:
            assert f.read() == text
    assert sorted(os.listdir(os.path.join(work, name))) in (["ckpt", "hf"],
                                                             ["ckpt", "ckpt.tmp-crash", "hf"])
    if name == "llama_gqa":  # 3KB shards: several files and an index, as transformers writes
        with open(os.path.join(out, "model.safetensors.index.json")) as f:
            index = json.load(f)
        files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
        n = len(files)
        assert n == res[name]["files"] > 3
        assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        assert set(index["weight_map"]) == set(ref)
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                      for t in ref.values())
        for f in files:
            sd = load_file(os.path.join(out, f))
            size = sum(t.numel() * t.element_size() for t in sd.values())
            assert size <= 3000 or len(sd) == 1
    else:
        assert os.listdir(out).count("model.safetensors") == 1


def test_checkpoint_loads_at_other_layouts(sources, converted):
    """If this fails, a checkpoint saved at TP2/PP2 gives different weights when loaded at
    TP1/PP1, TP1/PP2/DP2, TP1/PP2/VPP2/DP2 or TP2/DP2 (or mishandles vocab padding / dtype)."""
    work, res = converted
    for (name, layout), got in res["loads"].items():
        src = sources.get(name, sources["llama_tied_odd_vocab"] if name == "tp1_ckpt"
                          else sources["llama_gqa"])
        ref = _hf_state(src)
        assert set(got) == set(ref), (name, layout)
        for n in ref:
            assert torch.equal(got[n], ref[n].float()), (name, layout, n)
    assert res["padding"]["padded_vocab"] == 256  # saved with 252 rows at TP1
    assert res["padding"]["abs"] == 0.0


def test_interrupted_save_keeps_previous_checkpoint(converted):
    """If this fails, a crash while saving can destroy the previous checkpoint or leave a
    partial one that loads."""
    work, res = converted
    assert "failed in its last step" in res["interrupted"], res["interrupted"]
    assert res["tmp_refused"] and "interrupted save" in res["tmp_refused"]
    # The weights after the crash are the original ones (checked with the other loads above).
    assert ("after_crash", (1, 2, 1)) in res["loads"]


def test_cli_end_to_end(sources, tmp_path, capsys, monkeypatch):
    """If this fails, `megarlhf convert` (or the tools/ scripts) do not work from a shell."""
    import runpy

    from megarlhf.cli import main

    src = sources["qwen2_qkv_bias"]
    ck, out = str(tmp_path / "ck"), str(tmp_path / "hf")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "megarlhf.cli", "convert", "hf-to-megatron",
                        "--hf-dir", src, "--out", ck, "--tp", "2", "--quiet"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # The tools/ script, in this process (the same entry point; one interpreter start is enough).
    monkeypatch.setattr(sys, "argv", ["convert_megatron_to_hf.py", "--ckpt", ck, "--out", out,
                                      "--dtype", "bf16", "--pp", "2", "--tp", "1"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(root, "tools", "convert_megatron_to_hf.py"),
                       run_name="__main__")
    assert e.value.code == 0
    assert "wrote" in capsys.readouterr().out
    ref, got = _hf_state(src), _hf_state(out)
    assert set(got) == set(ref)
    for n in ref:
        assert got[n].dtype == torch.bfloat16 and torch.equal(got[n], ref[n].bfloat16()), n
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["dtype"] == "bfloat16"
    # A bad request fails with a message and exit code 2, before any work.
    assert main(["convert", "hf-to-megatron", "--hf-dir", src, "--out", str(tmp_path / "x"),
                 "--tp", "3"]) == 2
    assert "not divisible by --tp 3" in capsys.readouterr().err
    assert main(["convert", "megatron-to-hf", "--ckpt", str(tmp_path / "nope"), "--out",
                 str(tmp_path / "y")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "y")
