"""A run's session on the driver: output directory, metrics, progress, stop signals.

Layout of ``output_dir``::

    config.yaml                 the resolved config of the run
    tensorboard/                TensorBoard events + metrics.jsonl (every logged scalar)
    checkpoints/                training checkpoints (:mod:`megarlhf.checkpoint.training`)
    hf/                         the trained model as an HF directory, at the end of the run

SIGTERM / SIGINT ask the loop to stop: it finishes the current step, saves, and exits cleanly
(:class:`megarlhf.controller.run.Trainer`); a second signal stops at once.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from megarlhf.checkpoint.outputs import claim_run_dir
from megarlhf.checkpoint.training import CheckpointDir
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
        self.checkpoints = CheckpointDir(job.checkpoint.dir or os.path.join(self.output_dir,
                                                                            "checkpoints"),
                                         keep_last=job.checkpoint.keep_last)
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
        """Metrics of ``step`` to TensorBoard and metrics.jsonl every ``logging.log_every``
        steps (and at the last step, and whenever they hold an evaluation); the progress bar
        shows every step."""
        every = self.job.logging.log_every
        if step % every == 0 or step >= self.total_steps \
                or any(k.startswith(("eval/", "bon/")) for k in metrics):
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
