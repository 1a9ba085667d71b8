"""PPO, GRPO and online DPO (synchronous). ``megarlhf train ppo|grpo|dpo CONFIG``.

One iteration (methods.md 2 and 3), :meth:`RLTrainer.step`, each phase a method that returns
its result::

    rollout = generate(prompts)        N samples per prompt: token ids, texts, behaviour log-probs
    raw     = rewards(rollout)         verifier / code tests / reward model / a weighted mix
    annotate(batch)                    logp_old (+ the rollout-vs-actor log-prob check),
                                       reference log-probs (KL), critic values (PPO)
    advantages(batch, raw)             reward processing + advantages (megarlhf.rl, the driver)
    train(batch, raw)                  actor (+ critic) optimizer steps, or online DPO pairs
    sync()                             actor -> rollout engine (the resharder, bounded buckets)

Online DPO replaces the policy-gradient update: per prompt the best and the worst sample by
reward form a (chosen, rejected) pair trained with the DPO loss against the reference.
Session, resume, saves, export and signals are the run skeleton's
(:class:`~megarlhf.controller.run.Trainer`); the asynchronous loop (:mod:`.async_rl`) reuses
every phase.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch

from megarlhf import rl
from megarlhf.config import JobConfig
from megarlhf.config.validate import behaviour_logprobs_needed
from megarlhf.controller.async_rl import AsyncLoop
from megarlhf.controller.cluster import Cluster
from megarlhf.controller.evaluate import greedy_accuracy
from megarlhf.controller.experience import (
    Rollout,
    build_rollout,
    chunks,
    compute_advantages,
    minibatches,
)
from megarlhf.controller.run import Trainer
from megarlhf.controller.sampling import greedy_params, rollout_params
from megarlhf.data.datasets import ResumableSampler
from megarlhf.data.job_data import PromptItem, load_job_tokenizer, load_prompt_items
from megarlhf.engine.batch import TokenBatch
from megarlhf.engine.loss_fns import DPOLossSpec, PolicyLossSpec, ValueLossSpec
from megarlhf.observability.divergence import check_finite
from megarlhf.rewards.computer import RewardComputer
from megarlhf.rewards.reward_model import RewardModelScorer


class LogprobMismatchError(RuntimeError):
    """The rollout engine and the actor disagree on log-probs beyond the configured threshold."""


class RLTrainer(Trainer):
    """The synchronous RL loop for one job (see the module docstring)."""

    progress_keys = ("reward/raw_mean", "policy/kl_ref", "eval/accuracy")

    def __init__(self, job: JobConfig):
        super().__init__(job)
        self.desc = job.kind
        self.prompts = load_prompt_items(job, self.tokenizer)
        self.eval_prompts = (load_prompt_items(job, self.tokenizer, what="eval_path")
                             [: job.train.eval_prompts] if job.data.eval_path else [])
        self.sampler = ResumableSampler(len(self.prompts), seed=job.seed,
                                        shuffle=job.data.shuffle)
        self.N = job.batch.n_samples_per_prompt
        self.temperature = job.rollout.temperature if job.rollout.temperature > 0 else 1.0
        self.roles = ["actor", "critic", "reference", "reward_model"]
        self.history: dict[str, Any] = {"eval": []}  # [[step, held-out accuracy], ...]
        self.reward_fn: RewardComputer | None = None
        # Asynchronous mode: the data position and weight version a save records (AsyncLoop).
        self.position: dict[str, Any] | None = None
        self.async_state: dict[str, Any] | None = None

    # ---------------------------------------------------------------- the run
    def open_cluster(self) -> Cluster:
        return Cluster(self.job, pad_id=self.tokenizer.pad_id)

    def begin(self, cl: Cluster, start: int) -> None:
        scorer = None
        if "reward_model" in cl:
            m = self.job.role_model("reward_model")
            tok = load_job_tokenizer(self.job, model=m) if (m.tokenizer or m.hf_dir) \
                else self.tokenizer  # a reward model without tokenizer files shares the policy's
            scorer = RewardModelScorer(self.job, cl["reward_model"], tok)
        self.reward_fn = RewardComputer(self.job, scorer)
        self.sync(cl)  # the engine serves exactly the actor's weights
        if start == 0 and self.job.train.eval_every:
            ev = self.evaluate(cl, 0)
            if ev:
                self.session.log(0, ev)
                self.session.log_line(f"step 0: eval accuracy {ev['eval/accuracy']:.3f}")

    def step(self, cl: Cluster, step: int) -> dict[str, float]:
        """One synchronous iteration: generate, learn, sync (and evaluate when due)."""
        t0 = time.perf_counter()
        prompts = self.next_prompts()
        with self.session.timer("generate"):
            rollout = self.generate(cl, prompts, step)
        metrics = self.learn(cl, rollout)
        metrics.update(self.sync(cl))
        metrics.update(self.step_metrics(rollout.batch, time.perf_counter() - t0))
        metrics["rollout/staleness"] = 0.0
        metrics.update(self.evaluate(cl, step + 1))
        return metrics

    def steps(self, cl: Cluster, start: int) -> Iterator[tuple[int, dict[str, float]]]:
        """One step after the other; as the asynchronous schedule says when enabled."""
        if self.job.asynchronous.enabled:
            return AsyncLoop(self, cl, start).steps()
        return super().steps(cl, start)

    def learn(self, cl: Cluster, rollout: Rollout, *, check_logprobs: bool = True
              ) -> dict[str, float]:
        """The learner's part of a step: rewards, annotations, advantages, updates."""
        timer, batch = self.session.timer, rollout.batch
        with timer("reward"):
            raw, metrics = self.rewards(cl, rollout)
        with timer("logprob"):
            metrics.update(self.annotate(cl, batch, check=check_logprobs))
        metrics.update(self.advantages(batch, raw))
        with timer("train"):
            metrics.update(self.train(cl, batch, raw))
        # Before the weight sync: broken weights never reach the rollout engine.
        check_finite(metrics, checkpoint_root=self.session.checkpoints.root)
        return metrics

    def data_sizes(self) -> dict[str, int]:
        return {"sampler": len(self.prompts)}

    def state_dict(self) -> dict[str, Any]:
        state = {"sampler": self.position or self.sampler.state_dict(), "history": self.history}
        if self.async_state is not None:
            state["asynchronous"] = self.async_state
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.history = state.get("history", self.history)

    def result(self, last: int, metrics: dict[str, float], hf_dir: str | None
               ) -> dict[str, Any]:
        out = dict(self.history, last=metrics, step=last)
        if hf_dir is not None:
            out["hf_dir"] = hf_dir
        return out

    # ---------------------------------------------------------------- the phases
    def next_prompts(self) -> list[PromptItem]:
        """The next ``batch.rollout_prompts_global`` prompts in data order."""
        return [self.prompts[i] for i in self.sampler.take(self.job.batch.rollout_prompts_global)]

    def generate(self, cl: Cluster, prompts: list[PromptItem], step: int) -> Rollout:
        """N samples per prompt with the sampling (and seed) of step ``step``."""
        cl.activate("rollout")
        outs = cl.rollout.generate([p.ids for p in prompts],
                                   rollout_params(self.job, self.tokenizer, step))
        return build_rollout(prompts, outs, self.tokenizer, pad_id=self.tokenizer.pad_id)

    def rewards(self, cl: Cluster, rollout: Rollout) -> tuple[torch.Tensor, dict[str, float]]:
        """Raw sequence rewards ``(B,)`` and their per-source means."""
        if "reward_model" in cl:
            cl.activate("reward_model")
        return self.reward_fn(rollout.sample_prompts, rollout.responses)

    def annotate(self, cl: Cluster, batch: TokenBatch, *, check: bool = True
                 ) -> dict[str, float]:
        """``logp_old``, ``logp_ref`` and ``values_old`` into the batch's fields.

        ``logp_old`` is the behaviour policy's (the rollout engine's) log-probs with
        ``algorithm.use_behaviour_logprobs``, except with truncated importance sampling
        (``algorithm.tis_cap``): then ``logp_old`` is the learner's own log-probs before the
        update (the proximal policy) and the loss's weight ``min(pi / pi_behaviour, cap)``
        carries the behaviour correction (with ``logp_old = logp_behaviour`` the ratio and the
        weight would both apply ``pi / pi_behaviour``). ``check=False`` skips the rollout-vs-actor
        log-prob check (asynchronous mode: a stale batch differs by design).

        Raises:
            RuntimeError: the job trains with behaviour log-probs and the engine returned none
                (validation refuses the sampling settings where that is expected).
        """
        job, T = self.job, self.temperature
        metrics: dict[str, float] = {}
        behaviour = batch.fields.get("logp_behaviour")
        needed = behaviour_logprobs_needed(job)
        if needed and behaviour is None:
            raise RuntimeError(f"{needed} trains with the rollout engine's log-probs, but the "
                               "engine returned none for this batch")
        if job.algorithm.use_behaviour_logprobs and job.algorithm.tis_cap is None:
            batch.fields["logp_old"] = behaviour
            k = min(job.rollout.logprob_check_samples, batch.batch_size)
            if check and k and job.rollout.logprob_check_action != "off":
                cl.activate("actor")
                probe = batch.select(list(range(k)))
                lp = cl["actor"].forward(probe, temperature=T)["logp"]
                metrics.update(self.check_logprobs(probe.fields["logp_behaviour"], lp,
                                                   probe.fields["response_mask"].bool()))
        else:
            cl.activate("actor")
            batch.fields["logp_old"] = cl["actor"].forward(batch, temperature=T)["logp"]
            if check and behaviour is not None:
                metrics.update(self.check_logprobs(behaviour, batch.fields["logp_old"],
                                                   batch.fields["response_mask"].bool()))
        if "reference" in cl:
            cl.activate("reference")
            batch.fields["logp_ref"] = cl["reference"].forward(batch, temperature=T)["logp"]
        if "critic" in cl:
            cl.activate("critic")
            batch.fields["values_old"] = cl["critic"].forward(batch)["values"]
        return metrics

    def advantages(self, batch: TokenBatch, raw: torch.Tensor) -> dict[str, float]:
        """Reward processing and advantages (``advantages``, ``returns`` into the batch)."""
        f = batch.fields
        fields, metrics = compute_advantages(
            batch, raw, self.job.algorithm, self.job.advantage_estimator, self.N,
            values=f.get("values_old"), logp=f["logp_old"], logp_ref=f.get("logp_ref"))
        f.update({k: v for k, v in fields.items() if v.dim() == 2})
        if "values_old" in f:
            metrics["critic/explained_variance"] = float(rl.explained_variance(
                f["values_old"], f["returns"], f["response_mask"].bool()))
        return metrics

    def train(self, cl: Cluster, batch: TokenBatch, raw: torch.Tensor) -> dict[str, float]:
        """The update of the step: policy gradient (+ critic), or online DPO."""
        if self.job.kind == "dpo":
            return self.train_dpo(cl, batch, raw)
        return self.train_policy(cl, batch)

    def sync(self, cl: Cluster) -> dict[str, float]:
        """Streams the actor's weights into the rollout engine; its time and bandwidth."""
        cl.activate("actor", "rollout")
        t0 = time.perf_counter()
        stats = cl["actor"].sync_weights_to(cl.rollout)
        dt = time.perf_counter() - t0
        nbytes = stats[0].bytes if stats else 0
        return {"time/weight_sync": dt, "perf/weight_sync_gb_per_s": nbytes / max(dt, 1e-9) / 1e9}

    # ---------------------------------------------------------------- the updates
    def train_policy(self, cl: Cluster, batch: TokenBatch) -> dict[str, float]:
        """``algorithm.ppo_epochs`` passes of one optimizer step per mini-batch of
        ``batch.train_prompts_global`` prompts (their N samples each)."""
        job, algo = self.job, self.job.algorithm
        lc = float(job.rollout.max_new_tokens) \
            if algo.loss_agg_mode == "seq_mean_token_sum_norm" else None
        actor_m, critic_m = [], []
        for rows in minibatches(batch.batch_size, job.batch.train_samples_global,
                                algo.ppo_epochs):
            mini = batch.select(rows)
            mask = mini.fields["response_mask"].bool()
            n_tok = float(mask.sum())
            norm = float(rl.aggregate_normalizer(mask, algo.loss_agg_mode))
            if "critic" in cl:
                cl.activate("critic")
                r = cl["critic"].train(mini, ValueLossSpec(
                    normalizer=norm, num_tokens=n_tok, clip_eps=algo.value_clip_eps,
                    coef=algo.value_loss_coef, agg_mode=algo.loss_agg_mode, length_constant=lc))
                critic_m.append(dict(r.metrics, grad_norm=r.grad_norm))
            cl.activate("actor")
            r = cl["actor"].train(mini, PolicyLossSpec(
                normalizer=norm, num_tokens=n_tok, eps_low=algo.clip_eps_low,
                eps_high=algo.clip_eps_high, dual_clip=algo.dual_clip,
                agg_mode=algo.loss_agg_mode, length_constant=lc, entropy_coef=algo.entropy_coef,
                kl_coef=0.0 if algo.kl_in_reward else algo.kl_coef,
                kl_estimator=algo.kl_estimator, tis_cap=algo.tis_cap,
                temperature=self.temperature))
            actor_m.append(dict(r.metrics, grad_norm=r.grad_norm, lr=r.lr))
        a = _mean_dicts(actor_m)
        metrics = {f"policy/{k}": a[k] for k in ("loss", "pg_loss", "clip_frac", "approx_kl",
                                                  "entropy", "ratio_mean", "grad_norm", "lr",
                                                  "kl_loss") if k in a}
        for k in ("is_weight_mean", "is_truncated_frac"):  # truncated importance sampling
            if f"tis_{k}" in a:
                metrics[f"policy/tis_{k}"] = a[f"tis_{k}"]
        metrics.update({k: v for k, v in a.items() if k.startswith("moe/")})  # router metrics
        if critic_m:
            c = _mean_dicts(critic_m)
            metrics["critic/value_loss"] = c.get("value_loss", c.get("loss", 0.0))
            metrics["critic/grad_norm"] = c["grad_norm"]
            if "value_clip_frac" in c:
                metrics["critic/value_clip_frac"] = c["value_clip_frac"]
        return metrics

    def train_dpo(self, cl: Cluster, batch: TokenBatch, raw: torch.Tensor) -> dict[str, float]:
        """Online DPO: best vs worst sample of each prompt, DPO loss against the reference."""
        chosen, rejected, valid = rl.select_dpo_pairs(raw, self.N)
        idx = [i for c, r, v in zip(chosen.tolist(), rejected.tolist(), valid.tolist()) if v
               for i in (c, r)]
        metrics = {"dpo/valid_pair_frac": float(valid.float().mean())}
        if not idx:
            self.warn("online DPO: every prompt's samples tied on reward; no update this step")
            return metrics
        pairs = batch.select(idx)
        mask = pairs.fields["response_mask"].bool()
        pairs.fields["ref_logp_sum"] = rl.sequence_logprobs(pairs.fields["logp_ref"], mask)
        ms = []
        # One optimizer step per pair batch of at most train_prompts pairs, DP-divisible.
        for rows in chunks(list(range(len(idx))), 2 * self.job.batch.train_prompts_global):
            part = pairs.select(rows)
            cl.activate("actor")
            r = cl["actor"].train(part, DPOLossSpec(num_pairs=part.batch_size // 2,
                                                    beta=self.job.algorithm.dpo_beta,
                                                    temperature=self.temperature))
            ms.append(dict(r.metrics, grad_norm=r.grad_norm, lr=r.lr))
        m = _mean_dicts(ms)
        metrics.update({f"dpo/{k}": v for k, v in m.items() if k in (
            "loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward")})
        metrics.update({"policy/loss": m["loss"], "policy/grad_norm": m["grad_norm"],
                        "policy/lr": m["lr"], "dpo/num_pairs": float(len(idx) // 2)})
        return metrics

    # ---------------------------------------------------------------- checks and metrics
    def check_logprobs(self, logp_rollout: torch.Tensor, logp_actor: torch.Tensor,
                       mask: torch.Tensor) -> dict[str, float]:
        """Rollout engine vs actor on the same tokens: logged, and a warning or a stop over
        ``rollout.logprob_check_threshold``."""
        d = (logp_rollout - logp_actor).abs()[mask]
        if d.numel() == 0:
            return {}
        mx, mean = float(d.max()), float(d.mean())
        r = self.job.rollout
        if r.logprob_check_action != "off" and mx > r.logprob_check_threshold:
            msg = (f"rollout engine and actor disagree on log-probs: max |diff| = {mx:.3g} "
                   f"(mean {mean:.3g}) > rollout.logprob_check_threshold="
                   f"{r.logprob_check_threshold}. Check the weight sync, the sampling "
                   "temperature and the model dtype; raise the threshold or set "
                   "rollout.logprob_check_action=warn to continue")
            if r.logprob_check_action == "stop":
                raise LogprobMismatchError(msg)
            self.warn(msg)
        return {"rollout/logprob_diff_max": mx, "rollout/logprob_diff_mean": mean}

    def evaluate(self, cl: Cluster, last: int) -> dict[str, float]:
        """Greedy held-out accuracy after step ``last`` when ``train.eval_every`` says so."""
        every = self.job.train.eval_every
        if not (every and last % every == 0 and self.eval_prompts):
            return {}
        cl.activate("rollout")
        ev = greedy_accuracy(cl.rollout, self.eval_prompts, self.tokenizer,
                             greedy_params(self.job, self.tokenizer))
        if ev:
            self.history["eval"].append([last, ev["eval/accuracy"]])
        return ev

    def step_metrics(self, batch: TokenBatch, dt: float) -> dict[str, float]:
        """Batch statistics, the phase timers and throughput over a step of ``dt`` seconds."""
        m = {"policy/response_length": float(batch.fields["response_length"].float().mean()),
             "rollout/truncated_frac": float(batch.fields["truncated"].float().mean())}
        m.update({f"time/{k}": v for k, v in self.session.timer.pop().items()})
        m.update({"time/step": dt, "perf/tokens_per_s": float(batch.num_tokens) / dt,
                  "perf/samples_per_s": batch.batch_size / dt})
        return m

    def warn(self, msg: str) -> None:
        self.session.log_line(f"megarlhf: warning: {msg}")


def _mean_dicts(ds: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for d in ds for k in d}
    return {k: sum(d.get(k, 0.0) for d in ds) / max(1, sum(k in d for d in ds)) for k in keys}


def train_rl(job: JobConfig) -> dict[str, Any]:
    """Runs a PPO / GRPO / online DPO job (asynchronous when ``asynchronous.enabled``)."""
    return RLTrainer(job).run()
