"""Hugging Face safetensors checkpoints: lazy reading, and writing the way transformers does.

Reading (:class:`HFCheckpointReader`): ``model.safetensors`` or sharded
``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``; a tensor (or a
rectangular region of it) is read from disk only when asked for.

Writing (:func:`write_safetensors_shard`, :func:`write_index`, :func:`shard_file_name`): the
same file names, index layout and ``{"format": "pt"}`` metadata as ``save_pretrained``, so
transformers and vLLM load the output unchanged. Each file is fsynced.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator, Sequence

import torch


class HFCheckpointError(ValueError):
    """The HF directory is missing files or is inconsistent; the message says which."""


class HFCheckpointReader:
    """Lazy access to the tensors of an HF model directory; a tensor is read when asked for.

    Supports ``model.safetensors`` and sharded ``model-0000x-of-0000y.safetensors`` with
    ``model.safetensors.index.json``.
    """

    def __init__(self, hf_dir: str):
        from safetensors import safe_open

        self.hf_dir = hf_dir
        index = os.path.join(hf_dir, "model.safetensors.index.json")
        single = os.path.join(hf_dir, "model.safetensors")
        self._where: dict[str, str] = {}
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f).get("weight_map")
            except (OSError, ValueError, AttributeError) as e:
                raise HFCheckpointError(f"{index}: not a valid index ({e})") from None
            if not isinstance(weight_map, dict):
                raise HFCheckpointError(f"{index}: no weight_map")
            for name, fname in weight_map.items():
                path = os.path.join(hf_dir, fname)
                if not os.path.isfile(path):
                    raise HFCheckpointError(f"{index} lists {fname} for {name}, but that file is "
                                            "missing")
                self._where[name] = path
        elif os.path.isfile(single):
            with _opened(safe_open, single) as f:
                for name in f.keys():
                    self._where[name] = single
        else:
            raise HFCheckpointError(
                f"{hf_dir}: no model.safetensors or model.safetensors.index.json (only "
                "safetensors checkpoints are supported; convert .bin files with transformers' "
                "save_pretrained(safe_serialization=True))")
        self._open: dict[str, object] = {}
        self._safe_open = safe_open

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def _handle(self, path: str):
        h = self._open.get(path)
        if h is None:
            h = _opened(self._safe_open, path)
            self._open[path] = h
        return h

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise HFCheckpointError(f"{self.hf_dir}: tensor {name!r} is missing")
        return self._handle(self._where[name]).get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._where:
            raise HFCheckpointError(f"{self.hf_dir}: tensor {name!r} is missing")
        return tuple(self._handle(self._where[name]).get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype of ``name`` (read from the file header, no data)."""
        if name not in self._where:
            raise HFCheckpointError(f"{self.hf_dir}: tensor {name!r} is missing")
        code = self._handle(self._where[name]).get_slice(name).get_dtype()
        if code not in _SAFETENSORS_DTYPES:
            raise HFCheckpointError(f"{self.hf_dir}: tensor {name!r} has dtype {code}, which "
                                    "megarlhf does not convert")
        return _SAFETENSORS_DTYPES[code]

    def get_region(self, name: str, rows: tuple[int, int],
                   cols: tuple[int, int] | None = None) -> torch.Tensor:
        """``tensor[rows[0]:rows[1]]`` (and ``[:, cols[0]:cols[1]]``), reading only that region."""
        if name not in self._where:
            raise HFCheckpointError(f"{self.hf_dir}: tensor {name!r} is missing")
        sl = self._handle(self._where[name]).get_slice(name)
        if cols is None:
            return sl[rows[0]: rows[1]]
        return sl[rows[0]: rows[1], cols[0]: cols[1]]

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for n in self._where:
            yield n, self.get(n)


def _opened(safe_open, path: str):
    """``safe_open(path)``; a truncated or corrupt file raises :class:`HFCheckpointError`."""
    try:
        return safe_open(path, framework="pt")
    except Exception as e:  # noqa: BLE001 - safetensors raises SafetensorError / OSError
        raise HFCheckpointError(
            f"{path}: not a readable safetensors file ({e}); the file is truncated or corrupt "
            "(an interrupted download or copy?): fetch it again") from None


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
}

# Files of an HF model directory that hold weights (everything else - config, generation config,
# tokenizer files, chat template, README - travels with converted checkpoints).
_WEIGHT_FILE = re.compile(
    r"(\.safetensors|\.safetensors\.index\.json|\.bin|\.bin\.index\.json|\.pt|\.pth|\.ckpt|"
    r"\.msgpack|\.h5|\.gguf|\.distcp)$")


def shard_file_name(index: int, count: int) -> str:
    """transformers' name of shard ``index`` (0-based) of ``count``; one shard is unsharded."""
    if count == 1:
        return "model.safetensors"
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def parse_size(size: str | int) -> int:
    """Bytes in ``"5GB"`` (10^9, as transformers' ``max_shard_size``), ``"2GiB"``, ``"500MB"``.

    Raises:
        ValueError: not a positive size.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
        if not m:
            raise ValueError(f"size {size!r}: expected e.g. 5GB, 2GiB, 500MB or a byte count")
        unit = (m.group(2) or "B").upper()
        mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
        n = int(float(m.group(1)) * mult)
    if n < 1:
        raise ValueError(f"size {size!r} must be positive")
    return n


def fsync_path(path: str) -> None:
    """Flushes a file or directory entry to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_safetensors_shard(path: str, tensors: Sequence[tuple[str, torch.Tensor]]) -> int:
    """Writes ``tensors`` (on any device) to one safetensors file, fsynced; returns its bytes."""
    from safetensors.torch import save_file

    sd = {}
    for name, t in tensors:
        if name in sd:
            raise ValueError(f"tensor {name!r} appears twice in one shard")
        sd[name] = t.detach().to("cpu").contiguous()
    save_file(sd, path, metadata={"format": "pt"})
    fsync_path(path)
    return sum(t.numel() * t.element_size() for t in sd.values())


def write_index(out_dir: str, weight_map: dict[str, str], total_size: int) -> None:
    """``model.safetensors.index.json`` as transformers writes it (sorted weight map)."""
    index = {"metadata": {"total_size": total_size},
             "weight_map": dict(sorted(weight_map.items()))}
    path = os.path.join(out_dir, "model.safetensors.index.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def hf_asset_files(hf_dir: str) -> list[str]:
    """Top-level files of an HF directory that are not weights (config, tokenizer, ...)."""
    out = []
    for name in sorted(os.listdir(hf_dir)):
        path = os.path.join(hf_dir, name)
        # megarlhf's output marker belongs to its directory, not to the model.
        if os.path.isfile(path) and not _WEIGHT_FILE.search(name) \
                and not name.startswith(".megarlhf"):
            out.append(name)
    return out


def copy_hf_assets(src_dir: str, dst_dir: str, skip: Sequence[str] = ()) -> list[str]:
    """Copies the non-weight files of ``src_dir`` (tokenizer, generation config, ...), fsynced.

    Returns the names copied.
    """
    os.makedirs(dst_dir, exist_ok=True)
    copied = []
    for name in hf_asset_files(src_dir):
        if name in skip:
            continue
        dst = os.path.join(dst_dir, name)
        shutil.copyfile(os.path.join(src_dir, name), dst)
        fsync_path(dst)
        copied.append(name)
    return copied


# ------------------------------------------------------------------ carried (MTP) tensors
# Multi-token-prediction layers (DeepSeek-V3, GLM-4.5: ``num_nextn_predict_layers`` layers after
# the last decoder layer) are not built by megarlhf; their tensors travel unchanged from the
# source checkpoint into every checkpoint (``hf/mtp.safetensors``) and every HF export.
CARRIED_FILE = "mtp.safetensors"


def mtp_layer_of(name: str, num_layers: int, mtp_layers: int) -> int | None:
    """The MTP layer (0-based) an HF tensor name belongs to, None for a name of the model."""
    if mtp_layers <= 0 or not name.startswith("model.layers."):
        return None
    part = name.split(".", 3)[2]
    if not part.isdigit():
        return None
    i = int(part) - num_layers
    return i if 0 <= i < mtp_layers else None


def carried_tensors(src_dir: str, num_layers: int, mtp_layers: int
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """The MTP tensors of ``src_dir``: a megarlhf checkpoint's ``hf/`` (its
    :data:`CARRIED_FILE`) or an HF model directory (the names of layers ``num_layers`` ..
    ``num_layers + mtp_layers - 1`` in its weights). Nothing when there are none."""
    if mtp_layers <= 0 or src_dir is None:
        return
    own = os.path.join(src_dir, CARRIED_FILE)
    if os.path.isfile(own):
        from safetensors import safe_open

        with _opened(safe_open, own) as f:
            for name in sorted(f.keys()):
                yield name, f.get_tensor(name)
        return
    if not any(os.path.isfile(os.path.join(src_dir, f))
               for f in ("model.safetensors", "model.safetensors.index.json")):
        return  # no weights here (e.g. a tokenizer directory)
    reader = HFCheckpointReader(src_dir)  # a broken checkpoint raises, naming the file
    for name in reader.names():
        if mtp_layer_of(name, num_layers, mtp_layers) is not None:
            yield name, reader.get(name)


def write_carried(src_dir: str | None, dst_path: str, num_layers: int,
                  mtp_layers: int) -> list[str]:
    """Writes the MTP tensors of ``src_dir`` (see :func:`carried_tensors`) to one safetensors
    file at ``dst_path``, unchanged; returns their names (none: no file is written)."""
    if src_dir is None:
        return []
    tensors = list(carried_tensors(src_dir, num_layers, mtp_layers))
    if not tensors:
        return []
    write_safetensors_shard(dst_path, tensors)
    return [n for n, _ in tensors]
