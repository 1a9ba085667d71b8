"""Reading Hugging Face safetensors checkpoints lazily (single file or sharded with an index)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

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
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict):
                raise HFCheckpointError(f"{index}: no weight_map")
            for name, fname in weight_map.items():
                path = os.path.join(hf_dir, fname)
                if not os.path.isfile(path):
                    raise HFCheckpointError(f"{index} lists {fname} for {name}, but that file is "
                                            "missing")
                self._where[name] = path
        elif os.path.isfile(single):
            with safe_open(single, framework="pt") as f:
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
            h = self._safe_open(path, framework="pt")
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

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for n in self._where:
            yield n, self.get(n)
