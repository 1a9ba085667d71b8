"""HF safetensors <-> megarlhf checkpoints (megatron dist checkpoints): the library behind
``megarlhf convert``.

``hf-to-megatron``: validate the HF directory (:func:`~megarlhf.weights.validate.inspect_hf_dir`:
architecture, config vs weights, names, shapes - before any process starts), then on ``tp*pp``
ranks build the model, let each rank read only its own shards from the safetensors files
(:mod:`megarlhf.weights.loader`) and save a checkpoint (:mod:`megarlhf.checkpoint.model`)
carrying the source's config.json and tokenizer files.

``megatron-to-hf``: on the checkpoint's layout (or another), load it and stream the model through
the resharder (:func:`~megarlhf.weights.resharder.iter_hf_weights`) with one bucket per output
file, so rank 0 holds one file's tensors at a time; write sharded safetensors with
``model.safetensors.index.json`` as transformers does, config.json (``*ForCausalLM``, or
``*ForSequenceClassification`` with one label for a scalar head) and the tokenizer files.

Both directions write atomically (a temp directory renamed into place when complete) and keep
the weights' dtype unless asked otherwise, so HF -> megatron -> HF is bit-exact.

The ``*_rank`` functions are what each rank runs; they are public so that callers already inside
a distributed world (tests, a training job exporting its actor) can use them directly.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from typing import Any

import torch

from megarlhf.checkpoint.atomic import publish, temp_dir_for
from megarlhf.checkpoint.outputs import OutputError, check_target
from megarlhf.checkpoint.model import (
    HF_SUBDIR,
    CheckpointMeta,
    load_model_checkpoint,
    read_checkpoint_meta,
    save_model_checkpoint,
)
from megarlhf.models.families import ArchSpec
from megarlhf.config.schema import ModelConfig
from megarlhf.models.arch import hf_config_from_dict
from megarlhf.models.builder import build_model
from megarlhf.models.families import arch_spec
from megarlhf.parallel.layout import ParallelLayout, initialize_parallel
from megarlhf.platform.launch import run_distributed
from megarlhf.weights.hf_io import (
    CARRIED_FILE,
    copy_hf_assets,
    parse_size,
    shard_file_name,
    write_carried,
    write_index,
    write_safetensors_shard,
)
from megarlhf.weights.loader import load_hf_dir
from megarlhf.weights.mapping import local_params
from megarlhf.weights.resharder import iter_hf_weights, plan_hf_weights
from megarlhf.weights.validate import inspect_hf_dir

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_MODEL_CFG_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _class_prefix(model_type: str | None) -> str:
    """transformers' class-name prefix of ``model_type`` (``glm4_moe`` -> ``Glm4Moe``)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type or "")
    if name is None or not name.endswith("ForCausalLM"):
        raise ConversionError(f"model_type {model_type!r} has no causal-LM class in transformers")
    return name[: -len("ForCausalLM")]

DEFAULT_TIMEOUT_S = 24 * 3600.0


class ConversionError(ValueError):
    """The conversion cannot run as asked; the message says what to change."""


# --------------------------------------------------------------------------- helpers


def conversion_world(tp: int, pp: int, ep: int = 1, etp: int | None = None) -> int:
    """Ranks a conversion runs on: ``pp`` stages of ``lcm(tp, ep*etp)`` ranks (attention at TP
    with the rest as DP; experts at EP x ETP folded onto the same ranks)."""
    import math

    return pp * math.lcm(tp, ep * (tp if etp is None else etp))


def check_layout(spec: ArchSpec, tp: int, pp: int, vpp: int, ep: int = 1,
                 etp: int | None = None) -> None:
    """Refuses a layout megatron cannot build for ``spec`` (before any process starts)."""
    problems = []
    for name, v in (("tp", tp), ("pp", pp), ("vpp", vpp), ("ep", ep)) + \
            ((("etp", etp),) if etp is not None else ()):
        if not isinstance(v, int) or v < 1:
            problems.append(f"--{name} must be a positive integer, got {v!r}")
    if problems:
        raise ConversionError("; ".join(problems))
    if vpp > 1 and pp < 2:
        problems.append(f"--vpp {vpp} needs --pp >= 2")
    if spec.num_attention_heads % tp:
        problems.append(f"{spec.num_attention_heads} attention heads are not divisible by "
                        f"--tp {tp}")
    if spec.num_query_groups % tp:
        problems.append(f"{spec.num_query_groups} query groups (num_key_value_heads) are not "
                        f"divisible by --tp {tp}")
    if spec.ffn_hidden_size % tp:
        problems.append(f"intermediate_size {spec.ffn_hidden_size} is not divisible by --tp {tp}")
    if spec.num_layers % (pp * vpp):
        problems.append(f"{spec.num_layers} layers are not divisible by pp*vpp = {pp * vpp}")
    if spec.mla is not None:  # megatron's local MLA splits its down-projections by rows
        ml = spec.mla
        if ml.q_lora_rank is not None and ml.q_lora_rank % tp:
            problems.append(f"q_lora_rank {ml.q_lora_rank} is not divisible by --tp {tp}")
        if (ml.kv_lora_rank + ml.qk_rope_head_dim) % tp:
            problems.append(f"kv_lora_rank + qk_rope_head_dim = "
                            f"{ml.kv_lora_rank + ml.qk_rope_head_dim} is not divisible by --tp {tp}")
    if spec.moe is None:
        if ep > 1 or etp is not None:
            problems.append(f"--ep/--etp split experts, but {spec.model_type} is dense")
    else:
        e = tp if etp is None else etp
        if spec.moe.num_experts % ep:
            problems.append(f"{spec.moe.num_experts} experts are not divisible by --ep {ep}")
        if spec.moe.ffn_hidden_size % e:
            problems.append(f"the experts' width {spec.moe.ffn_hidden_size} is not divisible "
                            f"by the expert tensor-parallel size {e}")
        if spec.moe.shared_ffn_hidden_size % tp:
            problems.append(f"the shared experts' width {spec.moe.shared_ffn_hidden_size} is "
                            f"not divisible by --tp {tp}")
    if problems:
        raise ConversionError("layout not possible for this model: " + "; ".join(problems))


def check_out_dir(out_dir: str, inputs: dict[str, str], overwrite: bool) -> bool:
    """Refuses an ``--out`` that is, is inside or contains an input, or holds anything but
    megarlhf's own output (which only ``--overwrite`` replaces); True: replace ``out_dir``.

    Raises:
        ConversionError: naming the path and what to change.
    """
    try:
        return check_target(out_dir, what="--out", inputs=inputs, overwrite=overwrite)
    except OutputError as e:
        raise ConversionError(str(e)) from None


def _cast_params(bundle, dtype: torch.dtype) -> None:
    """Sets every parameter's dtype (conversion only: no optimizer, no DDP buffers)."""
    for chunk in bundle.unwrapped():
        for p in chunk.parameters():
            if p.dtype != dtype:
                p.data = p.data.to(dtype)


def _progress(total: int, desc: str, enabled: bool, unit: str = "tensor"):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True)


def _world_rank() -> tuple[int, int]:
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.get_world_size(), d.get_rank()
    return 1, 0


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def hf_export_config(hf_config: dict[str, Any], head: str, dtype: torch.dtype) -> dict[str, Any]:
    """config.json for an export: the source's fields, with the head class and dtype set."""
    cfg = dict(hf_config)
    mt = cfg.get("model_type")
    prefix = None
    for a in cfg.get("architectures") or []:
        for suffix in ("ForCausalLM", "ForSequenceClassification", "Model"):
            if a.endswith(suffix):
                prefix = a[: -len(suffix)]
                break
        if prefix:
            break
    prefix = prefix or _class_prefix(mt)
    if head == "scalar":
        cfg["architectures"] = [prefix + "ForSequenceClassification"]
        cfg["id2label"] = {"0": "LABEL_0"}
        cfg["label2id"] = {"LABEL_0": 0}
        cfg.pop("num_labels", None)
    else:
        cfg["architectures"] = [prefix + "ForCausalLM"]
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = _dtype_name(dtype)
    cfg["dtype"] = _dtype_name(dtype)
    return cfg


# --------------------------------------------------------------------------- HF -> megatron


@dataclass(frozen=True)
class HFToMegatronJob:
    """What every rank needs for ``hf-to-megatron`` (picklable)."""

    hf_dir: str
    out_dir: str
    tp: int
    pp: int
    vpp: int
    head: str  # "lm" or "scalar" (resolved)
    dtype: str  # checkpoint parameter dtype: "fp32", "bf16" or "fp16"
    raw_config: dict
    vocab_multiple: int = 128
    overwrite: bool = False
    progress: bool = True
    tmp_dir: str | None = None
    ep: int = 1
    etp: int | None = None


def hf_to_megatron_rank(job: HFToMegatronJob) -> CheckpointMeta:
    """One rank of ``hf-to-megatron``: build, read this rank's shards, save (collective)."""

    world, rank = _world_rank()
    ctx = initialize_parallel(ParallelLayout.for_world(world, tp=job.tp, pp=job.pp, vpp=job.vpp,
                                                       ep=job.ep, etp=job.etp))
    model_cfg = ModelConfig(hf_dir=job.hf_dir, dtype=job.dtype, vocab_multiple=job.vocab_multiple,
                            transformer_impl="local")
    # init_weights=False: every weight is read below (a scalar head missing from an LM
    # checkpoint keeps ScalarHead's own seeded initialisation).
    bundle = build_model(model_cfg, ctx, head=job.head, init_weights=False)
    _cast_params(bundle, DTYPES[job.dtype])

    bar = _progress(len(local_params(bundle)), "reading HF shards (rank 0)",
                    job.progress and rank == 0, unit="param")
    load_hf_dir(bundle, job.hf_dir, progress=lambda lp: bar.update(1))
    bar.close()
    if job.progress and rank == 0:
        print(f"saving megatron checkpoint ({ctx.layout.describe()}) to {job.out_dir}", flush=True)
    return save_model_checkpoint(
        bundle, job.out_dir, hf_config=job.raw_config, hf_files_from=job.hf_dir,
        overwrite=job.overwrite, tmp_dir=job.tmp_dir,
        extra={"source": {"hf_dir": os.path.abspath(job.hf_dir), "dtype": job.dtype}})


def prepare_hf_to_megatron(hf_dir: str, out_dir: str, *, tp: int = 1, pp: int = 1,
                           vpp: int = 1, head: str = "auto", dtype: str | None = None,
                           vocab_multiple: int = 128, overwrite: bool = False,
                           progress: bool = True, tmp_dir: str | None = None, ep: int = 1,
                           etp: int | None = None) -> HFToMegatronJob:
    """Validates everything checkable and returns the job every rank runs (writes nothing).

    Args: see :func:`convert_hf_to_megatron`; ``tmp_dir`` defaults to ``<out_dir>.tmp-<pid>``.

    Raises:
        HFValidationError, ConversionError: the inputs do not allow a conversion.
    """
    replace = check_out_dir(out_dir, {"--hf-dir": hf_dir}, overwrite)
    info = inspect_hf_dir(hf_dir, head)
    check_layout(info.spec, tp, pp, vpp, ep, etp)
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if info.score_missing and progress:
        print(f"note: {hf_dir} has no score.weight; the scalar head starts from a random "
              "initialisation (lm_head.weight is dropped)", flush=True)
    return HFToMegatronJob(hf_dir=hf_dir, out_dir=out_dir, tp=tp, pp=pp, vpp=vpp,
                           head=info.head, dtype=dtype or _MODEL_CFG_DTYPE[info.dtype],
                           raw_config=info.raw_config, vocab_multiple=vocab_multiple,
                           overwrite=replace, progress=progress,
                           tmp_dir=tmp_dir or temp_dir_for(out_dir), ep=ep, etp=etp)


def convert_hf_to_megatron(hf_dir: str, out_dir: str, *, tp: int = 1, pp: int = 1,
                           vpp: int = 1, head: str = "auto", dtype: str | None = None,
                           vocab_multiple: int = 128, overwrite: bool = False,
                           progress: bool = True,
                           timeout: float = DEFAULT_TIMEOUT_S, ep: int = 1,
                           etp: int | None = None) -> CheckpointMeta:
    """Converts an HF model directory into a megarlhf checkpoint saved at TP/PP/VPP (EP/ETP).

    Runs on :func:`conversion_world` local ranks (``tp*pp`` for dense models; gloo on CPU, NCCL
    on GPUs). Everything checkable is checked first; nothing is written when a check fails.

    Args:
        hf_dir: HF model directory (config.json, safetensors, tokenizer files).
        out_dir: the checkpoint directory to create.
        tp, pp, vpp: the layout to save at (any other loads it too).
        ep, etp: expert-parallel and expert-tensor-parallel sizes (MoE models; etp None = tp).
        head: "auto" (``score.weight`` -> scalar), "lm" or "scalar".
        dtype: parameter dtype of the checkpoint ("fp32", "bf16", "fp16"); default: the HF
            weights' dtype (bit-exact).
        vocab_multiple: the vocabulary is padded to a multiple of ``vocab_multiple * tp``.
        overwrite: replace an existing ``out_dir``.
        progress: show progress on rank 0.
        timeout: seconds for the whole run.

    Raises:
        HFValidationError, ConversionError: the inputs do not allow a conversion.
    """

    job = prepare_hf_to_megatron(hf_dir, out_dir, tp=tp, pp=pp, vpp=vpp, head=head, dtype=dtype,
                                 vocab_multiple=vocab_multiple, overwrite=overwrite,
                                 progress=progress, ep=ep, etp=etp)
    try:
        return run_distributed(hf_to_megatron_rank, conversion_world(tp, pp, ep, etp), job,
                               timeout=timeout)[0]
    finally:
        shutil.rmtree(job.tmp_dir, ignore_errors=True)  # left only by a failed run


# --------------------------------------------------------------------------- megatron -> HF


def export_hf(bundle, out_dir: str, *, shard_bytes: int, dtype: torch.dtype | None = None,
              hf_config: dict[str, Any] | None = None, hf_files_from: str | None = None,
              dst_rank: int = 0, progress: bool = False) -> dict[str, Any]:
    """Collective: writes ``bundle`` as an HF safetensors directory on ``dst_rank``.

    Every rank of the role calls it; ``dst_rank`` creates ``out_dir`` (it must not exist) and
    writes one safetensors file per resharder bucket (``shard_bytes`` each at most, a larger
    tensor alone), ``model.safetensors.index.json`` when there is more than one, config.json
    and the non-weight files of ``hf_files_from``. Not atomic by itself: callers write into a
    temp directory and publish it (see :func:`convert_megatron_to_hf`).

    Returns:
        On ``dst_rank``: ``{"files": n, "tensors": n, "bytes": n}``; elsewhere ``{}``.
    """

    _, rank = _world_rank()
    plan = plan_hf_weights(bundle)
    buckets = plan.buckets(shard_bytes, dtype)
    count = len(buckets)
    out_dtype = dtype or plan.units[0].dtype
    mine = rank == dst_rank
    if mine:
        os.makedirs(out_dir)
    bar = _progress(len(plan.entries), f"writing {count} safetensors file(s)", progress and mine)
    weight_map: dict[str, str] = {}
    total = 0
    for i, bucket in enumerate(iter_hf_weights(bundle, bucket_bytes=shard_bytes, dtype=dtype,
                                               dst_rank=dst_rank, device="cpu", plan=plan,
                                               reuse_buffer=True)):
        if not mine:
            continue
        fname = shard_file_name(i, count)
        total += write_safetensors_shard(os.path.join(out_dir, fname), bucket)
        for name, _ in bucket:
            weight_map[name] = fname
        bar.update(len(bucket))
    bar.close()
    if not mine:
        return {}
    # Multi-token-prediction tensors (not built) from the source, unchanged, in a file of their
    # own listed by the index (HF loaders read a second file only through an index).
    spec = bundle.spec
    carried = write_carried(hf_files_from, os.path.join(out_dir, CARRIED_FILE),
                            spec.num_layers, spec.mtp_layers)
    if carried:
        for name in carried:
            weight_map[name] = CARRIED_FILE
        total += os.path.getsize(os.path.join(out_dir, CARRIED_FILE))
    if count > 1 or carried:
        write_index(out_dir, weight_map, total)
    if hf_files_from is not None:
        copy_hf_assets(hf_files_from, out_dir, skip=("config.json",))
    cfg = hf_export_config(hf_config or bundle.spec.hf_config.to_diff_dict(), bundle.head,
                           out_dtype)
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    return {"files": count, "tensors": len(weight_map), "bytes": total}


@dataclass(frozen=True)
class MegatronToHFJob:
    """What every rank needs for ``megatron-to-hf`` (picklable)."""

    ckpt_dir: str
    out_dir: str  # the final HF directory
    tmp_dir: str  # rank 0 writes here, then renames it to out_dir
    tp: int
    pp: int
    vpp: int
    shard_bytes: int
    dtype: str | None = None  # output dtype; None: the checkpoint's
    overwrite: bool = False
    progress: bool = True
    ep: int = 1
    etp: int | None = None


def megatron_to_hf_rank(job: MegatronToHFJob) -> dict[str, Any]:
    """One rank of ``megatron-to-hf``: build, load, export, publish (collective)."""

    world, rank = _world_rank()
    meta = read_checkpoint_meta(job.ckpt_dir)
    ctx = initialize_parallel(ParallelLayout.for_world(world, tp=job.tp, pp=job.pp, vpp=job.vpp,
                                                       ep=job.ep, etp=job.etp))
    ckpt_dtype = meta.torch_dtype
    model_cfg = ModelConfig(arch=meta.hf_config, dtype=_MODEL_CFG_DTYPE[ckpt_dtype],
                            transformer_impl="local")
    bundle = build_model(model_cfg, ctx, head=meta.head, init_weights=False)
    _cast_params(bundle, ckpt_dtype)
    if job.progress and rank == 0:
        print(f"loading {job.ckpt_dir} at {ctx.layout.describe()}", flush=True)
    load_model_checkpoint(bundle, job.ckpt_dir)
    hf_files = os.path.join(job.ckpt_dir, HF_SUBDIR)
    summary = export_hf(bundle, job.tmp_dir, shard_bytes=job.shard_bytes,
                        dtype=DTYPES[job.dtype] if job.dtype else None,
                        hf_config=meta.hf_config,
                        hf_files_from=hf_files if os.path.isdir(hf_files) else None,
                        progress=job.progress)
    if rank == 0:
        publish(job.tmp_dir, job.out_dir, overwrite=job.overwrite)
    return summary


def prepare_megatron_to_hf(ckpt_dir: str, out_dir: str, *, dtype: str | None = None,
                           shard_size: str | int = "5GB", tp: int | None = None,
                           pp: int | None = None, vpp: int | None = None,
                           overwrite: bool = False, progress: bool = True,
                           tmp_dir: str | None = None, ep: int | None = None,
                           etp: int | None = None) -> MegatronToHFJob:
    """Validates everything checkable and returns the job every rank runs (writes nothing).

    Args: see :func:`convert_megatron_to_hf`; ``tmp_dir`` defaults to ``<out_dir>.tmp-<pid>``.

    Raises:
        CheckpointError, ConversionError: the inputs do not allow a conversion.
    """

    replace = check_out_dir(out_dir, {"--ckpt": ckpt_dir}, overwrite)
    meta = read_checkpoint_meta(ckpt_dir)
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    try:
        shard_bytes = parse_size(shard_size)
    except ValueError as e:
        raise ConversionError(f"--shard-size: {e}") from None
    tp = tp or meta.layout["tp"]
    pp = pp or meta.layout["pp"]
    vpp = vpp or (meta.layout["vpp"] if pp == meta.layout["pp"] else 1)
    spec = arch_spec(hf_config_from_dict(meta.hf_config))
    if ep is None:
        ep = meta.layout.get("ep", 1)
    if etp is None and tp == meta.layout["tp"]:
        etp = meta.layout.get("etp")
    check_layout(spec, tp, pp, vpp, ep, etp)
    return MegatronToHFJob(ckpt_dir=ckpt_dir, out_dir=out_dir,
                           tmp_dir=tmp_dir or temp_dir_for(out_dir), tp=tp, pp=pp, vpp=vpp,
                           shard_bytes=shard_bytes, dtype=dtype, overwrite=replace,
                           progress=progress, ep=ep, etp=etp)


def convert_megatron_to_hf(ckpt_dir: str, out_dir: str, *, dtype: str | None = None,
                           shard_size: str | int = "5GB", tp: int | None = None,
                           pp: int | None = None, vpp: int | None = None,
                           overwrite: bool = False, progress: bool = True,
                           timeout: float = DEFAULT_TIMEOUT_S, ep: int | None = None,
                           etp: int | None = None) -> dict[str, Any]:
    """Converts a megarlhf checkpoint into an HF safetensors directory.

    Args:
        ckpt_dir: the checkpoint (refused if incomplete or corrupt).
        out_dir: the HF directory to create (atomically).
        dtype: "fp32", "bf16" or "fp16"; default: the checkpoint's parameter dtype.
        shard_size: largest safetensors file ("5GB" = 5*10^9 bytes, as transformers).
        tp, pp, vpp: the layout to load at (default: the one it was saved at).
        ep, etp: the expert layout to load at (default: as saved).
        overwrite: replace an existing ``out_dir``.
        progress: show progress on rank 0.
        timeout: seconds for the whole run.

    Returns:
        ``{"files": n, "tensors": n, "bytes": n}``.
    """

    job = prepare_megatron_to_hf(ckpt_dir, out_dir, dtype=dtype, shard_size=shard_size, tp=tp,
                                 pp=pp, vpp=vpp, overwrite=overwrite, progress=progress, ep=ep,
                                 etp=etp)
    shutil.rmtree(job.tmp_dir, ignore_errors=True)
    try:
        return run_distributed(megatron_to_hf_rank,
                               conversion_world(job.tp, job.pp, job.ep, job.etp), job,
                               timeout=timeout)[0]
    finally:
        shutil.rmtree(job.tmp_dir, ignore_errors=True)  # left only by a failed run
