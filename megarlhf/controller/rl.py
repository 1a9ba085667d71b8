"""PPO, GRPO and online DPO (synchronous). ``megarlhf train ppo|grpo|dpo CONFIG``.

One iteration (methods.md 2 and 3), :meth:`RLTrainer.step`, each phase a method that returns
its result::

    rollout = generate(prompts)        N samples per prompt: token ids, texts, behaviour log-probs
    raw     = rewards(rollout)         verifier / code tests / reward model / a weighted mix
                                       (+ DAPO's overlong shaping)
    refill(rollout, raw)               DAPO dynamic sampling (optional): drop prompts whose
                                       samples tie, refill from further generations
    annotate(batch)                    logp_old (+ the rollout-vs-actor log-prob check),
                                       reference log-probs (KL), critic values (PPO),
                                       off-policy weights (optional)
    advantages(batch, raw)             reward processing + advantages (megarlhf.rl, the driver)
    train(batch, raw)                  actor (+ critic) optimizer steps, or online DPO pairs
                                       (then the adaptive KL controller's update, optional)
    sync()                             actor -> rollout engine (every owner rank sends its share)

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
from megarlhf.config.schema import LOGPROB_CHECK_DEFAULTS
from megarlhf.config.validate import behaviour_logprobs_needed
from megarlhf.controller.agent import AgentRollouts
from megarlhf.controller.async_rl import AsyncLoop
from megarlhf.controller.cluster import Cluster
from megarlhf.controller.evaluate import greedy_accuracy
from megarlhf.controller.experience import (
    Rollout,
    build_rollout,
    chunks,
    compute_advantages,
    group_minibatches,
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
        # The KL coefficient of the next step: fixed, or the adaptive controller's state.
        self.kl_coef = job.algorithm.kl_coef
        self.reward_fn: RewardComputer | None = None
        # Asynchronous mode: the data position and weight version a save records (AsyncLoop).
        self.position: dict[str, Any] | None = None
        self.async_state: dict[str, Any] | None = None
        self.rollout_version: int | None = None  # the weight version the rollout serves
        # Multi-turn agent rollouts (rollout.agent): built here, before any worker starts, so
        # a wrong environment or a template that is not prefix-stable fails first.
        self.agent = AgentRollouts(job, self.tokenizer) if job.rollout.agent else None
        if self.agent is not None:
            self.agent.check_prompts(self.prompts + self.eval_prompts)

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
        self.sync(cl, start)  # the engine serves exactly the actor's weights (version start)
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
        with self.session.timer("reward"):
            scored = self.rewards(cl, rollout)
        if self.job.algorithm.dynamic_sampling:
            rollout, scored = self.refill(cl, rollout, scored, step)
        metrics = self.learn(cl, rollout, scored=scored)
        metrics.update(self.sync(cl, step + 1))
        metrics.update(self.step_metrics(rollout.batch, time.perf_counter() - t0))
        metrics["rollout/staleness"] = 0.0
        metrics["rollout/weight_version"] = float(step)  # the weights its samples came from
        metrics.update(self.evaluate(cl, step + 1))
        return metrics

    def steps(self, cl: Cluster, start: int) -> Iterator[tuple[int, dict[str, float]]]:
        """One step after the other; as the asynchronous schedule says when enabled."""
        if self.job.asynchronous.enabled:
            return AsyncLoop(self, cl, start).steps()
        return super().steps(cl, start)

    def learn(self, cl: Cluster, rollout: Rollout, *, check_logprobs: bool = True,
              scored: tuple[torch.Tensor, dict[str, float]] | None = None) -> dict[str, float]:
        """The learner's part of a step: rewards (unless ``scored`` gives them), annotations,
        advantages, updates, the KL controller."""
        timer, batch = self.session.timer, rollout.batch
        if scored is None:
            with timer("reward"):
                scored = self.rewards(cl, rollout)
        raw, metrics = scored[0], dict(scored[1])
        with timer("logprob"):
            metrics.update(self.annotate(cl, batch, check=check_logprobs))
        metrics.update(self.advantages(batch, raw))
        with timer("train"):
            metrics.update(self.train(cl, batch, raw))
        metrics.update(self.update_kl_coef(metrics, batch.batch_size))
        # Before the weight sync: broken weights never reach the rollout engine.
        check_finite(metrics, checkpoint_root=self.session.checkpoints.root)
        return metrics

    def data_sizes(self) -> dict[str, int]:
        return {"sampler": len(self.prompts)}

    def state_dict(self) -> dict[str, Any]:
        state = {"sampler": self.position or self.sampler.state_dict(), "history": self.history,
                 "kl_coef": self.kl_coef}
        if self.async_state is not None:
            state["asynchronous"] = self.async_state
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.history = state.get("history", self.history)
        self.kl_coef = state.get("kl_coef", self.kl_coef)

    def result(self, last: int, metrics: dict[str, float], hf_dir: str | None
               ) -> dict[str, Any]:
        out = dict(self.history, last=metrics, step=last)
        if hf_dir is not None:
            out["hf_dir"] = hf_dir
        return out

    # ---------------------------------------------------------------- the phases
    def next_prompts(self, count: int | None = None) -> list[PromptItem]:
        """The next ``count`` (default ``batch.rollout_prompts_global``) prompts in data
        order."""
        count = self.job.batch.rollout_prompts_global if count is None else count
        return [self.prompts[i] for i in self.sampler.take(count)]

    def generate(self, cl: Cluster, prompts: list[PromptItem], step: int,
                 round: int = 0) -> Rollout:
        """N samples per prompt with the sampling (and seed) of step ``step`` (and its
        dynamic-sampling round ``round``)."""
        cl.activate("rollout")
        params = rollout_params(self.job, self.tokenizer, step, round)
        if self.agent is not None:
            outs, metrics, _ = self.agent.run(cl.rollout, prompts, params,
                                              weight_version=self.rollout_version)
            rollout = build_rollout(prompts, outs, self.tokenizer, pad_id=self.tokenizer.pad_id)
            rollout.metrics = metrics
            return rollout
        outs = cl.rollout.generate([p.ids for p in prompts], params,
                                   weight_version=self.rollout_version)
        return build_rollout(prompts, outs, self.tokenizer, pad_id=self.tokenizer.pad_id)

    def rewards(self, cl: Cluster, rollout: Rollout) -> tuple[torch.Tensor, dict[str, float]]:
        """Raw sequence rewards ``(B,)`` and their per-source means, shaped by length when
        ``algorithm.overlong_buffer`` is set (DAPO's soft overlong punishment; the per-source
        means stay unshaped)."""
        if "reward_model" in cl:
            cl.activate("reward_model")
        env = None
        if self.agent is not None:
            env = [s.reward for out in rollout.outputs for s in out.samples]
        raw, metrics = self.reward_fn(rollout.sample_prompts, rollout.responses, env)
        metrics.update(rollout.metrics)  # agent/* of the trajectories
        algo = self.job.algorithm
        if algo.overlong_buffer is not None:
            pen = rl.overlong_penalty(rollout.batch.fields["response_length"],
                                      self.job.rollout.max_new_tokens, algo.overlong_buffer,
                                      factor=algo.overlong_penalty)
            raw = raw.float() + pen
            metrics["reward/overlong_penalty_mean"] = float(pen.mean())
            metrics["reward/overlong_frac"] = float((pen < 0).float().mean())
        return raw, metrics

    def refill(self, cl: Cluster, rollout: Rollout, scored: tuple[torch.Tensor, dict],
               step: int) -> tuple[Rollout, tuple[torch.Tensor, dict[str, float]]]:
        """DAPO dynamic sampling: keep the prompts whose samples did not all get the same
        reward, and generate further prompts (next in data order) until
        ``batch.rollout_prompts_global`` are kept or ``algorithm.dynamic_sampling_max_rounds``
        extra rounds ran; what is still missing is filled with dropped prompts (their advantages
        are 0: no policy gradient, only the KL / entropy terms).

        An extra round draws ``missing * drawn / kept`` prompts (the kept fraction so far),
        at most ``rollout_prompts_global``. The reward metrics are over every sample drawn (an
        unbiased view of the policy); ``rollout/ds_*`` say how many rounds and prompts it took.
        """
        want, algo = len(rollout.prompts), self.job.algorithm
        kept: list[tuple[PromptItem, Any, torch.Tensor]] = []
        dropped: list[tuple[PromptItem, Any, torch.Tensor]] = []
        sums: dict[str, float] = {}
        drawn = samples = rounds = 0
        while True:
            raw, m = scored
            groups = rollout.batch.fields["prompt_index"]
            informative = rl.informative_groups(raw, group_ids=groups)
            for p, (item, out) in enumerate(zip(rollout.prompts, rollout.outputs)):
                rows = (groups == p).nonzero().flatten()
                (kept if bool(informative[rows].all()) else dropped).append(
                    (item, out, raw[rows]))
            n = rollout.batch.batch_size
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v * n
            drawn, samples, rounds = drawn + len(rollout.prompts), samples + n, rounds + 1
            missing = want - len(kept)
            if missing <= 0 or rounds > algo.dynamic_sampling_max_rounds:
                break
            count = want if not kept else min(want, -(-missing * drawn // len(kept)))
            with self.session.timer("generate"):
                rollout = self.generate(cl, self.next_prompts(count), step, round=rounds)
            with self.session.timer("reward"):
                scored = self.rewards(cl, rollout)
        filled = max(0, want - len(kept))
        chosen = kept[:want] + dropped[:filled]
        merged = build_rollout([c[0] for c in chosen], [c[1] for c in chosen], self.tokenizer,
                               pad_id=self.tokenizer.pad_id)
        metrics = {k: v / samples for k, v in sums.items()}
        metrics.update({"rollout/ds_rounds": float(rounds),
                        "rollout/ds_prompts_drawn": float(drawn),
                        "rollout/ds_kept_frac": len(kept) / max(drawn, 1),
                        "rollout/ds_filled_prompts": float(filled)})
        return merged, (torch.cat([c[2] for c in chosen]), metrics)

    def annotate(self, cl: Cluster, batch: TokenBatch, *, check: bool = True
                 ) -> dict[str, float]:
        """``logp_old``, ``logp_ref`` and ``values_old`` into the batch's fields.

        ``logp_old`` is the behaviour policy's (the rollout engine's) log-probs with
        ``algorithm.use_behaviour_logprobs``, except with an off-policy correction
        (``algorithm.tis_cap`` / ``off_policy_correction``): then ``logp_old`` is the learner's
        own log-probs before the update (the proximal policy) and the weights ``is_weights``,
        computed here once from ``pi_old / pi_behaviour`` (truncated or masked), carry the
        behaviour correction (with ``logp_old = logp_behaviour`` the ratio and the weight would
        both apply ``pi / pi_behaviour``). ``check=False`` skips the rollout-vs-actor log-prob
        check (asynchronous mode: a stale batch differs by design).

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
        correction = job.algorithm.off_policy()
        if job.algorithm.use_behaviour_logprobs and correction is None:
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
            if correction is not None:
                lower, upper = job.algorithm.off_policy_bounds()
                w, m = rl.off_policy_weights(batch.fields["logp_old"], behaviour,
                                             batch.fields["response_mask"], correction,
                                             upper=upper, lower=lower)
                batch.fields["is_weights"] = w
                metrics.update({f"offpolicy/{k}": float(v) for k, v in m.items()})
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
            values=f.get("values_old"), logp=f["logp_old"], logp_ref=f.get("logp_ref"),
            kl_coef=self.kl_coef)
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

    def update_kl_coef(self, metrics: dict[str, float], samples: int) -> dict[str, float]:
        """The adaptive KL controller (``algorithm.kl_target``) after a step on ``samples``
        samples whose KL to the reference was ``metrics["policy/kl_ref"]``; logs the
        coefficient the step used."""
        algo = self.job.algorithm
        used = {"policy/kl_coef": self.kl_coef} if self.kl_coef > 0 else {}
        if algo.kl_target is not None and "policy/kl_ref" in metrics:
            self.kl_coef = rl.adaptive_kl_coef(self.kl_coef, metrics["policy/kl_ref"],
                                               algo.kl_target, algo.kl_horizon, samples)
        return used

    def sync(self, cl: Cluster, version: int) -> dict[str, float]:
        """The actor's weights into the rollout engine as weight version ``version`` (the
        actor's step); its time, bandwidth and phases."""
        cl.activate_for_sync("actor")
        t0 = time.perf_counter()
        res = cl["actor"].sync_weights_to(cl.rollout, version=version)
        dt = time.perf_counter() - t0
        self.rollout_version = version
        out = {"time/weight_sync": dt,
               "perf/weight_sync_gb_per_s": res.bytes / max(dt, 1e-9) / 1e9}
        out.update({f"time/weight_sync_{k.removesuffix('_s')}": v
                    for k, v in res.phases().items()})
        if res.changed_fraction is not None:
            out["perf/weight_sync_changed_frac"] = res.changed_fraction
        if res.sent_fraction is not None:
            out["perf/weight_sync_sent_frac"] = res.sent_fraction
        return out

    # ---------------------------------------------------------------- the updates
    def train_policy(self, cl: Cluster, batch: TokenBatch) -> dict[str, float]:
        """``algorithm.ppo_epochs`` passes of one optimizer step per mini-batch of
        ``batch.train_prompts_global`` prompts (their N samples each)."""
        job, algo = self.job, self.job.algorithm
        lc = float(job.rollout.max_new_tokens) \
            if algo.loss_agg_mode == "seq_mean_token_sum_norm" else None
        actor_m, critic_m = [], []
        groups = batch.fields.get("prompt_index")
        steps = (group_minibatches(groups.tolist(), job.batch.train_prompts_global,
                                   algo.ppo_epochs) if groups is not None else
                 minibatches(batch.batch_size, job.batch.train_samples_global, algo.ppo_epochs))
        for rows in steps:
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
                normalizer=norm, num_tokens=n_tok, loss_type=algo.policy_loss,
                eps_low=algo.clip_eps_low, eps_high=algo.clip_eps_high, dual_clip=algo.dual_clip,
                agg_mode=algo.loss_agg_mode, length_constant=lc, entropy_coef=algo.entropy_coef,
                kl_coef=0.0 if algo.kl_in_reward else self.kl_coef,
                kl_estimator=algo.kl_estimator, kl_clamp=algo.kl_clamp,
                use_is_weights="is_weights" in mini.fields, temperature=self.temperature))
            actor_m.append(dict(r.metrics, grad_norm=r.grad_norm, lr=r.lr))
        a = _mean_dicts(actor_m)
        metrics = {f"policy/{k}": a[k] for k in ("loss", "pg_loss", "clip_frac", "clip_frac_low",
                                                  "clip_frac_high", "approx_kl", "entropy",
                                                  "ratio_mean", "grad_norm", "lr", "kl_loss")
                   if k in a}
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
        chosen, rejected, valid = rl.select_dpo_pairs(
            raw, self.N, group_ids=batch.fields.get("prompt_index"))
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
        max_t, mean_t = LOGPROB_CHECK_DEFAULTS[self.job.actor.model.dtype]
        max_t = max_t if r.logprob_check_threshold is None else r.logprob_check_threshold
        mean_t = mean_t if r.logprob_check_mean_threshold is None \
            else r.logprob_check_mean_threshold
        over = [f"max |diff| = {mx:.3g} > rollout.logprob_check_threshold={max_t}"] \
            if mx > max_t else []
        if mean > mean_t:
            over.append(f"mean |diff| = {mean:.3g} > rollout.logprob_check_mean_threshold="
                        f"{mean_t}")
        if r.logprob_check_action != "off" and over:
            msg = (f"rollout engine and actor disagree on log-probs: {'; '.join(over)} "
                   f"(max {mx:.3g}, mean {mean:.3g}; defaults for "
                   f"{self.job.actor.model.dtype}: {LOGPROB_CHECK_DEFAULTS}). Check the weight "
                   "sync, the sampling temperature and the model dtype; raise the threshold or "
                   "set rollout.logprob_check_action=warn to continue")
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
        if self.agent is not None:
            ev = self.agent.evaluate(cl.rollout, self.eval_prompts,
                                     greedy_params(self.job, self.tokenizer))
        else:
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
