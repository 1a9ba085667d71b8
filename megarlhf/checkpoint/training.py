"""Full training-state checkpoints of a job: every trained or frozen role + the driver's state.

Layout of the checkpoint root (``checkpoint.dir``, default ``<output_dir>/checkpoints``)::

    step_000010/<role>/       one role's state (weights as a reshardable distributed checkpoint,
                              optimizer/scheduler/RNG per rank; :mod:`.role_state`)
    step_000010/driver_state.json   the driver's state: step, data position, RNG, history
    step_000010/COMPLETE      written after everything else of the save
    latest                    name of the newest *complete* save (moved atomically, last)

The protocol (:class:`CheckpointDir`): a save writes every role, then the driver state, then
the ``COMPLETE`` marker, and only then rewrites ``latest`` (write to a temp file, fsync,
rename), so a crash or ``kill -9`` during a save leaves the previous checkpoint as ``latest``.
Older complete saves beyond ``keep_last`` and incomplete leftovers older than the newest complete
save are removed after each save. Resuming reads ``latest`` and refuses a pointer to an
incomplete directory.

The driver side takes the cluster as an argument (anything with ``cluster[role].execute(fn,
*args)`` running ``fn(worker, *args)`` on every rank of the role), so the protocol is tested
without Ray.
"""

from __future__ import annotations

import ast
import json
import os
import random
import shutil
import time
from typing import Any

import torch

from megarlhf.checkpoint.role_state import load_role_state, save_role_state


class CheckpointDir:
    """The step directories, ``COMPLETE`` markers and ``latest`` pointer under ``root``.

    Args:
        root: the checkpoint root (created).
        keep_last: complete saves to keep.
    """

    def __init__(self, root: str, keep_last: int):
        self.root = os.path.abspath(root)
        self.keep_last = keep_last

    def step_dir(self, step: int) -> str:
        return os.path.join(self.root, f"step_{step:06d}")

    def latest_step_dir(self) -> str | None:
        """The newest complete checkpoint, or None."""
        p = os.path.join(self.root, "latest")
        if not os.path.isfile(p):
            return None
        with open(p, encoding="utf-8") as f:
            name = f.read().strip()
        d = os.path.join(self.root, name)
        if not os.path.isfile(os.path.join(d, "COMPLETE")):
            raise RuntimeError(f"{p} points at {name}, which is not a complete checkpoint; "
                               "remove the pointer or restore the directory")
        return d

    def begin(self, step: int) -> str:
        """A fresh, empty directory for the save of ``step``.

        A directory of that step that exists already is a leftover of an interrupted save or of
        an earlier run in the same directory (started without resuming); it is replaced. A run
        saves each step once (:class:`megarlhf.controller.run.Trainer`).
        """
        d = self.step_dir(step)
        if os.path.exists(d):
            shutil.rmtree(d)
        os.makedirs(d)
        return d

    def mark_complete(self, step_dir: str, driver_state: dict[str, Any]) -> None:
        """Writes the driver state and COMPLETE marker, then moves ``latest`` (atomically)."""
        _write_synced(os.path.join(step_dir, "driver_state.json"),
                      json.dumps(driver_state, indent=1))
        _write_synced(os.path.join(step_dir, "COMPLETE"), time.strftime("%Y-%m-%dT%H:%M:%S"))
        tmp = os.path.join(self.root, f".latest.tmp-{os.getpid()}")
        _write_synced(tmp, os.path.basename(step_dir))
        os.replace(tmp, os.path.join(self.root, "latest"))
        self._prune()

    def _prune(self) -> None:
        done = sorted(d for d in os.listdir(self.root)
                      if d.startswith("step_")
                      and os.path.isfile(os.path.join(self.root, d, "COMPLETE")))
        for d in done[:-self.keep_last]:
            shutil.rmtree(os.path.join(self.root, d), ignore_errors=True)
        # Incomplete saves older than the newest complete one are leftovers of a crash.
        if done:
            for d in os.listdir(self.root):
                p = os.path.join(self.root, d)
                if d.startswith("step_") and d < done[-1] and not os.path.isfile(
                        os.path.join(p, "COMPLETE")):
                    shutil.rmtree(p, ignore_errors=True)

    def read_driver_state(self, step_dir: str) -> dict[str, Any]:
        with open(os.path.join(step_dir, "driver_state.json"), encoding="utf-8") as f:
            return json.load(f)


def _write_synced(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def save_training_state(ckpt: CheckpointDir, cluster, step: int, driver_state: dict[str, Any],
                        roles: list[str]) -> str:
    """Saves every role of ``roles`` and the driver state as step ``step``; returns its dir."""
    d = ckpt.begin(step)
    for role in roles:
        cluster[role].execute(save_role_state, d, role)
    ckpt.mark_complete(d, dict(driver_state, step=step))
    return d


def load_training_state(ckpt: CheckpointDir, cluster, roles: list[str]
                        ) -> tuple[str, dict[str, Any]] | None:
    """Restores every role of ``roles`` from the newest complete checkpoint; returns its
    directory and driver state, or None when there is none."""
    d = ckpt.latest_step_dir()
    if d is None:
        return None
    for role in roles:
        cluster[role].execute(load_role_state, d, role)
    return d, ckpt.read_driver_state(d)


def driver_rng_state() -> dict[str, Any]:
    """The driver's Python and torch RNG states, JSON-serialisable."""
    return {"python": repr(random.getstate()), "torch": torch.get_rng_state().tolist()}


def set_driver_rng_state(st: dict[str, Any]) -> None:
    random.setstate(ast.literal_eval(st["python"]))
    torch.set_rng_state(torch.tensor(st["torch"], dtype=torch.uint8))
