"""What a run shows: TensorBoard scalars with stable names, phase timers, throughput, progress.

Metric names are part of the product (dashboards and the study's figures are built from them);
:data:`METRIC_NAMES` lists every name the RL loop logs, and tests check the loop logs exactly
these. Names are ``<group>/<metric>``:

* ``reward/``   raw_mean, raw_std, normalized_mean, accuracy (verifier), per-source means
* ``policy/``   kl_ref (to the reference), entropy, clip_frac, approx_kl (old -> new),
                pg_loss, loss, grad_norm, lr, response_length, ratio_mean
* ``critic/``   value_loss, explained_variance, value_clip_frac, grad_norm
* ``rollout/``  logprob_diff_max, logprob_diff_mean (rollout engine vs actor), staleness,
                truncated_frac
* ``perf/``     tokens_per_s, samples_per_s, weight_sync_gb_per_s
* ``time/``     generate, reward, logprob, train, weight_sync, step (seconds)
* ``eval/``     accuracy (greedy on held-out prompts)
"""

from __future__ import annotations

import math
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

METRIC_NAMES = {
    "reward": ["raw_mean", "raw_std", "normalized_mean", "accuracy"],
    "policy": ["kl_ref", "entropy", "clip_frac", "approx_kl", "pg_loss", "loss", "grad_norm",
               "lr", "response_length", "ratio_mean"],
    "critic": ["value_loss", "explained_variance", "value_clip_frac", "grad_norm"],
    "rollout": ["logprob_diff_max", "logprob_diff_mean", "staleness", "truncated_frac"],
    "perf": ["tokens_per_s", "samples_per_s", "weight_sync_gb_per_s"],
    "time": ["generate", "reward", "logprob", "train", "weight_sync", "step"],
    "eval": ["accuracy"],
}


class PhaseTimer:
    """Wall-clock seconds per named phase; ``with timer("generate"): ...``."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t0

    def pop(self) -> dict[str, float]:
        out = dict(self.seconds)
        self.seconds.clear()
        return out


class MetricsWriter:
    """TensorBoard writer (rank 0 / the driver only) plus a JSONL copy for scripts and tests."""

    def __init__(self, log_dir: str | None, enabled: bool = True):
        self.log_dir = log_dir
        self._tb = None
        self._jsonl = None
        if log_dir and enabled:
            import os

            os.makedirs(log_dir, exist_ok=True)
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=log_dir)
            self._jsonl = open(os.path.join(log_dir, "metrics.jsonl"), "a", encoding="utf-8")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        import json

        clean = {k: float(v) for k, v in metrics.items()
                 if v is not None and isinstance(v, (int, float)) and math.isfinite(float(v))}
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
            self._jsonl.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()


class Progress:
    """A console progress bar with ETA (tqdm) and a one-line summary per step."""

    def __init__(self, total: int, initial: int = 0, desc: str = "", enabled: bool = True,
                 keys: tuple[str, ...] = ()):
        self.keys = keys
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, file=sys.stdout,
                             dynamic_ncols=True, leave=True)

    def update(self, metrics: dict[str, float]) -> None:
        if self._bar is None:
            return
        shown = {k.split("/")[-1]: f"{metrics[k]:.4g}" for k in self.keys if k in metrics}
        self._bar.set_postfix(shown, refresh=False)
        self._bar.update(1)

    def write(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
