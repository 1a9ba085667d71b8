"""PPO, GRPO and online DPO (synchronous). ``megarlhf train ppo|grpo|dpo CONFIG``.

One iteration (methods.md 2 and 3):

    prompts --rollout--> N samples each (token ids + behaviour log-probs)
      --> raw rewards (verifier / code tests / reward model / mix)
      --> actor log-probs (logp_old; also the rollout-vs-actor log-prob check), reference
          log-probs (KL), critic values (PPO)
      --> reward processing + advantages (megarlhf.rl, on the driver)
      --> actor (+ critic) updates: rollout_prompts / train_prompts optimizer steps per epoch
      --> weight sync actor -> rollout engine (the resharder, bounded buckets)

Online DPO replaces the last two steps of the update: per prompt the best and the worst sample
by reward form a (chosen, rejected) pair trained with the DPO loss against the reference.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from megarlhf import rl
from megarlhf.checkpoint.outputs import check_resume_data
from megarlhf.config import JobConfig
from megarlhf.controller.checkpointing import (
    driver_rng_state,
    resume_training_state,
    save_training_state,
    set_driver_rng_state,
)
from megarlhf.controller.cluster import Cluster
from megarlhf.controller.data import load_job_tokenizer, load_prompt_items
from megarlhf.controller.evaluate import greedy_accuracy
from megarlhf.controller.experience import PromptItem, build_rollout_batch, compute_advantages
from megarlhf.controller.rewards import RewardComputer
from megarlhf.controller.session import Session
from megarlhf.engine.batch import TokenBatch
from megarlhf.engine.loss_fns import DPOLossSpec, PolicyLossSpec, ValueLossSpec
from megarlhf.observability.divergence import check_finite


class LogprobMismatchError(RuntimeError):
    """The rollout engine and the actor disagree on log-probs beyond the configured threshold."""


def sampling_params(job: JobConfig, tokenizer, step: int, n: int | None = None):
    from megarlhf.rollout.base import SamplingParams

    r = job.rollout
    stops = tuple(dict.fromkeys([tokenizer.eos_id, *r.stop_token_ids]))
    return SamplingParams(n=n or job.batch.n_samples_per_prompt, temperature=r.temperature,
                          top_p=r.top_p, top_k=r.top_k, max_new_tokens=r.max_new_tokens,
                          stop_token_ids=stops, seed=job.seed * 1_000_003 + step,
                          logprobs=r.temperature > 0 and r.top_p >= 1.0 and r.top_k < 0)


def _mean_dicts(ds: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for d in ds for k in d}
    return {k: sum(d.get(k, 0.0) for d in ds) / max(1, sum(k in d for d in ds)) for k in keys}


class RLTrainer:
    """The synchronous RL loop for one job (see the module docstring)."""

    def __init__(self, job: JobConfig):
        self.job = job
        self.tok = load_job_tokenizer(job)
        self.prompts = load_prompt_items(job, self.tok)
        self.eval_prompts = (load_prompt_items(job, self.tok, what="eval_path")
                             [: job.train.eval_prompts] if job.data.eval_path else [])
        self.estimator = job.advantage_estimator
        self.N = job.batch.n_samples_per_prompt
        self.temperature = job.rollout.temperature if job.rollout.temperature > 0 else 1.0
        self.session: Session | None = None
        self.roles: list[str] = []

    # ---------------------------------------------------------------- one iteration
    def generate(self, cl: Cluster, prompts: list[PromptItem], step: int):
        cl.activate("rollout")
        outs = cl.rollout.generate([p.ids for p in prompts],
                                   sampling_params(self.job, self.tok, step))
        return build_rollout_batch(prompts, outs, pad_id=self.tok.pad_id)

    def score(self, cl: Cluster, batch: TokenBatch, metrics: dict[str, float], *,
              check: bool = True) -> None:
        """Actor (logp_old), reference and critic outputs, into the batch's fields.

        ``logp_old`` is the behaviour policy's (the rollout engine's) log-probs with
        ``algorithm.use_behaviour_logprobs``, except with truncated importance sampling
        (``algorithm.tis_cap``): then ``logp_old`` is the learner's own log-probs before the
        update (the proximal policy) and the loss's weight ``min(pi / pi_behaviour, cap)``
        carries the behaviour correction (with ``logp_old = logp_behaviour`` the ratio and the
        weight would both apply ``pi / pi_behaviour``). ``check=False`` skips the rollout-vs-actor
        log-prob check (asynchronous mode: a stale batch differs by design).
        """
        job, T = self.job, self.temperature
        mask = batch.fields["response_mask"].bool()
        behaviour_ok = job.algorithm.use_behaviour_logprobs and job.algorithm.tis_cap is None \
            and bool(batch.fields["logp_behaviour"].abs().sum() > 0)
        if not behaviour_ok:
            cl.activate("actor")
            batch.fields["logp_old"] = cl["actor"].forward(batch, temperature=T)["logp"]
            if check:
                self.check_logprobs(batch.fields["logp_behaviour"], batch.fields["logp_old"],
                                    mask, metrics)
        else:
            batch.fields["logp_old"] = batch.fields["logp_behaviour"]
            k = min(job.rollout.logprob_check_samples, batch.batch_size)
            if check and k and job.rollout.logprob_check_action != "off":
                cl.activate("actor")
                probe = batch.select(list(range(k)))
                lp = cl["actor"].forward(probe, temperature=T)["logp"]
                self.check_logprobs(probe.fields["logp_behaviour"], lp,
                                    probe.fields["response_mask"].bool(), metrics)
        if "reference" in cl:
            cl.activate("reference")
            batch.fields["logp_ref"] = cl["reference"].forward(batch, temperature=T)["logp"]
        if "critic" in cl:
            cl.activate("critic")
            batch.fields["values_old"] = cl["critic"].forward(batch)["values"]

    def check_logprobs(self, logp_rollout, logp_actor, mask, metrics) -> None:
        """Rollout engine vs actor on the same tokens: log, and warn or stop over threshold."""
        if not bool((logp_rollout.abs() > 0).any()):
            return  # the engine returned no log-probs (top-k/top-p sampling)
        d = (logp_rollout - logp_actor).abs()[mask]
        if d.numel() == 0:
            return
        mx, mean = float(d.max()), float(d.mean())
        metrics["rollout/logprob_diff_max"] = mx
        metrics["rollout/logprob_diff_mean"] = mean
        r = self.job.rollout
        if r.logprob_check_action != "off" and mx > r.logprob_check_threshold:
            msg = (f"rollout engine and actor disagree on log-probs: max |diff| = {mx:.3g} "
                   f"(mean {mean:.3g}) > rollout.logprob_check_threshold="
                   f"{r.logprob_check_threshold}. Check the weight sync, the sampling "
                   "temperature and the model dtype; raise the threshold or set "
                   "rollout.logprob_check_action=warn to continue")
            if r.logprob_check_action == "stop":
                raise LogprobMismatchError(msg)
            self._warn(msg)

    def _warn(self, msg: str) -> None:
        if self.session is not None:
            self.session.log_line(f"megarlhf: warning: {msg}")

    def update(self, cl: Cluster, batch: TokenBatch, metrics: dict[str, float]) -> None:
        """Policy (and critic) optimizer steps over the rollout batch."""
        job, algo = self.job, self.job.algorithm
        steps = job.batch.steps_per_rollout
        per = job.batch.train_samples_global
        actor_m, critic_m = [], []
        for _ in range(algo.ppo_epochs):
            for k in range(steps):
                mini = batch.select(list(range(k * per, (k + 1) * per)))
                mask = mini.fields["response_mask"].bool()
                n_tok = float(mask.sum())
                norm = float(rl.aggregate_normalizer(mask, algo.loss_agg_mode))
                lc = float(job.rollout.max_new_tokens) \
                    if algo.loss_agg_mode == "seq_mean_token_sum_norm" else None
                if "critic" in cl:
                    cl.activate("critic")
                    r = cl["critic"].train(mini, ValueLossSpec(
                        normalizer=norm, num_tokens=n_tok, clip_eps=algo.value_clip_eps,
                        coef=algo.value_loss_coef, agg_mode=algo.loss_agg_mode,
                        length_constant=lc))
                    critic_m.append(dict(r.metrics, grad_norm=r.grad_norm))
                cl.activate("actor")
                r = cl["actor"].train(mini, PolicyLossSpec(
                    normalizer=norm, num_tokens=n_tok, eps_low=algo.clip_eps_low,
                    eps_high=algo.clip_eps_high, dual_clip=algo.dual_clip,
                    agg_mode=algo.loss_agg_mode, length_constant=lc,
                    entropy_coef=algo.entropy_coef,
                    kl_coef=0.0 if algo.kl_in_reward else algo.kl_coef,
                    kl_estimator=algo.kl_estimator, tis_cap=algo.tis_cap,
                    temperature=self.temperature))
                actor_m.append(dict(r.metrics, grad_norm=r.grad_norm, lr=r.lr))
        a = _mean_dicts(actor_m)
        for k in ("loss", "pg_loss", "clip_frac", "approx_kl", "entropy", "ratio_mean",
                  "grad_norm", "lr", "kl_loss"):
            if k in a:
                metrics[f"policy/{k}"] = a[k]
        if critic_m:
            c = _mean_dicts(critic_m)
            metrics["critic/value_loss"] = c.get("value_loss", c.get("loss", 0.0))
            metrics["critic/grad_norm"] = c["grad_norm"]
            if "value_clip_frac" in c:
                metrics["critic/value_clip_frac"] = c["value_clip_frac"]

    def update_dpo(self, cl: Cluster, batch: TokenBatch, raw: torch.Tensor,
                   metrics: dict[str, float]) -> None:
        """Online DPO: best vs worst sample of each prompt, DPO loss against the reference."""
        job = self.job
        chosen, rejected, valid = rl.select_dpo_pairs(raw, self.N)
        idx = [i for c, r, v in zip(chosen.tolist(), rejected.tolist(), valid.tolist()) if v
               for i in (c, r)]
        metrics["dpo/valid_pair_frac"] = float(valid.float().mean())
        if not idx:
            self._warn("online DPO: every prompt's samples tied on reward; no update this step")
            return
        pairs = batch.select(idx)
        mask = pairs.fields["response_mask"].bool()
        pairs.fields["ref_logp_sum"] = rl.sequence_logprobs(pairs.fields["logp_ref"], mask)
        n_pairs = len(idx) // 2
        # One optimizer step per pair batch of at most train_prompts pairs, DP-divisible.
        per = 2 * job.batch.train_prompts_global
        ms = []
        for k in range(0, len(idx), per):
            part = pairs.select(list(range(k, min(k + per, len(idx)))))
            cl.activate("actor")
            r = cl["actor"].train(part, DPOLossSpec(num_pairs=part.batch_size // 2,
                                                    beta=job.algorithm.dpo_beta,
                                                    temperature=self.temperature))
            ms.append(dict(r.metrics, grad_norm=r.grad_norm, lr=r.lr))
        m = _mean_dicts(ms)
        metrics.update({f"dpo/{k}": v for k, v in m.items() if k in (
            "loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward")})
        metrics["policy/loss"] = m["loss"]
        metrics["policy/grad_norm"] = m["grad_norm"]
        metrics["policy/lr"] = m["lr"]
        metrics["dpo/num_pairs"] = float(n_pairs)

    def sync(self, cl: Cluster, metrics: dict[str, float]) -> None:
        cl.activate("actor", "rollout")
        t0 = time.perf_counter()
        stats = cl["actor"].sync_weights_to(cl.rollout)
        dt = time.perf_counter() - t0
        nbytes = stats[0].bytes if stats else 0
        metrics["time/weight_sync"] = dt
        metrics["perf/weight_sync_gb_per_s"] = nbytes / max(dt, 1e-9) / 1e9

    def evaluate(self, cl: Cluster) -> dict[str, float]:
        if not self.eval_prompts:
            return {}
        cl.activate("rollout")
        return greedy_accuracy(cl.rollout, self.eval_prompts, self.tok,
                               self.job.rollout.max_new_tokens)

    # ---------------------------------------------------------------- the loop
    def run(self) -> dict[str, Any]:
        from megarlhf.data.datasets import ResumableSampler

        job = self.job
        check_resume_data(job, {"sampler": len(self.prompts)})  # before any worker starts
        self.session = session = Session(job, total_steps=job.train.steps, desc=job.kind)
        sampler = ResumableSampler(len(self.prompts), seed=job.seed, shuffle=job.data.shuffle)
        roles = [r for r in ("actor", "critic", "reference", "reward_model")]
        history: dict[str, Any] = {"eval": []}
        try:
            with Cluster(job, pad_id=self.tok.pad_id) as cl:
                session.install_signal_handlers()  # after ray.init, which installs its own
                roles = [r for r in roles if r in cl]
                rewards = RewardComputer(job, self.tok, cl.groups.get("reward_model"))
                start = 0
                state = resume_training_state(session, cl, roles)
                if state is not None:
                    start = state["step"]
                    sampler.load_state_dict(state["sampler"])
                    set_driver_rng_state(state["rng"])
                    history = state.get("history", history)
                m0: dict[str, float] = {}
                self.sync(cl, m0)  # the engine serves exactly the actor's weights
                if start == 0 and job.train.eval_every:
                    ev = self.evaluate(cl)
                    if ev:
                        session.log(0, ev)
                        history["eval"].append([0, ev["eval/accuracy"]])
                        session.log_line(f"step 0: eval accuracy {ev['eval/accuracy']:.3f}")
                session.start_progress(start, ("reward/raw_mean", "policy/kl_ref",
                                               "eval/accuracy"))
                self.roles = roles
                last = self.train_loop(cl, rewards, sampler, start, history)
                history["step"] = last
                if job.kind != "bon" and last == job.train.steps:
                    import os

                    from megarlhf.controller.state import export_role_hf

                    hf_dir = os.path.join(session.output_dir, "hf")
                    cl["actor"].execute(export_role_hf, hf_dir)
                    if not os.path.isfile(os.path.join(hf_dir, "tokenizer_config.json")):
                        self.tok.export_hf(hf_dir)
                    history["hf_dir"] = hf_dir
        finally:
            session.close()
        return history

    def train_loop(self, cl: Cluster, rewards: RewardComputer, sampler, start: int,
                   history: dict[str, Any]) -> int:
        """Steps ``start .. train.steps - 1`` one after the other; returns the last step done."""
        last = start
        for step in range(start, self.job.train.steps):
            metrics = self.step(cl, rewards, sampler, step)
            last = step + 1
            metrics.update(self.maybe_evaluate(cl, last, history))
            if not self.end_of_step(cl, last, metrics, history, sampler.state_dict()):
                break
        return last

    def maybe_evaluate(self, cl: Cluster, last: int, history: dict[str, Any]
                       ) -> dict[str, float]:
        """Greedy held-out evaluation after step ``last`` when ``train.eval_every`` says so."""
        every = self.job.train.eval_every
        if not (every and last % every == 0):
            return {}
        ev = self.evaluate(cl)
        if ev:
            history["eval"].append([last, ev["eval/accuracy"]])
        return ev

    def end_of_step(self, cl: Cluster, last: int, metrics: dict[str, float],
                    history: dict[str, Any], sampler_state: dict[str, Any],
                    extra_state: dict[str, Any] | None = None) -> bool:
        """Logs step ``last`` and saves the training state when due; False: stop requested.

        ``sampler_state`` is the data position *after* the batches of steps ``< last``.
        """
        job, session = self.job, self.session
        session.log(last, metrics)
        history["last"] = metrics
        due = job.checkpoint.save_every and last % job.checkpoint.save_every == 0
        if due or session.stop_requested or last == job.train.steps:
            save_training_state(session, cl, last, {
                "sampler": sampler_state, "rng": driver_rng_state(), "history": history,
                **(extra_state or {})}, self.roles)
        return not session.stop_requested

    def step(self, cl: Cluster, rewards: RewardComputer, sampler, step: int) -> dict[str, float]:
        """One synchronous iteration: generate, learn, sync."""
        t0 = time.perf_counter()
        prompts = [self.prompts[i] for i in sampler.take(self.job.batch.rollout_prompts_global)]
        with self.session.timer("generate"):
            batch, info = self.generate(cl, prompts, step)
        metrics = self.learn(cl, rewards, prompts, batch, info)
        with self.session.timer("weight_sync"):
            self.sync(cl, metrics)
        self.step_metrics(batch, metrics, time.perf_counter() - t0)
        metrics["rollout/staleness"] = 0.0
        return metrics

    def learn(self, cl: Cluster, rewards: RewardComputer, prompts: list[PromptItem],
              batch: TokenBatch, info: dict[str, Any], *, check_logprobs: bool = True
              ) -> dict[str, float]:
        """The learner's part of a step on a generated batch: rewards, scoring, advantages,
        updates. Returns the step's metrics so far."""
        job, timer = self.job, self.session.timer
        metrics: dict[str, float] = {}
        with timer("reward"):
            if "reward_model" in cl:
                cl.activate("reward_model")
            raw, rm = rewards(prompts, batch, info["responses"])
            metrics.update(rm)
        with timer("logprob"):
            self.score(cl, batch, metrics, check=check_logprobs)
        mask = batch.fields["response_mask"].bool()
        fields, am = compute_advantages(
            batch, raw, job.algorithm, self.estimator, self.N,
            values=batch.fields.get("values_old"), logp=batch.fields["logp_old"],
            logp_ref=batch.fields.get("logp_ref"))
        batch.fields.update({k: v for k, v in fields.items() if v.dim() == 2})
        metrics.update(am)
        if "values_old" in batch.fields:
            metrics["critic/explained_variance"] = float(rl.explained_variance(
                batch.fields["values_old"], batch.fields["returns"], mask))
        with timer("train"):
            if job.kind == "dpo":
                self.update_dpo(cl, batch, raw, metrics)
            else:
                self.update(cl, batch, metrics)
        # Before the weight sync and any save: NaN/inf loss or grad norm stops the run.
        check_finite(metrics, checkpoint_root=self.session.ckpt_root,
                     lr_settings="actor.optimizer.lr (critic.optimizer.lr)")
        return metrics

    def step_metrics(self, batch: TokenBatch, metrics: dict[str, float], dt: float) -> None:
        """Batch statistics, the phase timers and throughput over a step of ``dt`` seconds."""
        resp_len = batch.fields["response_length"].float()
        metrics["policy/response_length"] = float(resp_len.mean())
        metrics["rollout/truncated_frac"] = float(batch.fields["truncated"].float().mean())
        metrics.update({f"time/{k}": v for k, v in self.session.timer.pop().items()})
        metrics["time/step"] = dt
        metrics["perf/tokens_per_s"] = float(batch.num_tokens) / dt
        metrics["perf/samples_per_s"] = batch.batch_size / dt


def train_rl(job: JobConfig) -> dict[str, Any]:
    # Asynchronous mode (issue 9): generation overlapped with training, staleness <= K.
    if job.asynchronous.enabled:
        from megarlhf.controller.async_rl import AsyncRLTrainer

        return AsyncRLTrainer(job).run()
    return RLTrainer(job).run()
