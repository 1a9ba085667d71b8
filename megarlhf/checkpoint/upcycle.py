"""Sparse upcycling: a dense Llama/Mistral HF checkpoint -> a Mixtral checkpoint whose experts
are copies of the dense MLP (Komatsuzaki et al. 2022, "Sparse Upcycling: Training
Mixture-of-Experts from Dense Checkpoints"; megatron-core's ``moe/upcycling_utils`` does the
same on megatron checkpoints).

Mixtral renormalises its top-k routing weights to sum to 1, so with identical experts the
upcycled model computes exactly the dense model's function whatever the router says: it starts
with the dense model's quality, and training (the aux loss, then diverging expert updates)
breaks the symmetry. The router gets a small random init (``router_std``).

Output: ``config.json`` (``MixtralForCausalLM``, ``sliding_window: null``), one
``model.safetensors`` with the checkpoint's per-expert names
(``block_sparse_moe.experts.{e}.w1/w2/w3``: gate, down, up), and the source's tokenizer files.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from megarlhf.checkpoint.atomic import publish, temp_dir_for
from megarlhf.checkpoint.outputs import OutputError, check_target
from megarlhf.models.arch import ArchError, hf_config_from_dict
from megarlhf.models.families import UnsupportedArchitecture, arch_spec
from megarlhf.weights.hf_io import HFCheckpointReader
from megarlhf.weights.validate import inspect_hf_dir

_DENSE_TYPES = ("llama", "mistral")
_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".index.json")


def _read_dense(src_dir: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """The dense source's config.json and tensors, after the checks every conversion runs
    (:func:`megarlhf.weights.validate.inspect_hf_dir`: a readable config of a supported
    family, readable safetensors whose names and shapes match it)."""
    info = inspect_hf_dir(src_dir, head="lm")
    cfg = info.raw_config
    mt = cfg.get("model_type")
    if mt not in _DENSE_TYPES:
        raise ValueError(
            f"upcycle: {src_dir} is a {mt!r} model; upcycling into Mixtral takes a dense "
            f"{' or '.join(_DENSE_TYPES)} model (same attention, a SwiGLU MLP to copy)")
    if cfg.get("mlp_bias") or cfg.get("attention_bias"):
        raise ValueError("upcycle: biased MLP/attention layers have no Mixtral counterpart")
    reader = HFCheckpointReader(src_dir)
    return cfg, {name: reader.get(name) for name in info.names}


def _rope_parameters(src_dir: str) -> dict:
    """The source's RoPE as transformers reads it (``rope_parameters``: type, theta and
    scaling, whether the file says ``rope_parameters`` or the older ``rope_scaling`` +
    ``rope_theta`` of Llama-3.x checkpoints)."""
    from transformers import AutoConfig

    rope = getattr(AutoConfig.from_pretrained(src_dir), "rope_parameters", None)
    if not isinstance(rope, dict) or "rope_theta" not in rope:
        raise ValueError(f"upcycle: transformers reads no rope_parameters from {src_dir}'s "
                         f"config ({rope!r}); the RoPE could not be carried over")
    return {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool)
                and k != "original_max_position_embeddings" else v) for k, v in rope.items()}


def _check_buildable(mix: dict) -> None:
    """Refuses a Mixtral config megarlhf would not load (top-1 routing, ...), naming the
    upcycle option that produced it, before anything is written."""
    try:
        arch_spec(hf_config_from_dict(dict(mix)))
    except (ArchError, UnsupportedArchitecture) as e:
        raise ValueError(f"upcycle: megarlhf could not load the Mixtral this would write "
                         f"(--experts {mix['num_local_experts']}, --topk "
                         f"{mix['num_experts_per_tok']}): {e}; nothing was written") from None


def upcycle_to_mixtral(
    src_dir: str,
    out_dir: str,
    *,
    num_experts: int = 8,
    topk: int = 2,
    router_std: float = 0.02,
    router_aux_loss_coef: float = 0.01,
    seed: int = 0,
    overwrite: bool = False,
) -> str:
    """Writes the upcycled Mixtral checkpoint of the dense model in ``src_dir`` to ``out_dir``
    (new, empty, or - with ``overwrite`` - an earlier megarlhf output holding only its own
    files); returns ``out_dir``. Everything is checked before anything is written: the source
    (:func:`_read_dense`), ``out_dir`` apart from it, and that megarlhf builds the Mixtral
    config it is about to write.

    Raises:
        ValueError: the first problem found (:class:`~megarlhf.weights.validate.HFValidationError`
            for the source), naming what to change.
    """
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"upcycle: num_experts must be a positive integer, got {num_experts!r}")
    if not isinstance(topk, int) or not 1 <= topk <= num_experts:
        raise ValueError(f"upcycle: topk must be an integer in [1, {num_experts}], got {topk!r}")
    if not router_std > 0:
        raise ValueError(f"upcycle: router_std must be > 0, got {router_std!r}")
    try:
        replace = check_target(out_dir, what="--out", inputs={"--hf-dir": src_dir},
                               overwrite=overwrite)
    except OutputError as e:
        raise ValueError(f"upcycle: {e}") from None
    cfg, dense = _read_dense(src_dir)
    from safetensors.torch import save_file

    n_layers = int(cfg["num_hidden_layers"])  # checked by inspect_hf_dir
    hidden = int(cfg["hidden_size"])
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    taken = set()
    for name, t in dense.items():
        if ".mlp." not in name:
            out[name] = t.contiguous()
            taken.add(name)
    dtype = dense["model.embed_tokens.weight"].dtype
    for i in range(n_layers):
        pre = f"model.layers.{i}"
        try:
            gate = dense[f"{pre}.mlp.gate_proj.weight"]
            up = dense[f"{pre}.mlp.up_proj.weight"]
            down = dense[f"{pre}.mlp.down_proj.weight"]
        except KeyError as e:
            raise ValueError(f"upcycle: {src_dir} has no {e.args[0]} (not a SwiGLU MLP?)") from e
        taken.update(f"{pre}.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj"))
        moe = f"{pre}.block_sparse_moe"
        out[f"{moe}.gate.weight"] = (torch.randn(num_experts, hidden, generator=g)
                                     * router_std).to(dtype)
        for e in range(num_experts):
            out[f"{moe}.experts.{e}.w1.weight"] = gate.clone()
            out[f"{moe}.experts.{e}.w3.weight"] = up.clone()
            out[f"{moe}.experts.{e}.w2.weight"] = down.clone()
    left = sorted(set(dense) - taken)
    if left:
        raise ValueError(f"upcycle: tensors without a Mixtral counterpart: {left[:6]}")

    rope = _rope_parameters(src_dir)
    mix = {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": cfg["vocab_size"],
        "hidden_size": hidden,
        "intermediate_size": cfg["intermediate_size"],
        "num_hidden_layers": n_layers,
        "num_attention_heads": cfg["num_attention_heads"],
        "num_key_value_heads": cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
        "head_dim": cfg.get("head_dim", hidden // cfg["num_attention_heads"]),
        "hidden_act": cfg.get("hidden_act", "silu"),
        "max_position_embeddings": cfg["max_position_embeddings"],
        "rms_norm_eps": cfg.get("rms_norm_eps", 1e-6),
        "rope_parameters": rope,  # every field (rope type, theta, scaling): carried over
        "sliding_window": None,
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        "num_local_experts": num_experts,
        "num_experts_per_tok": topk,
        "router_aux_loss_coef": float(router_aux_loss_coef),
        "output_router_logits": False,
        "router_jitter_noise": 0.0,
        "attention_dropout": 0.0,
        "initializer_range": cfg.get("initializer_range", 0.02),
        "bos_token_id": cfg.get("bos_token_id"),
        "eos_token_id": cfg.get("eos_token_id"),
        "pad_token_id": cfg.get("pad_token_id"),
        "dtype": cfg.get("dtype", cfg.get("torch_dtype", "float32")),
    }
    _check_buildable(mix)
    tmp = temp_dir_for(out_dir)
    if os.path.lexists(tmp):
        raise FileExistsError(f"upcycle: {tmp} exists (left by an interrupted run?); remove it")
    os.makedirs(tmp)
    try:
        save_file(out, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(mix, f, indent=2)
        for name in os.listdir(src_dir):  # tokenizer and chat template
            path = os.path.join(src_dir, name)
            if name == "config.json" or name.endswith(_WEIGHT_FILES) or not os.path.isfile(path):
                continue
            shutil.copy2(path, os.path.join(tmp, name))
        if os.path.isdir(out_dir) and not os.listdir(out_dir):
            os.rmdir(out_dir)  # empty (checked above)
        publish(tmp, out_dir, overwrite=replace and os.path.lexists(out_dir))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # ours: created above
        raise
    return out_dir
