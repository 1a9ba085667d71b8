"""Validation of conversion inputs on deliberately broken checkpoints, single-process.

Each broken HF directory must be refused by ``convert_hf_to_megatron`` *before* any rank
starts or anything is written, with a message naming the problem; each broken megarlhf
checkpoint must be refused by ``read_checkpoint_meta`` (which every load runs first).
"""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from megarlhf.checkpoint.model import (
    FORMAT,
    FORMAT_VERSION,
    MARKER,
    CheckpointError,
    read_checkpoint_meta,
)
from megarlhf.checkpoint.convert import ConversionError, convert_hf_to_megatron, hf_export_config
from megarlhf.weights.validate import HFValidationError, inspect_hf_dir


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    from megarlhf.models.tiny import save_tiny_hf_model, tiny_arch

    d = str(tmp_path_factory.mktemp("good"))
    save_tiny_hf_model(d, tiny_arch("llama", num_layers=2), seed=0)
    return d


def _variant(good_dir, tmp_path, edit_weights=None, edit_config=None):
    d = str(tmp_path / "broken")
    shutil.copytree(good_dir, d)
    if edit_weights:
        path = os.path.join(d, "model.safetensors")
        sd = load_file(path)
        edit_weights(sd)
        save_file(sd, path, metadata={"format": "pt"})
    if edit_config:
        path = os.path.join(d, "config.json")
        with open(path) as f:
            cfg = json.load(f)
        edit_config(cfg)
        with open(path, "w") as f:
            json.dump(cfg, f)
    return d


def _refused(d, tmp_path, *needles, **kw):
    out = str(tmp_path / "out")
    with pytest.raises((HFValidationError, ConversionError)) as e:
        convert_hf_to_megatron(d, out, tp=2, pp=2, progress=False, **kw)
    assert not os.path.exists(out), "something was written before validation failed"
    for n in needles:
        assert n in str(e.value), (n, str(e.value))
    return str(e.value)


def test_valid_directory_passes(good_dir):
    """If this fails, a correct HF checkpoint is refused (or its head/dtype misread)."""
    info = inspect_hf_dir(good_dir)
    assert info.head == "lm" and info.dtype == torch.float32
    assert info.spec.num_layers == 2 and info.raw_config["model_type"] == "llama"


def test_missing_tensor(good_dir, tmp_path):
    """If this fails, a checkpoint missing a tensor converts silently into a partial model."""
    d = _variant(good_dir, tmp_path,
                 edit_weights=lambda sd: sd.pop("model.layers.1.mlp.down_proj.weight"))
    _refused(d, tmp_path, "missing tensors", "model.layers.1.mlp.down_proj.weight")


def test_unexpected_tensor(good_dir, tmp_path):
    """If this fails, weights the architecture does not know are dropped silently."""
    d = _variant(good_dir, tmp_path,
                 edit_weights=lambda sd: sd.update({"model.layers.5.extra.weight": torch.ones(3)}))
    _refused(d, tmp_path, "unexpected tensors", "model.layers.5.extra.weight")


def test_wrong_shape(good_dir, tmp_path):
    """If this fails, a tensor of the wrong shape gets reshaped or cut into the model."""
    def edit(sd):
        sd["model.layers.0.mlp.down_proj.weight"] = torch.zeros(64, 100)
    d = _variant(good_dir, tmp_path, edit_weights=edit)
    _refused(d, tmp_path, "wrong shape", "model.layers.0.mlp.down_proj.weight", "(64, 100)")


def test_config_with_wrong_head_count(good_dir, tmp_path):
    """If this fails, a config whose attention heads disagree with the weights is not caught."""
    d = _variant(good_dir, tmp_path,
                 edit_config=lambda c: c.update(num_attention_heads=8, head_dim=16))
    _refused(d, tmp_path, "attention heads", "num_attention_heads=8", "= 4 heads of head_dim 16")


def test_config_with_wrong_query_groups(good_dir, tmp_path):
    """If this fails, a GQA config with the wrong num_key_value_heads is not caught."""
    d = _variant(good_dir, tmp_path, edit_config=lambda c: c.update(num_key_value_heads=4))
    _refused(d, tmp_path, "query groups", "num_key_value_heads=4",
             "= 2 key/value heads of head_dim 16")


def test_config_with_wrong_vocab_and_hidden(good_dir, tmp_path):
    """If this fails, a vocabulary or hidden-size mismatch between config and weights passes."""
    d = _variant(good_dir, tmp_path, edit_config=lambda c: c.update(vocab_size=300))
    _refused(d, tmp_path, "vocabulary", "vocab_size=300", "256 rows")
    shutil.rmtree(d)
    d = _variant(good_dir, tmp_path,
                 edit_config=lambda c: c.update(hidden_size=128, head_dim=16))
    _refused(d, tmp_path, "hidden size", "hidden_size=128", "64 columns")


def test_unsupported_architecture(good_dir, tmp_path):
    """If this fails, an unsupported model family or head class would be converted wrongly."""
    d = _variant(good_dir, tmp_path, edit_config=lambda c: c.update(model_type="gpt2"))
    _refused(d, tmp_path, "unsupported architecture", "gpt2")
    shutil.rmtree(d)
    d = _variant(good_dir, tmp_path,
                 edit_config=lambda c: c.update(architectures=["LlamaForTokenClassification"]))
    _refused(d, tmp_path, "LlamaForTokenClassification", "not supported")
    shutil.rmtree(d)
    d = _variant(good_dir, tmp_path, edit_config=lambda c: c.update(hidden_act="gelu"))
    _refused(d, tmp_path, "hidden_act")


def test_impossible_layout_and_existing_output(good_dir, tmp_path):
    """If this fails, a layout megatron cannot build (or an existing output) is found late."""
    out = str(tmp_path / "o")
    with pytest.raises(ConversionError, match="2 query groups .* not divisible by --tp 4"):
        convert_hf_to_megatron(good_dir, out, tp=4, progress=False)
    with pytest.raises(ConversionError, match="2 layers are not divisible by pp\\*vpp = 4"):
        convert_hf_to_megatron(good_dir, out, pp=2, vpp=2, progress=False)
    os.makedirs(out)
    with open(os.path.join(out, "notes.txt"), "w") as f:
        f.write("not megarlhf's")
    for overwrite in (False, True):  # a folder megarlhf did not write is never replaced
        with pytest.raises(ConversionError, match="did not write \\(notes.txt\\)"):
            convert_hf_to_megatron(good_dir, out, progress=False, overwrite=overwrite)
    assert os.listdir(out) == ["notes.txt"]
    with pytest.raises(ConversionError, match="is --hf-dir"):
        convert_hf_to_megatron(good_dir, good_dir, progress=False, overwrite=True)


def _fake_checkpoint(d):
    os.makedirs(os.path.join(d, "model"))
    with open(os.path.join(d, "model", "__0_0.distcp"), "wb") as f:
        f.write(b"x" * 10)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "hf_config": {}, "head": "lm",
            "padded_vocab_size": 256, "vocab_size": 256, "dtype": "float32",
            "layout": {"tp": 1, "pp": 1, "vpp": 1, "cp": 1, "dp": 1},
            "files": {os.path.join("model", "__0_0.distcp"): 10}}
    with open(os.path.join(d, MARKER), "w") as f:
        json.dump(meta, f)
    return meta


def test_incomplete_or_corrupt_checkpoint_is_refused(tmp_path):
    """If this fails, a half-written or damaged checkpoint could be loaded as if it were whole."""
    d = str(tmp_path / "ck")
    meta = _fake_checkpoint(d)
    assert read_checkpoint_meta(d).padded_vocab_size == 256

    with pytest.raises(CheckpointError, match="no such checkpoint"):
        read_checkpoint_meta(str(tmp_path / "nothing"))
    tmp = str(tmp_path / "ck.tmp-123")
    shutil.copytree(d, tmp)
    os.remove(os.path.join(tmp, MARKER))
    with pytest.raises(CheckpointError, match="interrupted save"):
        read_checkpoint_meta(tmp)
    with open(os.path.join(d, "model", "__0_0.distcp"), "ab") as f:
        f.write(b"y")
    with pytest.raises(CheckpointError, match="corrupt: .*__0_0.distcp has 11 bytes, expected 10"):
        read_checkpoint_meta(d)
    os.remove(os.path.join(d, "model", "__0_0.distcp"))
    with pytest.raises(CheckpointError, match="__0_0.distcp is missing"):
        read_checkpoint_meta(d)
    with open(os.path.join(d, MARKER), "w") as f:
        f.write("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        read_checkpoint_meta(d)
    with open(os.path.join(d, MARKER), "w") as f:
        json.dump(dict(meta, format_version=99), f)
    with pytest.raises(CheckpointError, match="format version 99"):
        read_checkpoint_meta(d)


def test_export_config_names_the_head_class():
    """If this fails, exported reward models load in transformers as the wrong class."""
    src = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "dtype": "float32"}
    lm = hf_export_config(src, "lm", torch.bfloat16)
    assert lm["architectures"] == ["Qwen2ForCausalLM"] and lm["dtype"] == "bfloat16"
    rm = hf_export_config(src, "scalar", torch.float32)
    assert rm["architectures"] == ["Qwen2ForSequenceClassification"]
    assert rm["id2label"] == {"0": "LABEL_0"}
    assert hf_export_config({"model_type": "llama"}, "lm", torch.float32)["architectures"] == \
        ["LlamaForCausalLM"]
