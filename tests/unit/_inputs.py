"""Small real inputs for the bad-input tests (issue 15): a sentencepiece tokenizer, a tiny HF
model, data files, a config writer, and a snapshot of a directory tree to prove that nothing
outside a command's output was touched. A plain module (imported by name from the tests)."""

import hashlib
import os

import yaml


def make_inputs(root: str) -> dict:
    """Tokenizer, tiny llama (vocab 64 >= the tokenizer's), demo-task data, in ``root``."""
    from megarlhf.data.demo_task import ArithmeticTask, write_demo_data
    from megarlhf.data.tokenizer import ChatTemplate, train_sentencepiece
    from megarlhf.models.tiny import save_tiny_hf_model, tiny_arch

    task = ArithmeticTask()
    data = os.path.join(root, "data")
    files = {k: str(v) for k, v in write_demo_data(data, task, seed=0, n_train=60,
                                                   n_heldout=10).items()}
    problems = task.problems("train", 200, 0)
    tok = train_sentencepiece([p.prompt + p.solution for p in problems],
                              os.path.join(data, "tokenizer"), vocab_size=64,
                              required_chars="0123456789+-*=answr: ",
                              chat_template=ChatTemplate.plain())
    files["tokenizer"] = os.path.join(data, "tokenizer.model")
    files["tok_vocab"] = tok.vocab_size
    arch = tiny_arch("llama", vocab_size=64, hidden_size=64, num_heads=2, num_kv_heads=2,
                     num_layers=2, ffn=128, max_pos=256)
    files["arch"] = arch
    lm = os.path.join(root, "lm")
    save_tiny_hf_model(lm, arch)
    tok.export_hf(lm)
    files["lm"] = lm
    return files


def sft_config(inputs: dict, out: str, **over) -> dict:
    job = {"kind": "sft", "name": "t", "output_dir": out, "seed": 1,
           "cluster": {"num_nodes": 1, "gpus_per_node": 1, "device": "cpu"},
           "actor": {"model": {"hf_dir": inputs["lm"], "dtype": "fp32"}, "num_gpus": 1,
                     "micro_batch_size_per_rank": 4,
                     "optimizer": {"lr": 1e-3, "use_distributed_optimizer": False}},
           "train": {"steps": 3, "global_batch_size": 4, "max_seq_len": 64},
           "data": {"train_path": inputs["sft_train"], "max_prompt_len": 32},
           "logging": {"progress_bar": False, "tensorboard": False}}
    return set_dotted(job, over)


def grpo_config(inputs: dict, out: str, **over) -> dict:
    job = {"kind": "grpo", "name": "t", "output_dir": out, "seed": 1,
           "cluster": {"num_nodes": 1, "gpus_per_node": 2, "device": "cpu"},
           "actor": {"model": {"hf_dir": inputs["lm"], "dtype": "fp32"}, "num_gpus": 1,
                     "micro_batch_size_per_rank": 16,
                     "optimizer": {"lr": 1e-4, "use_distributed_optimizer": False}},
           "rollout": {"engine": "hf", "num_gpus": 1, "max_new_tokens": 16},
           "batch": {"rollout_prompts_global": 4, "train_prompts_global": 4,
                     "n_samples_per_prompt": 4},
           "train": {"steps": 2},
           "data": {"train_path": inputs["prompts_train"], "max_prompt_len": 24},
           "logging": {"progress_bar": False, "tensorboard": False}}
    return set_dotted(job, over)


def set_dotted(job: dict, over: dict) -> dict:
    for k, v in over.items():
        node = job
        parts = k.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return job


def write_config(path: str, job: dict) -> str:
    with open(path, "w") as f:
        yaml.safe_dump(job, f)
    return path


def snapshot(root: str, skip: tuple = ()) -> dict:
    """path -> (size, mtime_ns, sha256) of every file and directory under ``root``, except
    those at or under a path in ``skip`` (the command's own output)."""
    skip = tuple(os.path.realpath(s) for s in skip)

    def skipped(p):
        rp = os.path.realpath(p)
        return any(rp == s or rp.startswith(s + os.sep) for s in skip)

    out = {}
    for d, dirs, files in os.walk(root):
        if skipped(d):
            continue
        out[os.path.relpath(d, root) + "/"] = tuple(sorted(
            n for n in dirs + files if not skipped(os.path.join(d, n))))
        for f in files:
            p = os.path.join(d, f)
            if skipped(p):
                continue
            st = os.stat(p)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns,
                                                 hashlib.sha256(fh.read()).hexdigest())
    return out


def sparse_hf_model(out: str, arch: dict, head: str = "lm", tokenizer_from: str | None = None
                    ) -> str:
    """An HF model directory of any size whose safetensors file is sparse: a real header (names,
    shapes, bf16) over a hole, so config and header checks pass without gigabytes of disk.
    With ``tokenizer_from`` (an HF directory) its tokenizer files are copied in."""
    import json
    import shutil
    import struct

    from megarlhf.models.arch import hf_config_from_dict
    from megarlhf.models.families import arch_spec
    from megarlhf.weights.validate import expected_hf_shapes

    os.makedirs(out, exist_ok=True)
    cfg = dict(arch)
    if head == "scalar":
        cfg.update(architectures=[cfg["model_type"].capitalize() + "ForSequenceClassification"],
                   num_labels=1)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f)
    spec = arch_spec(hf_config_from_dict(arch))
    if head == "scalar":
        from dataclasses import replace

        spec = replace(spec, tie_word_embeddings=False)
    header, offset = {}, 0
    for name, shape in expected_hf_shapes(spec, head).items():
        n = 2
        for d in shape:
            n *= d
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(os.path.join(out, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)  # a hole: no blocks on disk
    if tokenizer_from is not None:
        for name in os.listdir(tokenizer_from):
            if name.startswith("tokenizer") or name.endswith(".jinja"):
                shutil.copy(os.path.join(tokenizer_from, name), out)
    return out
