"""Full training-state checkpoints of a job: every trained or frozen role + the driver's state.

A save writes ``step_XXXXXX/<role>/`` for each role (weights as a reshardable distributed
checkpoint, optimizer/scheduler/RNG per rank, see :mod:`megarlhf.checkpoint.role_state`), then the
driver's state (step, data position, RNG) and the ``COMPLETE`` marker, and only then moves
``latest`` (:class:`~megarlhf.controller.session.Session`).
"""

from __future__ import annotations

import os
from typing import Any

from megarlhf.controller.session import Session
from megarlhf.checkpoint.role_state import load_role_state, save_role_state


def save_training_state(session: Session, cluster, step: int, driver_state: dict[str, Any],
                        roles: list[str]) -> str:
    d = session.step_dir(step)
    if os.path.exists(d):  # a leftover of an interrupted save of the same step
        import shutil

        shutil.rmtree(d)
    os.makedirs(d)
    for role in roles:
        cluster[role].execute(save_role_state, d, role)
    session.mark_complete(d, dict(driver_state, step=step))
    return d


def resume_training_state(session: Session, cluster, roles: list[str]) -> dict[str, Any] | None:
    """Loads the newest complete checkpoint when ``checkpoint.resume`` is set; None otherwise."""
    if not session.job.checkpoint.resume:
        return None
    d = session.latest_step_dir()
    if d is None:
        session.log_line(f"megarlhf: checkpoint.resume=true but {session.ckpt_root} holds no "
                         "complete checkpoint; starting from scratch")
        return None
    for role in roles:
        cluster[role].execute(load_role_state, d, role)
    state = session.read_driver_state(d)
    session.log_line(f"megarlhf: resumed from {d} (step {state['step']})")
    return state


def driver_rng_state() -> dict[str, Any]:
    import random

    import torch

    return {"python": repr(random.getstate()), "torch": torch.get_rng_state().tolist()}


def set_driver_rng_state(st: dict[str, Any]) -> None:
    import ast
    import random

    import torch

    random.setstate(ast.literal_eval(st["python"]))
    torch.set_rng_state(torch.tensor(st["torch"], dtype=torch.uint8))
