"""Saving and restoring a role's full training state, run on every rank via ``group.execute``.

Per role, inside a training checkpoint ``step_XXXXXX/<role>/``:

* ``model/``: the weights as a megatron distributed checkpoint (reshardable: loads at any
  TP/PP/VPP/DP layout, see :mod:`megarlhf.checkpoint.model`);
* ``rank_XXXXX.pt``: this rank's optimizer state (the torch optimizer's moments and step, the
  fp32 main-parameter shards of mixed-precision training, the grad scaler), the LR scheduler and
  every RNG (python, torch CPU, CUDA, megatron's tensor-parallel tracker). These are exact and
  need the same layout to resume; loading them at another layout is refused with a message.
  (Weights alone, e.g. to fine-tune further at another layout, load at any layout.)

The functions take the worker (``worker.engine``, ``worker.ctx``) as their first argument so the
driver can run them with ``group.execute(save_role_state, step_dir, role)``.
"""

from __future__ import annotations

import os
import random
from typing import Any

import torch

from megarlhf.checkpoint.atomic import publish, temp_dir_for
from megarlhf.checkpoint.convert import export_hf
from megarlhf.checkpoint.model import load_model_checkpoint, save_model_checkpoint


def _rng_state() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    st: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state(),
                          "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    try:
        import numpy as np

        st["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return st


def _set_rng_state(st: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(st["python"])
    torch.set_rng_state(st["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(st["tracker"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])
    if "numpy" in st:
        import numpy as np

        np.random.set_state(st["numpy"])


def _optimizers(opt) -> list:
    return list(getattr(opt, "chained_optimizers", [opt]))


def _optimizer_state(opt) -> list[dict[str, Any]]:
    out = []
    for o in _optimizers(opt):
        d: dict[str, Any] = {"inner": o.optimizer.state_dict()}
        for attr in ("shard_fp32_from_float16_groups", "fp32_from_float16_groups"):
            groups = getattr(o, attr, None)
            if groups:
                d[attr] = [[p.detach().cpu().clone() if p is not None else None for p in g]
                           for g in groups]
        scaler = getattr(o, "grad_scaler", None)
        if scaler is not None:
            d["grad_scaler"] = scaler.state_dict()
        out.append(d)
    return out


@torch.no_grad()
def _load_optimizer_state(opt, states: list[dict[str, Any]]) -> None:
    opts = _optimizers(opt)
    if len(opts) != len(states):
        raise RuntimeError(f"optimizer has {len(opts)} parts, the checkpoint {len(states)}")
    for o, d in zip(opts, states):
        o.optimizer.load_state_dict(d["inner"])
        for attr in ("shard_fp32_from_float16_groups", "fp32_from_float16_groups"):
            if attr in d:
                for group, saved in zip(getattr(o, attr), d[attr]):
                    for p, s in zip(group, saved):
                        if p is not None:
                            p.copy_(s.to(p.device))
        if "grad_scaler" in d and getattr(o, "grad_scaler", None) is not None:
            o.grad_scaler.load_state_dict(d["grad_scaler"])


def save_role_state(worker, step_dir: str, role: str) -> None:
    """Collective over the role: model weights (distributed checkpoint) + this rank's state."""
    eng = worker.engine
    d = os.path.join(step_dir, role)
    save_model_checkpoint(eng.bundle, os.path.join(d, "model"))
    st: dict[str, Any] = {"layout": eng.ctx.layout.describe(), "rng": _rng_state()}
    if eng.optimizer is not None:
        st["optimizer"] = _optimizer_state(eng.optimizer)
        st["scheduler"] = eng.scheduler.state_dict()
    path = os.path.join(d, f"rank_{eng.ctx.rank:05d}.pt")
    tmp = path + ".tmp"
    torch.save(st, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    torch.distributed.barrier()


def load_role_state(worker, step_dir: str, role: str, weights_only: bool = False) -> None:
    """Collective: restores what :func:`save_role_state` wrote (weights at any layout; the rest
    needs the layout it was saved at)."""
    eng = worker.engine
    d = os.path.join(step_dir, role)
    load_model_checkpoint(eng.bundle, os.path.join(d, "model"))
    if weights_only:
        return
    path = os.path.join(d, f"rank_{eng.ctx.rank:05d}.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: the checkpoint was saved with fewer ranks "
                                f"for role {role}; resume with the layout it was saved at, or "
                                "load its weights only")
    st = torch.load(path, map_location="cpu", weights_only=False)
    here = eng.ctx.layout.describe()
    if st["layout"] != here:
        raise RuntimeError(f"{role}: the training state in {d} was saved at {st['layout']}, this "
                           f"run uses {here}; resume at {st['layout']} (or start a new run from "
                           "its weights)")
    if eng.optimizer is not None and "optimizer" in st:
        _load_optimizer_state(eng.optimizer, st["optimizer"])
        eng.scheduler.load_state_dict(st["scheduler"])
        # Mixed precision: the model's bf16/fp16 params follow the restored fp32 main params.
        for o in _optimizers(eng.optimizer):
            if hasattr(o, "_copy_main_params_to_model_params"):
                o._copy_main_params_to_model_params()
    _set_rng_state(st["rng"])


def export_role_hf(worker, out_dir: str, dtype: str | None = None) -> dict[str, Any]:
    """Collective: writes the role's model as an HF directory (rank 0 writes)."""
    eng = worker.engine
    rank = eng.ctx.rank
    tmp = temp_dir_for(out_dir) if rank == 0 else None
    tmp = _bcast(tmp)
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
          None: None}[dtype]
    hf_files = getattr(worker.spec.model, "hf_dir", None) or getattr(worker.spec.model,
                                                                     "tokenizer", None)
    if hf_files is not None and not os.path.isdir(hf_files):
        hf_files = None
    stats = export_hf(eng.bundle, tmp, shard_bytes=2 << 30, dtype=dt, hf_files_from=hf_files)
    if rank == 0:
        publish(tmp, out_dir, overwrite=True)
    torch.distributed.barrier()
    return stats


def _bcast(obj):
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
