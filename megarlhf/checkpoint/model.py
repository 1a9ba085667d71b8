"""A model's weights as a megatron distributed checkpoint, loadable at any layout.

Directory layout::

    <dir>/
      model/                     megatron dist checkpoint (torch_dist): every chunk's
                                 sharded_state_dict(), keyed by global offsets
      hf/                        config.json and tokenizer files of the source model (if any)
      megarlhf_checkpoint.json   metadata, written last: its presence means "complete"

Resharding: megatron's ``sharded_state_dict()`` keys every tensor by its global position -
decoder layers by *global* layer number (so PP and VPP splits do not matter), TP shards by
offsets along their split axis (fused QKV per query group, SwiGLU gate/up split by megatron's
factory) - so a checkpoint saved at one TP/PP/VPP/DP layout loads at any other. Chunks are keyed
as megatron's training loop does (``model`` for one chunk, ``model0``, ``model1``, ... with
VPP); only the tensors' keys matter for loading.

Vocabulary padding: the embedding and output layer are padded to a multiple of
``vocab_multiple * tp``, so their global row count depends on the layout. Megatron marks both
``allow_shape_mismatch``: on load the tensor is zeroed and the stored rows that exist in both
are read, so padding rows are zero whenever the new padding is larger, and extra stored padding
rows are ignored when it is smaller. Real vocabulary rows are always loaded exactly.

Atomicity: every rank writes into ``<dir>.tmp-<pid of rank 0>``; rank 0 then writes the
metadata file (with every file's size), fsyncs the tree and renames it to ``<dir>``. A crash
leaves the previous ``<dir>`` untouched, and a directory without the metadata file - or whose
files do not match it - is refused with :class:`CheckpointError`.

Supported: model weights (LM and scalar heads, tied embeddings), any layout to any layout, and
a different parameter dtype on load (values are cast). Not here: optimizer state, RNG and
data-loader state (the full training-state checkpoint, which builds on these functions).
"""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from megarlhf.checkpoint.atomic import publish, temp_dir_for
from megarlhf.models.arch import hf_config_from_dict
from megarlhf.models.builder import ModelBundle
from megarlhf.models.families import arch_spec
from megarlhf.weights.hf_io import CARRIED_FILE, copy_hf_assets, write_carried

FORMAT = "megarlhf.model_checkpoint"
FORMAT_VERSION = 1
MARKER = "megarlhf_checkpoint.json"
MODEL_SUBDIR = "model"
HF_SUBDIR = "hf"

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_NAMED_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}


class CheckpointError(ValueError):
    """Not a complete megarlhf checkpoint, or not one for this model; the message says why."""


@dataclass
class CheckpointMeta:
    """The contents of ``megarlhf_checkpoint.json``.

    Attributes:
        hf_config: the HF config.json fields of the architecture (verbatim from the source).
        head: "lm" or "scalar".
        padded_vocab_size: embedding rows as saved (vocabulary + padding of that layout).
        vocab_size: the real vocabulary.
        dtype: parameter dtype as saved ("float32", "bfloat16", "float16").
        layout: the layout it was saved at (tp, pp, vpp, cp, dp, sequence_parallel, ep, etp).
        hf_files: files under ``hf/`` (config, tokenizer) copied from the source.
        files: relative path -> size in bytes of every file of the checkpoint but this one.
        extra: caller-defined fields (e.g. the training step).
    """

    hf_config: dict[str, Any]
    head: str
    padded_vocab_size: int
    vocab_size: int
    dtype: str
    layout: dict[str, Any]
    hf_files: list[str] = field(default_factory=list)
    files: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    megarlhf_version: str = ""
    megatron_core_version: str = ""
    created: str = ""

    @property
    def torch_dtype(self) -> torch.dtype:
        return _NAMED_DTYPES[self.dtype]


def _versions() -> tuple[str, str]:
    try:
        from importlib.metadata import version

        mr = version("megarlhf")
    except Exception:  # noqa: BLE001 - running from a source tree without install
        mr = "unknown"
    try:
        from megatron.core.package_info import __version__ as mc
    except Exception:  # noqa: BLE001
        mc = "unknown"
    return mr, mc


def _chunk_keys(n: int) -> list[str]:
    return ["model"] if n == 1 else [f"model{i}" for i in range(n)]


def _sharded_state_dict(bundle: ModelBundle) -> dict[str, Any]:
    chunks = bundle.unwrapped()
    return {k: c.sharded_state_dict() for k, c in zip(_chunk_keys(len(chunks)), chunks)}


def _rank() -> int:
    d = torch.distributed
    return d.get_rank() if d.is_available() and d.is_initialized() else 0


def _broadcast(obj: Any) -> Any:
    """rank 0's ``obj`` on every rank."""
    d = torch.distributed
    if not (d.is_available() and d.is_initialized()) or d.get_world_size() == 1:
        return obj
    box = [obj]
    d.broadcast_object_list(box, src=0)
    return box[0]


def _save_strategy():
    """megatron's torch_dist format, written synchronously from this process.

    megatron's default writer forks worker processes, which a daemonic rank process (our gloo
    launcher, Ray actors) may not do; torch's own ``FileSystemWriter`` writes the same format
    (``*.distcp`` + ``.metadata``), fsyncing each file.
    """
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )

    class SyncTorchDistSave(TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict, checkpoint_dir):
            sd, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict,
                                                                 self.keep_only_main_replica)
            dcp.save(mcore_to_pyt_state_dict(sd, False),
                     storage_writer=dcp.FileSystemWriter(str(checkpoint_dir), thread_count=1,
                                                         sync_files=True),
                     planner=MCoreSavePlanner(dedup_replicated_tensors=False,
                                              flatten_state_dict=False))

    return SyncTorchDistSave("torch_dist", 1)


def save_model_checkpoint(bundle: ModelBundle, ckpt_dir: str, *,
                          hf_config: dict[str, Any] | None = None,
                          hf_files_from: str | None = None, overwrite: bool = False,
                          extra: dict[str, Any] | None = None,
                          tmp_dir: str | None = None) -> CheckpointMeta:
    """Collective: saves the model's weights to ``ckpt_dir`` atomically.

    Every rank of the role calls it. Only DP replica 0's shards are written (megatron's
    replica ids); the result loads at any layout (:func:`load_model_checkpoint`).

    Args:
        bundle: this rank's model.
        ckpt_dir: the checkpoint directory to create.
        hf_config: the HF config.json fields to record; default: ``hf_files_from``'s
            config.json, else the model's own config.
        hf_files_from: an HF model directory whose non-weight files (config.json, tokenizer
            files, generation config, chat template) are copied into ``<ckpt_dir>/hf/``.
        overwrite: replace an existing ``ckpt_dir`` (only once the new one is complete).
        extra: JSON-serialisable fields stored in the metadata.
        tmp_dir: where to build it (default ``<ckpt_dir>.tmp-<pid of rank 0>``); it must not
            exist. A caller that cleans up after a failed run passes its own.

    Raises:
        CheckpointError: ``ckpt_dir`` exists (without ``overwrite``) or the save failed.
    """
    from megatron.core import dist_checkpointing

    ckpt_dir = os.path.abspath(ckpt_dir)
    rank = _rank()
    plan: tuple[str | None, str | None] = (None, None)
    if rank == 0:
        if os.path.lexists(ckpt_dir) and not overwrite:
            plan = (None, f"{ckpt_dir} exists; choose another directory or pass overwrite")
        else:
            tmp = os.path.abspath(tmp_dir) if tmp_dir else temp_dir_for(ckpt_dir)
            try:
                os.makedirs(os.path.join(tmp, MODEL_SUBDIR))
                plan = (tmp, None)
            except OSError as e:
                plan = (None, f"cannot create {tmp}: {e}")
    tmp, err = _broadcast(plan)
    if err:
        raise CheckpointError(err)

    dist_checkpointing.save(_sharded_state_dict(bundle), os.path.join(tmp, MODEL_SUBDIR),
                            sharded_strategy=_save_strategy())
    if torch.distributed.is_initialized():
        torch.distributed.barrier()

    result: tuple[CheckpointMeta | None, str | None] = (None, None)
    if rank == 0:
        try:
            if hf_config is None and hf_files_from is not None \
                    and os.path.isfile(os.path.join(hf_files_from, "config.json")):
                with open(os.path.join(hf_files_from, "config.json"), encoding="utf-8") as f:
                    hf_config = json.load(f)
            if hf_config is None:
                hf_config = bundle.spec.hf_config.to_diff_dict()
            hf_dir = os.path.join(tmp, HF_SUBDIR)
            if hf_files_from is not None:
                hf_files = copy_hf_assets(hf_files_from, hf_dir)
                # Multi-token-prediction layers megarlhf does not build travel unchanged.
                spec = bundle.spec
                if write_carried(hf_files_from, os.path.join(hf_dir, CARRIED_FILE),
                                 spec.num_layers, spec.mtp_layers):
                    hf_files.append(CARRIED_FILE)
            else:
                os.makedirs(hf_dir, exist_ok=True)
                with open(os.path.join(hf_dir, "config.json"), "w", encoding="utf-8") as f:
                    json.dump(hf_config, f, indent=2, sort_keys=True)
                hf_files = ["config.json"]
            meta = _metadata(bundle, hf_config, hf_files, extra or {})
            meta.files = _file_sizes(tmp)
            _write_marker(tmp, meta)
            publish(tmp, ckpt_dir, overwrite=overwrite)
            result = (meta, None)
        except Exception as e:  # noqa: BLE001 - reported on every rank below
            result = (None, f"saving {ckpt_dir} failed in its last step: "
                            f"{type(e).__name__}: {e} (the partial checkpoint is in {tmp})")
    meta, err = _broadcast(result)
    if err:
        raise CheckpointError(err)
    return meta


def _metadata(bundle: ModelBundle, hf_config, hf_files, extra) -> CheckpointMeta:
    lay = bundle.ctx.layout
    dtypes = {p.dtype for c in bundle.unwrapped() for p in c.parameters()}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    mr, mc = _versions()
    return CheckpointMeta(
        hf_config=hf_config, head=bundle.head, padded_vocab_size=bundle.padded_vocab_size,
        vocab_size=bundle.spec.vocab_size, dtype=_DTYPE_NAMES.get(dtype, "float32"),
        layout=dict(tp=lay.tp, pp=lay.pp, vpp=lay.vpp, cp=lay.cp, dp=lay.dp,
                    sequence_parallel=lay.sequence_parallel, ep=lay.ep, etp=lay.etp),
        hf_files=list(hf_files), extra=dict(extra), megarlhf_version=mr,
        megatron_core_version=mc,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def _file_sizes(root: str) -> dict[str, int]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if rel != MARKER:
                out[rel] = os.path.getsize(path)
    return dict(sorted(out.items()))


def _write_marker(tmp: str, meta: CheckpointMeta) -> None:
    """The metadata file, written last (its presence marks a complete checkpoint)."""
    path = os.path.join(tmp, MARKER)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(asdict(meta), f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def read_checkpoint_meta(ckpt_dir: str, verify_files: bool = True) -> CheckpointMeta:
    """The metadata of a complete checkpoint (no collective, reads no weights).

    Raises:
        CheckpointError: missing, incomplete (interrupted save), corrupt or of another format.
    """
    if not os.path.exists(ckpt_dir):
        raise CheckpointError(f"{ckpt_dir}: no such checkpoint directory")
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"{ckpt_dir} is a file; a megarlhf checkpoint is a directory")
    path = os.path.join(ckpt_dir, MARKER)
    if not os.path.isfile(path):
        raise CheckpointError(_not_a_model_checkpoint(ckpt_dir))
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e}); the checkpoint is corrupt") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a megarlhf model checkpoint (format "
                              f"{raw.get('format') if isinstance(raw, dict) else None!r})")
    if raw.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {raw.get('format_version')} is not "
                              f"supported by this megarlhf (reads version {FORMAT_VERSION})")
    try:
        meta = CheckpointMeta(**raw)
    except TypeError as e:
        raise CheckpointError(f"{path}: unexpected fields ({e}); the checkpoint is corrupt") \
            from None
    if verify_files:
        problems = []
        for rel, size in meta.files.items():
            p = os.path.join(ckpt_dir, rel)
            if not os.path.isfile(p):
                problems.append(f"{rel} is missing")
            elif os.path.getsize(p) != size:
                problems.append(f"{rel} has {os.path.getsize(p)} bytes, expected {size}")
        if not any(r.startswith(MODEL_SUBDIR + os.sep) for r in meta.files):
            problems.append("no model files are listed")
        if problems:
            raise CheckpointError(f"{ckpt_dir} is corrupt: " + "; ".join(problems[:8])
                                  + (" ..." if len(problems) > 8 else ""))
    return meta


def _not_a_model_checkpoint(d: str) -> str:
    """Why ``d`` (a directory without the metadata file) is not a model checkpoint, and which
    directory near it is one."""
    def models_in(step: str) -> list[str]:
        return sorted(os.path.join(step, r, MODEL_SUBDIR) for r in os.listdir(step)
                      if os.path.isfile(os.path.join(step, r, MODEL_SUBDIR, MARKER)))

    name = os.path.basename(os.path.normpath(d))
    if ".tmp-" in name:
        return (f"{d} is not a complete megarlhf checkpoint: it is the temporary directory of an "
                "interrupted save (delete it)")
    if os.path.isfile(os.path.join(d, "COMPLETE")) or models_in(d):
        found = models_in(d)
        where = ("; its models: " + ", ".join(found)) if found else ""
        return (f"{d} is a complete training checkpoint (the full state of a run at one step), "
                f"not a single model's checkpoint: each role's model is in "
                f"{os.path.join(d, '<role>', MODEL_SUBDIR)}{where}; pass one of those")
    if os.path.isfile(os.path.join(d, MODEL_SUBDIR, MARKER)):
        return (f"{d} is one role's training state; its model checkpoint is "
                f"{os.path.join(d, MODEL_SUBDIR)}: pass that")
    latest = os.path.join(d, "latest")
    if os.path.isfile(latest):
        step = os.path.join(d, open(latest, encoding="utf-8").read().strip())
        return (f"{d} is a run's checkpoint directory, not a model checkpoint: the newest step "
                f"is {step}; pass {os.path.join(step, 'actor', MODEL_SUBDIR)} (or another "
                "role's model)")
    if os.path.isdir(os.path.join(d, "checkpoints")) or os.path.isdir(os.path.join(d, "hf")):
        return (f"{d} is a run's output_dir: its trained model is {os.path.join(d, 'hf')} (a "
                f"Hugging Face directory), its checkpoints are in "
                f"{os.path.join(d, 'checkpoints', 'step_*', '<role>', MODEL_SUBDIR)}")
    if os.path.isfile(os.path.join(d, "config.json")):
        return (f"{d} is a Hugging Face model directory, not a megarlhf checkpoint: pass it as an "
                "HF directory (--hf-dir / model.hf_dir), or convert it with `megarlhf convert "
                "hf-to-megatron`")
    return (f"{d} is not a complete megarlhf checkpoint: it has no {MARKER} - its save did not "
            "finish, or it is not a megarlhf checkpoint")


def check_compatible(meta: CheckpointMeta, bundle: ModelBundle, ckpt_dir: str = "") -> None:
    """Refuses a checkpoint of another architecture or head than ``bundle``'s.

    Raises:
        CheckpointError: listing every field that differs.
    """

    saved = arch_spec(hf_config_from_dict(meta.hf_config))
    mine = bundle.spec
    diffs = []
    if meta.head != bundle.head:
        diffs.append(f"head: checkpoint {meta.head}, model {bundle.head}")
    fields = ["model_type", "num_layers", "hidden_size", "ffn_hidden_size",
              "num_attention_heads", "num_query_groups", "head_dim", "vocab_size", "qkv_bias",
              "qk_norm"]
    if bundle.head == "lm":
        fields.append("tie_word_embeddings")
    for f in fields:
        a, b = getattr(saved, f), getattr(mine, f)
        if a != b:
            diffs.append(f"{f}: checkpoint {a}, model {b}")
    if diffs:
        raise CheckpointError(f"checkpoint {ckpt_dir} does not fit this model: "
                              + "; ".join(diffs))


@torch.no_grad()
def load_model_checkpoint(bundle: ModelBundle, ckpt_dir: str) -> CheckpointMeta:
    """Collective: loads a checkpoint saved at any layout into this rank's chunks.

    Every rank of the role calls it. Parameters are cast to the model's dtype.

    Raises:
        CheckpointError: incomplete, corrupt, or for another architecture/head.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    meta = read_checkpoint_meta(ckpt_dir)
    check_compatible(meta, bundle, ckpt_dir)
    chunks = bundle.unwrapped()
    sd = _sharded_state_dict(bundle)
    try:
        loaded = dist_checkpointing.load(sd, os.path.join(ckpt_dir, MODEL_SUBDIR),
                                         strict=StrictHandling.RAISE_ALL)
    except Exception as e:  # noqa: BLE001 - megatron/torch raise several types
        raise CheckpointError(f"loading {ckpt_dir} failed: {type(e).__name__}: {e}") from e
    for key, chunk in zip(_chunk_keys(len(chunks)), chunks):
        chunk.load_state_dict(loaded[key], strict=True)
    return meta
