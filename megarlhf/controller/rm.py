"""Reward models: multi-task ORM and PRM training (methods.md 1.1, 1.2). ``megarlhf train rm``.

The reward model is the job's ``actor`` role with a scalar head (an LM directory's ``lm_head``
is dropped and a fresh head initialised, or a scalar export is loaded as is). Every training
sequence is ``prompt (chat template) + response + EOS`` (:func:`megarlhf.data.rm_datasets.
rm_input`, the builder RL and best-of-N score with); an outcome score is read at the last
token (the EOS), a PRM's step scores at the last token of each step (the final step's at the
EOS). Writing ``s = R(x, y)`` for the logit there:

* preference pairs ``(x, y_c, y_r)``: ``L_pref = -mean log sigmoid(s_c - s_r)``  (Bradley-Terry);
* labelled responses ``(x, y, l)``: ORM ``L_bin = mean BCE(sigmoid(s), l)``; PRM per-step
  ``L_step = mean over steps BCE(sigmoid(s_k), y_k)`` with soft or hard step labels (the final
  step's label is the outcome ``l``), automatic (Math-Shepherd,
  :mod:`megarlhf.rewards.prm_labels`) when the rows have none and
  ``reward.prm_label_rollouts = K > 0``;
* ``L = L_bin + L_pref`` (ORM) or ``L_step + L_pref`` (PRM), each mean normalised by its global
  count over the whole batch.

A batch of ``train.global_batch_size`` sequences holds ``P`` pairs then ``L`` labelled rows
(``2P + L = gbs``, :func:`~megarlhf.data.rm_datasets.batch_composition`); every row carries its kind, and each pair's two
rows are adjacent, so they stay in one micro-batch and one data-parallel shard. Each kind has
its own resumable, seeded sampler.

Held-out evaluation (every ``train.eval_every`` steps and at the end) scores the eval files
through the group and computes on the driver: pairwise accuracy, mean reward of chosen and
rejected responses, AUC and accuracy on labelled rows (PRM: the aggregated sequence score of
``reward.prm_aggregation``) and, with step labels, the PRM's step accuracy. Metrics are logged as
``rm/<name>`` (training batch) and ``rm/eval_<name>`` (held-out), the last evaluation also to
``<output_dir>/rm_eval.json``. Session, resume, saves, the export to ``<output_dir>/hf`` (a
scalar-head HF model with its tokenizer) and signals are the run skeleton's
(:class:`~megarlhf.controller.run.Trainer`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

from megarlhf.config import ConfigError, JobConfig
from megarlhf.controller.cluster import Cluster
from megarlhf.controller.rm_data import label_steps_with_policy, policy_tokenizer
from megarlhf.controller.run import Trainer
from megarlhf.data.datasets import DatasetError, ResumableSampler
from megarlhf.data.job_data import prompt_token_ids
from megarlhf.data.rm_datasets import (
    RMData,
    batch_composition,
    load_rm_data,
    make_rm_batch,
    read_answers,
)
from megarlhf.engine.batch import TokenBatch
from megarlhf.engine.loss_fns import ORMLossSpec, PRMLossSpec
from megarlhf.rewards.prm_labels import StepExample
from megarlhf.rewards.reward_model import evaluate_rm


class RMTrainer(Trainer):
    """Trains an ORM or a PRM (see the module docstring)."""

    progress_keys = ("rm/loss", "rm/pair_accuracy", "rm/eval_pair_accuracy")

    def __init__(self, job: JobConfig):
        if job.kind != "rm":
            raise ConfigError(f"train_rm runs kind=rm jobs, got kind={job.kind}")
        d = job.data
        _paths_exist((d.preference_path, "preference_path"), (d.labelled_path, "labelled_path"),
                     (d.eval_preference_path, "eval_preference_path"),
                     (d.eval_labelled_path, "eval_labelled_path"))
        super().__init__(job)
        self.desc = f"rm ({job.reward.rm_type})"
        self.prm = job.reward.rm_type == "prm"
        self.history: list[list[Any]] = []  # [[step, held-out metrics], ...]

    def prepare(self) -> None:
        """Reads and tokenizes the data; PRM step labels from policy rollouts when asked."""
        job, d, tok = self.job, self.job.data, self.tokenizer
        labeller = _auto_step_labeller(job, self.session) if job.reward.prm_label_rollouts \
            else None
        self.data = load_rm_data(job, tok, d.preference_path, d.labelled_path, prm=self.prm,
                                 step_labeller=labeller)
        self.eval_data: RMData | None = None
        if d.eval_preference_path or d.eval_labelled_path:
            self.eval_data = load_rm_data(job, tok, d.eval_preference_path,
                                          d.eval_labelled_path, prm=self.prm, train=False)
        self.P, self.L = batch_composition(job.train.global_batch_size, len(self.data.pairs),
                                           len(self.data.labelled), d.preference_fraction)
        self.session.log_line(
            f"megarlhf: reward model ({job.reward.rm_type}): {len(self.data.pairs)} pairs, "
            f"{len(self.data.labelled)} labelled responses; {self.P} pairs + {self.L} "
            "labelled rows per batch")
        self.pair_sampler = ResumableSampler(max(1, len(self.data.pairs)), seed=job.seed,
                                             shuffle=d.shuffle)
        self.lab_sampler = ResumableSampler(max(1, len(self.data.labelled)), seed=job.seed + 1,
                                            shuffle=d.shuffle)

    def data_sizes(self) -> dict[str, int] | None:
        if getattr(self, "data", None) is None:
            return None  # read in prepare()
        return {"pair_sampler": max(1, len(self.data.pairs)),
                "labelled_sampler": max(1, len(self.data.labelled))}

    def step(self, cl: Cluster, step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        P, L = self.P, self.L
        pairs = [self.data.pairs[i] for i in self.pair_sampler.take(P)] if P else []
        lab = [self.data.labelled[i] for i in self.lab_sampler.take(L)] if L else []
        batch = make_rm_batch(pairs, lab, self.tokenizer.pad_id, self.prm)
        r = cl["actor"].train(batch, loss_spec(self.job, batch, P, L))
        dt = time.perf_counter() - t0
        metrics = _train_metrics(r, P, L, self.prm)
        metrics.update({"perf/tokens_per_s": batch.num_tokens / dt,
                        "perf/samples_per_s": batch.batch_size / dt, "time/step": dt})
        metrics.update(self.evaluate(cl, step + 1))
        return metrics

    def evaluate(self, cl: Cluster, last: int) -> dict[str, float]:
        """Held-out metrics every ``train.eval_every`` steps and after the last step (then
        also written to ``rm_eval.json``)."""
        every, final = self.job.train.eval_every, last == self.job.train.steps
        if self.eval_data is None or not (final or (every and last % every == 0)):
            return {}
        ev = evaluate_rm(cl["actor"], self.job, self.eval_data, self.tokenizer.pad_id)
        self.history.append([last, ev])
        if final:
            with open(os.path.join(self.session.output_dir, "rm_eval.json"), "w",
                      encoding="utf-8") as f:
                json.dump({"step": last, **ev}, f, indent=1)
        return ev

    def state_dict(self) -> dict[str, Any]:
        return {"pair_sampler": self.pair_sampler.state_dict(),
                "labelled_sampler": self.lab_sampler.state_dict(), "eval": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pair_sampler.load_state_dict(state["pair_sampler"])
        self.lab_sampler.load_state_dict(state["labelled_sampler"])
        self.history = state.get("eval", [])

    def result(self, last: int, metrics: dict[str, float], hf_dir: str | None
               ) -> dict[str, Any]:
        return dict(super().result(last, metrics, hf_dir), eval=self.history)


def train_rm(job: JobConfig) -> dict[str, Any]:
    """Trains an ORM or a PRM (see the module docstring).

    Returns:
        the last step's training metrics and final held-out metrics (``rm/eval_*``), ``eval``
        (the held-out history ``[[step, metrics], ...]``), ``hf_dir`` and ``step``.
    """
    return RMTrainer(job).run()


def loss_spec(job: JobConfig, batch: TokenBatch, num_pairs: int, num_labelled: int):
    if job.reward.rm_type == "prm":
        return PRMLossSpec(num_steps=float(batch.fields["step_mask"].sum()),
                           num_pairs=float(num_pairs), label_type=job.reward.prm_label_type)
    return ORMLossSpec(num_pairs=float(num_pairs), num_binary=float(num_labelled))


def _train_metrics(r, P: int, L: int, prm: bool) -> dict[str, float]:
    keep = {"loss", "loss_pref", "loss_bin", "loss_step", "step_accuracy", "step_score"}
    if P:
        keep |= {"pair_accuracy", "chosen_reward", "rejected_reward"}
    if L and not prm:
        keep.add("binary_accuracy")
    out = {f"rm/{k}": v for k, v in r.metrics.items() if k in keep}
    if not P:
        out.pop("rm/loss_pref", None)
    if not L:
        out.pop("rm/loss_bin", None)
    out["rm/grad_norm"] = r.grad_norm
    out["rm/lr"] = r.lr
    return out


def _paths_exist(*pairs: tuple[str | None, str]) -> None:
    for p, name in pairs:
        if p and not os.path.exists(p):
            raise ConfigError(f"data.{name} = {p!r} does not exist")


def _auto_step_labeller(job: JobConfig, session):
    """The ``step_labeller`` of :func:`load_rm_data`: Math-Shepherd labels from policy rollouts,
    cached in ``<output_dir>/prm_step_labels.json`` (reused while its settings match)."""
    r = job.reward
    policy = r.prm_label_policy or job.actor.model.hf_dir
    path = job.data.labelled_path

    def labeller(rows: list[tuple[int, Any, list[int]]]) -> list[tuple[float, ...]]:
        answers = read_answers(path, job.data.answer_key)
        st = os.stat(path)
        key = {"labelled_path": os.path.abspath(path), "size": st.st_size,
               "mtime": int(st.st_mtime), "policy": os.path.abspath(policy),
               "k": r.prm_label_rollouts, "delimiter": r.prm_step_delimiter, "seed": job.seed,
               "rollout": [job.rollout.temperature, job.rollout.top_p, job.rollout.top_k,
                           job.rollout.max_new_tokens],
               "rows": hashlib.sha256(json.dumps([i for i, _, _ in rows]).encode()).hexdigest()}
        cache = os.path.join(session.output_dir, "prm_step_labels.json")
        if os.path.isfile(cache):
            with open(cache, encoding="utf-8") as f:
                saved = json.load(f)
            if saved.get("key") == key:
                session.log_line(f"megarlhf: PRM step labels reused from {cache}")
                return [tuple(x) for x in saved["labels"]]
        ptok = policy_tokenizer(job, policy)  # the policy sees prompts through its own
        examples = []
        for i, row, _ in rows:
            if answers[i] is None:
                raise DatasetError(row.source.path, row.source.line, job.data.answer_key,
                                   "missing",
                                   "automatic PRM step labels check rollouts against the ground "
                                   f"truth: add '{job.data.answer_key}' to every row (or give "
                                   "step_labels)", line_kind=row.source.line_kind)
            examples.append(StepExample(prompt_token_ids(job, ptok, row.prompt, row.source),
                                        row.response, answers[i]))
        t0 = time.perf_counter()
        labels = label_steps_with_policy(job, ptok, examples, policy_hf_dir=policy,
                                         k=r.prm_label_rollouts, label_type="soft",
                                         log=session.log_line)
        session.log_line(f"megarlhf: PRM step labels for {len(rows)} responses "
                         f"({r.prm_label_rollouts} rollouts per step) in "
                         f"{time.perf_counter() - t0:.1f} s")
        tmp = cache + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"key": key, "labels": [list(x) for x in labels]}, f)
        os.replace(tmp, cache)
        return labels

    return labeller
