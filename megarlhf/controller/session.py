"""A run's session on the driver: output directory, metrics, progress, stop signals, checkpoints.

Layout of ``output_dir``::

    config.yaml                 the resolved config of the run
    tensorboard/                TensorBoard events + metrics.jsonl (every logged scalar)
    checkpoints/step_000010/    one full training state per save (see TrainingCheckpoint)
    checkpoints/latest          name of the newest *complete* save (moved atomically last)

A save is complete when its ``COMPLETE`` marker exists; ``latest`` is rewritten (write to a temp
file, fsync, rename) only after that, so a crash or ``kill -9`` during a save leaves the previous
checkpoint as ``latest``. SIGTERM / SIGINT ask the loop to stop: it finishes the current step,
saves, and exits cleanly.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from typing import Any

from megarlhf.checkpoint.outputs import claim_run_dir
from megarlhf.config import JobConfig, dump_config
from megarlhf.observability import MetricsWriter, PhaseTimer, Progress


class Session:
    """Driver-side state of one run."""

    def __init__(self, job: JobConfig, *, total_steps: int, desc: str = ""):
        self.job = job
        # Refuses foreign files, a previous run without resume/overwrite, outputs overlapping
        # inputs and a broken resume pointer, before anything is written (issue 15).
        self.output_dir = claim_run_dir(job)
        dump_config(job, os.path.join(self.output_dir, "config.yaml"))
        self.ckpt_root = os.path.abspath(job.checkpoint.dir or os.path.join(self.output_dir,
                                                                            "checkpoints"))
        self.writer = MetricsWriter(os.path.join(self.output_dir, "tensorboard"),
                                    enabled=job.logging.tensorboard)
        self.timer = PhaseTimer()
        self.total_steps = total_steps
        self.desc = desc or job.kind
        self.progress: Progress | None = None
        self.stop_requested = False
        self._old_handlers: dict[int, Any] = {}

    # -- signals ---------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        """SIGTERM / SIGINT ask the loop to stop after the current step (and save).

        Call after ``ray.init``: Ray's driver installs its own SIGTERM handler, which exits.
        """
        def handler(signum, frame):
            if self.stop_requested:  # a second signal: stop now
                raise KeyboardInterrupt
            self.stop_requested = True
            self.log_line(f"megarlhf: got signal {signum}; saving a checkpoint after this step "
                          "and exiting (send it again to stop at once)")

        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old_handlers[s] = signal.signal(s, handler)
            except ValueError:  # not the main thread
                pass

    def restore_signal_handlers(self) -> None:
        for s, h in self._old_handlers.items():
            signal.signal(s, h)
        self._old_handlers.clear()

    # -- console / metrics -------------------------------------------------------------------
    def start_progress(self, initial: int, keys: tuple[str, ...]) -> None:
        self.progress = Progress(self.total_steps, initial=initial, desc=self.desc,
                                 enabled=self.job.logging.progress_bar, keys=keys)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.writer.log(step, metrics)
        if self.progress is not None:
            self.progress.update(metrics)

    def log_line(self, line: str) -> None:
        if self.progress is not None:
            self.progress.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        self.writer.close()
        self.restore_signal_handlers()

    # -- checkpoints ---------------------------------------------------------------------------
    def step_dir(self, step: int) -> str:
        return os.path.join(self.ckpt_root, f"step_{step:06d}")

    def latest_step_dir(self) -> str | None:
        """The newest complete checkpoint, or None."""
        p = os.path.join(self.ckpt_root, "latest")
        if not os.path.isfile(p):
            return None
        name = open(p, encoding="utf-8").read().strip()
        d = os.path.join(self.ckpt_root, name)
        if not os.path.isfile(os.path.join(d, "COMPLETE")):
            raise RuntimeError(f"{p} points at {name}, which is not a complete checkpoint; "
                               "remove the pointer or restore the directory")
        return d

    def mark_complete(self, step_dir: str, driver_state: dict[str, Any]) -> None:
        """Writes the driver state and COMPLETE marker, then moves ``latest`` (atomically)."""
        with open(os.path.join(step_dir, "driver_state.json"), "w", encoding="utf-8") as f:
            json.dump(driver_state, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        marker = os.path.join(step_dir, "COMPLETE")
        with open(marker, "w", encoding="utf-8") as f:
            f.write(time.strftime("%Y-%m-%dT%H:%M:%S"))
            f.flush()
            os.fsync(f.fileno())
        tmp = os.path.join(self.ckpt_root, f".latest.tmp-{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(os.path.basename(step_dir))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(self.ckpt_root, "latest"))
        self._prune()

    def _prune(self) -> None:
        keep = self.job.checkpoint.keep_last
        done = sorted(d for d in os.listdir(self.ckpt_root)
                      if d.startswith("step_")
                      and os.path.isfile(os.path.join(self.ckpt_root, d, "COMPLETE")))
        for d in done[:-keep]:
            shutil.rmtree(os.path.join(self.ckpt_root, d), ignore_errors=True)
        # Incomplete saves older than the newest complete one are leftovers of a crash.
        if done:
            for d in os.listdir(self.ckpt_root):
                p = os.path.join(self.ckpt_root, d)
                if d.startswith("step_") and d < done[-1] and not os.path.isfile(
                        os.path.join(p, "COMPLETE")):
                    shutil.rmtree(p, ignore_errors=True)

    def read_driver_state(self, step_dir: str) -> dict[str, Any]:
        with open(os.path.join(step_dir, "driver_state.json"), encoding="utf-8") as f:
            return json.load(f)
