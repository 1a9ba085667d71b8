"""The example configs in examples/ validate (and plan, where a plan applies) once their model
directories exist; only paths are overridden, as a user would on the command line."""

import glob
import os

import pytest

pytestmark = pytest.mark.unit

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "examples", "*.yaml")))

LLAMA3_8B = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256,
             "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 8,
             "max_position_embeddings": 8192, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
             "tie_word_embeddings": False, "hidden_act": "silu"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tokenizer and data files the examples' paths are pointed at (validate reads them)."""
    from _inputs import make_inputs

    return make_inputs(str(tmp_path_factory.mktemp("inputs")))


def _model_dir(path, inputs, head="lm"):
    """An 8B llama directory: config.json, a sparse safetensors file, the test tokenizer."""
    from _inputs import sparse_hf_model

    return sparse_hf_model(str(path), LLAMA3_8B, head=head, tokenizer_from=inputs["lm"])


def test_every_example_is_covered():
    """If this fails, examples/ lost one of its configs (ORM, PRM, best-of-N, async)."""
    names = {os.path.basename(p) for p in EXAMPLES}
    assert {"orm_llama3_8b.yaml", "prm_autolabel_llama3_8b.yaml", "bon_llama3_8b.yaml",
            "async_grpo_llama3_8b.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_example_validates(path, inputs, tmp_path, capsys):
    """If this fails, an example config no longer validates: the docs show a broken command."""
    from megarlhf.cli import main
    from megarlhf.config import load_config

    policy = _model_dir(tmp_path / "sft", inputs)
    rm = _model_dir(tmp_path / "rm", inputs, head="scalar")
    over = [f"actor.model.hf_dir={policy}", f"output_dir={tmp_path / 'out'}"]
    text = open(path).read()
    if "reward_model:" in text:
        over.append(f"reward_model.model.hf_dir={rm}")
    # The data paths of the example, pointed at files of the same kind.
    data = {"train_path": inputs["prompts_train"], "eval_path": inputs["prompts_heldout"],
            "preference_path": inputs["pairs_train"], "labelled_path": inputs["labelled_train"],
            "eval_preference_path": inputs["pairs_train"],
            "eval_labelled_path": inputs["labelled_train"]}
    over += [f"data.{k}={v}" for k, v in data.items() if f"{k}:" in text]
    assert main(["validate", "--quiet", path] + over) == 0, capsys.readouterr()
    job = load_config(path, over)
    assert job.name and job.kind in ("rm", "bon", "grpo", "ppo", "dpo")
