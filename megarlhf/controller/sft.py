"""Supervised fine-tuning: the starting policy. ``megarlhf train sft CONFIG``.

Each step draws ``train.global_batch_size`` examples (a resumable, seeded shuffle), splits them
over the actor's data-parallel ranks, and takes one optimizer step on the response tokens'
negative log-likelihood (token mean over the whole global batch). Session, resume, saves, the
HF export (``<output_dir>/hf``, with the tokenizer) and signals are the run skeleton's
(:class:`~megarlhf.controller.run.Trainer`).
"""

from __future__ import annotations

import time
from typing import Any

from megarlhf.config import JobConfig
from megarlhf.controller.cluster import Cluster
from megarlhf.controller.run import Trainer
from megarlhf.data.datasets import ResumableSampler
from megarlhf.data.job_data import load_sft_samples
from megarlhf.engine.batch import TokenBatch
from megarlhf.engine.loss_fns import SFTLossSpec


class SFTTrainer(Trainer):
    desc = "sft"
    progress_keys = ("sft/loss", "sft/grad_norm")

    def __init__(self, job: JobConfig):
        super().__init__(job)
        self.samples = load_sft_samples(job, self.tokenizer)  # every row checked up front
        self.sampler = ResumableSampler(len(self.samples), seed=job.seed,
                                        shuffle=job.data.shuffle)

    def step(self, cl: Cluster, step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        rows = [self.samples[i] for i in self.sampler.take(self.job.train.global_batch_size)]
        batch = TokenBatch.from_sequences([r.ids for r in rows], pad_id=self.tokenizer.pad_id,
                                          fields={"loss_mask": [r.loss_mask for r in rows]})
        n = float(batch.fields["loss_mask"].sum())
        r = cl["actor"].train(batch, SFTLossSpec(normalizer=n, num_tokens=n))
        dt = time.perf_counter() - t0
        metrics = {"sft/loss": r.metrics["loss"], "sft/grad_norm": r.grad_norm, "sft/lr": r.lr,
                   "perf/tokens_per_s": batch.num_tokens / dt,
                   "perf/samples_per_s": len(rows) / dt, "time/step": dt}
        metrics.update({k: v for k, v in r.metrics.items() if k.startswith("moe/")})  # router
        return metrics

    def data_sizes(self) -> dict[str, int]:
        return {"sampler": len(self.samples)}

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])


def train_sft(job: JobConfig) -> dict[str, Any]:
    """Runs SFT; returns the last step's metrics, ``step`` and the HF export directory."""
    return SFTTrainer(job).run()
