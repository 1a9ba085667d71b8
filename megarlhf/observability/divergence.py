"""Stopping a run whose loss or gradient norm is no longer a finite number.

A NaN or infinite loss / grad norm means the weights the optimizer just stepped are broken
(NaN spreads through every later step). :func:`check_finite` is called by every trainer right
after an update and before anything is saved, synced to the rollout engine or exported, so a
diverged run ends with :class:`DivergenceError` (exit code 1 from the CLI), its last good
checkpoint kept as ``latest`` and no ``hf/`` export of broken weights.

"Good" means: the last checkpoint whose own step had a finite loss and grad norm. A step's loss
is computed before its update, so an update that produces huge but finite weights (a learning
rate of 1e30) shows up as a NaN loss one step later: the checkpoint of the step before may
already hold that update. Finite settings (config/base.py) and clipping keep this rare.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

# Metrics whose non-finite value means broken weights: every trainer's loss and grad norm.
WATCHED_SUFFIXES = ("loss", "grad_norm")


class DivergenceError(RuntimeError):
    """The loss or gradient norm became NaN or infinite; the message says what was kept."""


def non_finite(metrics: Mapping[str, float]) -> dict[str, float]:
    """The watched metrics (``*loss``, ``*grad_norm``) of ``metrics`` that are NaN or inf."""
    bad = {}
    for k, v in metrics.items():
        name = k.rsplit("/", 1)[-1]
        if not any(name == s or name.endswith("_" + s) for s in WATCHED_SUFFIXES):
            continue
        try:
            x = float(v)
        except (TypeError, ValueError):
            continue
        if not math.isfinite(x):
            bad[k] = x
    return bad


def check_finite(metrics: Mapping[str, float], *, step: int | None = None,
                 checkpoint_root: str | None = None,
                 lr_settings: str = "actor.optimizer.lr") -> None:
    """Raises :class:`DivergenceError` when a loss or grad norm in ``metrics`` is not finite.

    Args:
        metrics: the step's metrics (``sft/loss``, ``policy/grad_norm``, ...).
        step: the step that produced them (1-based, as logged), for the message.
        checkpoint_root: the run's checkpoint directory; its ``latest`` is named as the last
            good checkpoint.
        lr_settings: the learning-rate setting(s) to name in the advice.
    """
    bad = non_finite(metrics)
    if not bad:
        return
    latest = None
    if checkpoint_root is not None:
        try:
            with open(os.path.join(checkpoint_root, "latest"), encoding="utf-8") as f:
                latest = os.path.join(checkpoint_root, f.read().strip())
        except OSError:
            pass
    where = f"at step {step}" if step is not None else "in the last update"
    kept = (f"the last good checkpoint is {latest} (continue from it with --resume once the "
            "cause is fixed)" if latest else "no checkpoint had been saved yet")
    raise DivergenceError(
        f"training diverged {where}: " + ", ".join(f"{k} = {v}" for k, v in sorted(bad.items()))
        + f". The run stopped without saving or exporting the broken weights; {kept}. Lower "
        f"{lr_settings}, keep clipping on (optimizer.clip_grad), and check the data for "
        "degenerate rows")
