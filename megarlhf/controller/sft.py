"""Supervised fine-tuning: the starting policy. ``megarlhf train sft CONFIG``.

Each step draws ``train.global_batch_size`` examples (a resumable, seeded shuffle), splits them
over the actor's data-parallel ranks, and takes one optimizer step on the response tokens'
negative log-likelihood (token mean over the whole global batch). The result is saved as a
training checkpoint and exported as an HF directory (``<output_dir>/hf``) with its tokenizer.
"""

from __future__ import annotations

import os
import time
from typing import Any

from megarlhf.checkpoint.outputs import check_resume_data
from megarlhf.config import JobConfig
from megarlhf.controller.checkpointing import (
    driver_rng_state,
    resume_training_state,
    save_training_state,
    set_driver_rng_state,
)
from megarlhf.controller.cluster import Cluster
from megarlhf.controller.data import load_job_tokenizer, load_sft_samples
from megarlhf.controller.session import Session
from megarlhf.controller.state import export_role_hf
from megarlhf.engine.batch import TokenBatch
from megarlhf.engine.loss_fns import SFTLossSpec
from megarlhf.observability.divergence import check_finite


def train_sft(job: JobConfig) -> dict[str, Any]:
    """Runs SFT; returns the final metrics and the HF export directory."""
    from megarlhf.data.datasets import ResumableSampler

    tok = load_job_tokenizer(job)
    samples = load_sft_samples(job, tok)  # validates every row before any worker starts
    check_resume_data(job, {"sampler": len(samples)})  # the data a resume was saved with
    session = Session(job, total_steps=job.train.steps, desc="sft")
    sampler = ResumableSampler(len(samples), seed=job.seed, shuffle=job.data.shuffle)
    gbs = job.train.global_batch_size
    result: dict[str, Any] = {}
    try:
        with Cluster(job, roles=["actor"], rollout=False, pad_id=tok.pad_id) as cl:
            session.install_signal_handlers()  # after ray.init, which installs its own
            actor = cl["actor"]
            start = 0
            state = resume_training_state(session, cl, ["actor"])
            if state is not None:
                start = state["step"]
                sampler.load_state_dict(state["sampler"])
                set_driver_rng_state(state["rng"])
            session.start_progress(start, ("sft/loss", "sft/grad_norm"))
            last = start
            for step in range(start, job.train.steps):
                t0 = time.perf_counter()
                rows = [samples[i] for i in sampler.take(gbs)]
                batch = TokenBatch.from_sequences([r.ids for r in rows], pad_id=tok.pad_id,
                                                  fields={"loss_mask": [r.loss_mask for r in
                                                                        rows]})
                n = float(batch.fields["loss_mask"].sum())
                r = actor.train(batch, SFTLossSpec(normalizer=n, num_tokens=n))
                dt = time.perf_counter() - t0
                metrics = {"sft/loss": r.metrics["loss"], "sft/grad_norm": r.grad_norm,
                           "sft/lr": r.lr, "perf/tokens_per_s": batch.num_tokens / dt,
                           "perf/samples_per_s": len(rows) / dt, "time/step": dt}
                last = step + 1
                session.log(last, metrics)
                check_finite(metrics, step=last, checkpoint_root=session.ckpt_root)  # no save
                result = metrics
                due = job.checkpoint.save_every and last % job.checkpoint.save_every == 0
                if due or session.stop_requested:
                    save_training_state(session, cl, last, {
                        "sampler": sampler.state_dict(), "rng": driver_rng_state()}, ["actor"])
                if session.stop_requested:
                    break
            if last == job.train.steps or session.stop_requested:
                if not (job.checkpoint.save_every and last % job.checkpoint.save_every == 0):
                    save_training_state(session, cl, last, {
                        "sampler": sampler.state_dict(), "rng": driver_rng_state()}, ["actor"])
            hf_dir = os.path.join(session.output_dir, "hf")
            actor.execute(export_role_hf, hf_dir)  # the weights' own dtype
            tok.export_hf(hf_dir)
            result["hf_dir"] = hf_dir
            result["step"] = last
    finally:
        session.close()
    return result
