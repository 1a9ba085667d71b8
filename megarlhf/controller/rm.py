"""Reward models: multi-task ORM and PRM training (methods.md 1.1, 1.2). ``megarlhf train rm``.

The reward model is the job's ``actor`` role with a scalar head (an LM directory's ``lm_head``
is dropped and a fresh head initialised, or a scalar export is loaded as is). Every training
sequence is ``prompt (chat template) + response + EOS``; an outcome score is read at the last
token (the EOS), a PRM's step scores at the last token of each step (the final step's at the
EOS). Writing ``s = R(x, y)`` for the logit there:

* preference pairs ``(x, y_c, y_r)``: ``L_pref = -mean log sigmoid(s_c - s_r)``  (Bradley-Terry);
* labelled responses ``(x, y, l)``: ORM ``L_bin = mean BCE(sigmoid(s), l)``; PRM per-step
  ``L_step = mean over steps BCE(sigmoid(s_k), y_k)`` with soft or hard step labels (the final
  step's label is the outcome ``l``), automatic (Math-Shepherd, :mod:`.prm_labels`) when the
  rows have none and ``reward.prm_label_rollouts = K > 0``;
* ``L = L_bin + L_pref`` (ORM) or ``L_step + L_pref`` (PRM), each mean normalised by its global
  count over the whole batch.

A batch of ``train.global_batch_size`` sequences holds ``P`` pairs then ``L`` labelled rows
(``2P + L = gbs``, :func:`batch_composition`); every row carries its kind, and each pair's two
rows are adjacent, so they stay in one micro-batch and one data-parallel shard. Each kind has
its own resumable, seeded sampler.

Held-out evaluation (every ``train.eval_every`` steps and at the end) scores the eval files
through the group and computes on the driver: pairwise accuracy, mean reward of chosen and
rejected responses, AUC and accuracy on labelled rows (PRM: the aggregated sequence score of
``reward.prm_aggregation``) and, with step labels, the PRM's step accuracy. Metrics are logged as
``rm/<name>`` (training batch) and ``rm/eval_<name>`` (held-out). The result is exported to
``<output_dir>/hf`` as a scalar-head HF model with its tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from dataclasses import dataclass
from typing import Any

import torch

from megarlhf.config import ConfigError, JobConfig
from megarlhf.controller.checkpointing import (
    driver_rng_state,
    resume_training_state,
    save_training_state,
    set_driver_rng_state,
)
from megarlhf.controller.data import prompt_token_ids
from megarlhf.engine.batch import TokenBatch
from megarlhf.rl import rm_losses as R


@dataclass
class RMSequence:
    """One scored sequence: ``prompt + response + EOS``.

    Attributes:
        ids: token ids.
        label: the outcome label (labelled rows), else None.
        step_pos: PRM read positions (indices into ``ids``), the last one ``len(ids) - 1``.
        step_labels: one label in [0, 1] per ``step_pos`` (None: unknown).
        group: the prompt, as a string key (data-scaling selection, per-prompt caps).
    """

    ids: list[int]
    label: int | None = None
    step_pos: tuple[int, ...] = ()
    step_labels: tuple[float, ...] | None = None
    group: str = ""


@dataclass
class RMData:
    """The sequences of a reward-model dataset: (chosen, rejected) pairs and labelled rows."""

    pairs: list[tuple[RMSequence, RMSequence]]
    labelled: list[RMSequence]

    @property
    def num_sequences(self) -> int:
        return 2 * len(self.pairs) + len(self.labelled)


# ----------------------------------------------------------------------------------- data
def _prompt_key(prompt) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(list(prompt), sort_keys=True)


def _check_len(job: JobConfig, n: int, source, field: str) -> None:
    from megarlhf.data.datasets import DatasetError

    if n > job.train.max_seq_len:
        raise DatasetError(source.path, source.line, field, f"prompt + {field} + EOS are {n} "
                           "tokens", f"raise train.max_seq_len (now {job.train.max_seq_len}) or "
                           "shorten the example", line_kind=source.line_kind)


def response_sequence(job: JobConfig, tok, prompt_ids: list[int], response: str, source,
                      field: str, *, steps: bool = False) -> RMSequence:
    """``prompt_ids + encode(response) + [EOS]``; with ``steps`` the PRM read positions too.

    A step ends at its delimiter token (or its last token); the final step is read at the EOS,
    where the outcome score is read, so a PRM's last-step score is the outcome score.
    """
    from megarlhf.data.datasets import tokenize_response_steps

    if steps:
        try:
            rids, ends = tokenize_response_steps(tok, response, job.reward.prm_step_delimiter)
        except ValueError as e:
            raise source.error(field, str(e), "set reward.prm_step_delimiter to a string the "
                               "tokenizer keeps as one token") from None
    else:
        rids, ends = tok.encode(response), []
    ids = list(prompt_ids) + rids + [tok.eos_id]
    _check_len(job, len(ids), source, field)
    pos: tuple[int, ...] = ()
    if steps:
        pos = tuple(len(prompt_ids) + e for e in ends[:-1]) + (len(ids) - 1,)
    return RMSequence(ids=ids, step_pos=pos)


def subsample_by_prompt(groups: list[str], num_prompts: int | None, per_prompt: int | None,
                        seed: int, prompt_order: list[str] | None = None) -> list[int]:
    """Indices of the rows kept by the data-scaling knobs (methods.md 1.4), in input order.

    Keeps the rows of the first ``num_prompts`` distinct prompts of ``prompt_order`` (default:
    the distinct ``groups`` in a seeded shuffle) and at most ``per_prompt`` rows per prompt
    (the first ones). None keeps everything on that axis.
    """
    if num_prompts is None and per_prompt is None:
        return list(range(len(groups)))
    if prompt_order is None:
        prompt_order = list(dict.fromkeys(groups))
        random.Random(f"megarlhf-rm-prompts:{seed}").shuffle(prompt_order)
    allowed = set(prompt_order[:num_prompts] if num_prompts is not None else prompt_order)
    count: dict[str, int] = {}
    out = []
    for i, g in enumerate(groups):
        if g not in allowed:
            continue
        if per_prompt is not None and count.get(g, 0) >= per_prompt:
            continue
        count[g] = count.get(g, 0) + 1
        out.append(i)
    return out


def _read_answers(path: str, key: str) -> list[Any]:
    """The ``key`` column of a labelled file, row by row (automatic step labels need it)."""
    from megarlhf.data.datasets import DatasetError, read_records

    out = []
    for line, rec in read_records(path):
        v = rec.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (str, int, float))):
            raise DatasetError(path, line, key, f"must be a string or a number, got {v!r}",
                               "store the ground-truth answer as text")
        out.append(v)
    return out


def load_rm_data(job: JobConfig, tok, preference_path: str | None,
                 labelled_path: str | None, *, prm: bool, train: bool = True,
                 step_labeller=None) -> RMData:
    """Reads, validates and tokenizes a reward-model dataset (before any worker starts).

    Args:
        prm: compute step read positions of labelled rows; with ``train`` every labelled row
            needs step labels: its own, or those of ``step_labeller(rows)`` (automatic labels),
            called once with ``[(row index in the file, LabelledResponse, prompt ids), ...]``
            for the rows without, returning one label tuple per row.
        train: apply the data-scaling knobs (``data.rm_num_prompts``,
            ``data.rm_responses_per_prompt``).
    """
    from megarlhf.data.datasets import (
        FieldNames,
        load_labelled_responses,
        load_preference_pairs,
    )

    d = job.data
    fields = FieldNames.from_dict({"prompt": d.prompt_key, "chosen": d.chosen_key,
                                   "rejected": d.rejected_key, "response": d.response_key,
                                   "label": d.label_key, "step_labels": d.step_labels_key})
    pair_rows = load_preference_pairs(preference_path, fields) if preference_path else []
    lab_rows = (load_labelled_responses(labelled_path, fields, job.reward.prm_step_delimiter)
                if labelled_path else [])
    # Data scaling: one prompt selection for both files.
    if train and (d.rm_num_prompts is not None or d.rm_responses_per_prompt is not None):
        order = list(dict.fromkeys([_prompt_key(r.prompt) for r in pair_rows]
                                   + [_prompt_key(r.prompt) for r in lab_rows]))
        random.Random(f"megarlhf-rm-prompts:{job.seed}").shuffle(order)
        keep = subsample_by_prompt([_prompt_key(r.prompt) for r in pair_rows], d.rm_num_prompts,
                                   d.rm_responses_per_prompt, job.seed, order)
        pair_rows = [pair_rows[i] for i in keep]
        lab_keep = subsample_by_prompt([_prompt_key(r.prompt) for r in lab_rows],
                                       d.rm_num_prompts, d.rm_responses_per_prompt, job.seed,
                                       order)
    else:
        lab_keep = list(range(len(lab_rows)))
    cache: dict[str, list[int] | None] = {}

    def pids(prompt, source):
        k = _prompt_key(prompt)
        if k not in cache:
            cache[k] = prompt_token_ids(job, tok, prompt, source)
        return cache[k]

    pairs = []
    for r in pair_rows:
        p = pids(r.prompt, r.source)
        if p is None:
            continue
        c = response_sequence(job, tok, p, r.chosen, r.source, d.chosen_key)
        j = response_sequence(job, tok, p, r.rejected, r.source, d.rejected_key)
        c.group = j.group = _prompt_key(r.prompt)
        pairs.append((c, j))
    labelled: list[RMSequence] = []
    kept_rows = []
    for i in lab_keep:
        r = lab_rows[i]
        p = pids(r.prompt, r.source)
        if p is None:
            continue
        s = response_sequence(job, tok, p, r.response, r.source, d.response_key, steps=prm)
        s.label, s.group = r.label, _prompt_key(r.prompt)
        if prm and r.step_labels is not None:
            s.step_labels = r.step_labels if r.step_labels else (float(r.label),)
        labelled.append(s)
        kept_rows.append((i, r, p))
    if prm and train:
        missing = [k for k, s in enumerate(labelled) if s.step_labels is None]
        if missing:
            if step_labeller is None:
                first = kept_rows[missing[0]][1]
                raise ConfigError(
                    f"reward.rm_type=prm: {len(missing)} rows of {labelled_path} have no "
                    f"'{d.step_labels_key}' (first: {first.source}); give one label per step, "
                    "or set reward.prm_label_rollouts=K to label steps from K policy rollouts")
            got = step_labeller([kept_rows[k] for k in missing])
            for k, lab in zip(missing, got):
                labelled[k].step_labels = tuple(lab) if lab else (float(labelled[k].label),)
    if not pairs and not labelled:
        raise ConfigError("the reward-model data has no usable rows (data.preference_path / "
                          "data.labelled_path)")
    return RMData(pairs, labelled)


def _paths_exist(*pairs: tuple[str | None, str]) -> None:
    for p, name in pairs:
        if p and not os.path.exists(p):
            raise ConfigError(f"data.{name} = {p!r} does not exist")


# --------------------------------------------------------------- automatic PRM labels
def _auto_step_labeller(job: JobConfig, session):
    """The ``step_labeller`` of :func:`load_rm_data`: Math-Shepherd labels from policy rollouts,
    cached in ``<output_dir>/prm_step_labels.json`` (reused while its settings match)."""
    from megarlhf.controller.prm_labels import StepExample, label_steps_with_policy
    from megarlhf.data.datasets import DatasetError

    r = job.reward
    policy = r.prm_label_policy or job.actor.model.hf_dir
    path = job.data.labelled_path

    def labeller(rows: list[tuple[int, Any, list[int]]]) -> list[tuple[float, ...]]:
        from megarlhf.controller.rm_data import policy_tokenizer

        answers = _read_answers(path, job.data.answer_key)
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


# ------------------------------------------------------------------------------ batches
def batch_composition(global_batch_size: int, num_pairs: int, num_labelled: int,
                      preference_fraction: float | None = None) -> tuple[int, int]:
    """``(P, L)``: pairs and labelled rows per batch, ``2P + L = global_batch_size``.

    With both kinds, the pairs' share of the sequences is ``preference_fraction`` or, when None,
    their share of the data ``2 N_pairs / (2 N_pairs + N_labelled)``; P is rounded and kept in
    ``[1, gbs/2 - 1]`` so both kinds are in every batch.
    """
    gbs = global_batch_size
    if num_pairs == 0:
        return 0, gbs
    if num_labelled == 0:
        if gbs % 2:
            raise ConfigError(f"train.global_batch_size={gbs} must be even for preference pairs")
        return gbs // 2, 0
    if gbs < 4:
        raise ConfigError(f"train.global_batch_size={gbs} cannot hold a pair and labelled rows; "
                          "use at least 4")
    frac = preference_fraction
    if frac is None:
        frac = 2 * num_pairs / (2 * num_pairs + num_labelled)
    p = int(round(gbs * frac / 2))
    p = min(max(p, 1), (gbs - 1) // 2)
    return p, gbs - 2 * p


def make_rm_batch(pairs: list[tuple[RMSequence, RMSequence]], labelled: list[RMSequence],
                  pad_id: int, prm: bool) -> TokenBatch:
    """The rows ``[c_1, r_1, ..., c_P, r_P, l_1, ..., l_L]`` with their fields.

    Per sequence: ``kind`` (rm_losses KIND_*), ``label`` (binary rows), ``last_index`` (the EOS).
    PRM, per token: ``step_mask`` (1 at step ends of labelled rows) and ``step_labels``.
    """
    seqs = [s for pr in pairs for s in pr] + list(labelled)
    kinds = [R.KIND_CHOSEN, R.KIND_REJECTED] * len(pairs) + [R.KIND_BINARY] * len(labelled)
    fields: dict[str, list] = {
        "kind": kinds,
        "label": [0.0] * (2 * len(pairs)) + [float(s.label or 0) for s in labelled],
        "last_index": [len(s.ids) - 1 for s in seqs],
    }
    if prm:
        masks, labels = [], []
        for k, s in enumerate(seqs):
            m, y = [0] * len(s.ids), [0.0] * len(s.ids)
            if k >= 2 * len(pairs):
                for pos, lab in zip(s.step_pos, s.step_labels or ()):
                    m[pos], y[pos] = 1, float(lab)
            masks.append(m)
            labels.append(y)
        fields["step_mask"] = masks
        fields["step_labels"] = labels
    return TokenBatch.from_sequences([s.ids for s in seqs], pad_id=pad_id, fields=fields)


def loss_spec(job: JobConfig, batch: TokenBatch, num_pairs: int, num_labelled: int):
    from megarlhf.engine.loss_fns import ORMLossSpec, PRMLossSpec

    if job.reward.rm_type == "prm":
        return PRMLossSpec(num_steps=float(batch.fields["step_mask"].sum()),
                           num_pairs=float(num_pairs), label_type=job.reward.prm_label_type)
    return ORMLossSpec(num_pairs=float(num_pairs), num_binary=float(num_labelled))


# ---------------------------------------------------------------------------- scoring
def score_sequences(group, seqs: list[list[int]], pad_id: int, chunk: int = 512
                    ) -> list[torch.Tensor]:
    """The scalar head's output at every token of each sequence, through the worker group.

    Returns:
        per sequence a ``(len,)`` fp32 tensor (``values[t]`` = score read at token t).
    """
    out: list[torch.Tensor] = []
    dp = max(1, group.dp_size)
    for lo in range(0, len(seqs), chunk):
        part = seqs[lo:lo + chunk]
        padded = part + [part[-1]] * (-len(part) % dp)  # DP_SPLIT needs B % dp == 0
        batch = TokenBatch.from_sequences(padded, pad_id=pad_id)
        values = group.forward(batch)["values"]  # (B, S)
        out.extend(values[i, :len(s)].float().clone() for i, s in enumerate(part))
    return out


def prm_scores(values: list[torch.Tensor], step_pos: list[tuple[int, ...]],
               aggregation: str) -> torch.Tensor:
    """Sequence scores in [0, 1] of a PRM from per-token values and step read positions."""
    S = max(len(v) for v in values)
    vals = torch.zeros(len(values), S)
    mask = torch.zeros(len(values), S, dtype=torch.bool)
    for i, (v, pos) in enumerate(zip(values, step_pos)):
        vals[i, :len(v)] = v
        mask[i, list(pos) or [len(v) - 1]] = True
    return R.prm_sequence_score(vals, mask, aggregation)


def rm_eval_metrics(job: JobConfig, data: RMData, values: list[torch.Tensor]
                    ) -> dict[str, float]:
    """Held-out metrics from the per-token values of ``data``'s sequences (pairs first, in
    order, then labelled rows), computed with :mod:`megarlhf.rl.rm_losses`."""
    prm = job.reward.rm_type == "prm"
    m: dict[str, float] = {}
    P = len(data.pairs)
    if P:
        chosen = torch.stack([values[2 * i][-1] for i in range(P)])
        rejected = torch.stack([values[2 * i + 1][-1] for i in range(P)])
        m["rm/eval_pair_accuracy"] = float(R.pairwise_accuracy(chosen, rejected))
        m["rm/eval_chosen_reward"] = float(chosen.mean())
        m["rm/eval_rejected_reward"] = float(rejected.mean())
        m["rm/eval_reward_margin"] = float((chosen - rejected).mean())
        m["rm/eval_loss_pref"] = float(R.bradley_terry_loss(chosen, rejected))
    lab = values[2 * P:]
    if lab:
        labels = torch.tensor([float(s.label or 0) for s in data.labelled])
        if prm:
            scores = prm_scores(lab, [s.step_pos for s in data.labelled],
                                job.reward.prm_aggregation)
            thr = 0.5
            with_steps = [(v, s) for v, s in zip(lab, data.labelled) if s.step_labels]
            if with_steps:
                S = max(len(v) for v, _ in with_steps)
                vals = torch.zeros(len(with_steps), S)
                mask = torch.zeros_like(vals, dtype=torch.bool)
                ys = torch.zeros_like(vals)
                for i, (v, s) in enumerate(with_steps):
                    vals[i, :len(v)] = v
                    for pos, y in zip(s.step_pos, s.step_labels):
                        mask[i, pos], ys[i, pos] = True, y
                loss, sm = R.prm_step_loss(vals, mask, ys, label_type=job.reward.prm_label_type)
                m["rm/eval_loss_step"] = float(loss)
                m["rm/eval_step_accuracy"] = float(sm["step_accuracy"])
        else:
            scores = torch.stack([v[-1] for v in lab])
            thr = 0.0
            m["rm/eval_loss_bin"] = float(R.binary_ce_loss(scores, labels))
        m["rm/eval_binary_accuracy"] = float(R.binary_accuracy(scores, labels, threshold=thr))
        auc = float(R.binary_auc(scores, labels))
        if auc == auc:  # NaN when one class is absent
            m["rm/eval_binary_auc"] = auc
        pos, neg = scores[labels >= 0.5], scores[labels < 0.5]
        if pos.numel():
            m["rm/eval_positive_reward"] = float(pos.mean())
        if neg.numel():
            m["rm/eval_negative_reward"] = float(neg.mean())
    return m


def evaluate_rm(group, job: JobConfig, data: RMData, pad_id: int) -> dict[str, float]:
    """Scores ``data`` through ``group`` and returns :func:`rm_eval_metrics`."""
    seqs = [s.ids for pr in data.pairs for s in pr] + [s.ids for s in data.labelled]
    return rm_eval_metrics(job, data, score_sequences(group, seqs, pad_id))


# ------------------------------------------------------------------------------- train
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


def train_rm(job: JobConfig) -> dict[str, Any]:
    """Trains an ORM or a PRM (see the module docstring).

    Returns:
        the last step's training metrics, the final held-out metrics (``rm/eval_*``),
        ``eval`` (the held-out history ``[[step, metrics], ...]``), ``hf_dir`` and ``step``.
    """
    from megarlhf.checkpoint.outputs import check_resume_data
    from megarlhf.controller.cluster import Cluster
    from megarlhf.controller.data import load_job_tokenizer
    from megarlhf.controller.session import Session
    from megarlhf.controller.state import export_role_hf
    from megarlhf.data.datasets import ResumableSampler
    from megarlhf.observability.divergence import check_finite

    if job.kind != "rm":
        raise ConfigError(f"train_rm runs kind=rm jobs, got kind={job.kind}")
    d = job.data
    prm = job.reward.rm_type == "prm"
    _paths_exist((d.preference_path, "preference_path"), (d.labelled_path, "labelled_path"),
                 (d.eval_preference_path, "eval_preference_path"),
                 (d.eval_labelled_path, "eval_labelled_path"))
    tok = load_job_tokenizer(job)
    session = Session(job, total_steps=job.train.steps, desc=f"rm ({job.reward.rm_type})")
    result: dict[str, Any] = {}
    try:
        labeller = _auto_step_labeller(job, session) if job.reward.prm_label_rollouts \
            else None
        data = load_rm_data(job, tok, d.preference_path, d.labelled_path, prm=prm,
                            step_labeller=labeller)
        eval_data = None
        if d.eval_preference_path or d.eval_labelled_path:
            eval_data = load_rm_data(job, tok, d.eval_preference_path, d.eval_labelled_path,
                                     prm=prm, train=False)
        check_resume_data(job, {"pair_sampler": max(1, len(data.pairs)),
                                "labelled_sampler": max(1, len(data.labelled))})
        P, L = batch_composition(job.train.global_batch_size, len(data.pairs),
                                 len(data.labelled), d.preference_fraction)
        session.log_line(f"megarlhf: reward model ({job.reward.rm_type}): "
                         f"{len(data.pairs)} pairs, {len(data.labelled)} labelled responses; "
                         f"{P} pairs + {L} labelled rows per batch")
        pair_sampler = ResumableSampler(max(1, len(data.pairs)), seed=job.seed,
                                        shuffle=d.shuffle)
        lab_sampler = ResumableSampler(max(1, len(data.labelled)), seed=job.seed + 1,
                                       shuffle=d.shuffle)
        history: list[list[Any]] = []
        with Cluster(job, roles=["actor"], rollout=False, pad_id=tok.pad_id) as cl:
            session.install_signal_handlers()  # after ray.init, which installs its own
            rm = cl["actor"]

            def driver_state() -> dict[str, Any]:
                return {"pair_sampler": pair_sampler.state_dict(),
                        "labelled_sampler": lab_sampler.state_dict(),
                        "rng": driver_rng_state(), "eval": history}

            def evaluate(step: int) -> dict[str, float]:
                if eval_data is None:
                    return {}
                ev = evaluate_rm(rm, job, eval_data, tok.pad_id)
                history.append([step, ev])
                return ev

            start = 0
            state = resume_training_state(session, cl, ["actor"])
            if state is not None:
                start = state["step"]
                pair_sampler.load_state_dict(state["pair_sampler"])
                lab_sampler.load_state_dict(state["labelled_sampler"])
                set_driver_rng_state(state["rng"])
                history = state.get("eval", [])
            session.start_progress(start, ("rm/loss", "rm/pair_accuracy",
                                           "rm/eval_pair_accuracy"))
            last = start
            for step in range(start, job.train.steps):
                t0 = time.perf_counter()
                pairs = [data.pairs[i] for i in pair_sampler.take(P)] if P else []
                lab = [data.labelled[i] for i in lab_sampler.take(L)] if L else []
                batch = make_rm_batch(pairs, lab, tok.pad_id, prm)
                r = rm.train(batch, loss_spec(job, batch, P, L))
                dt = time.perf_counter() - t0
                metrics = _train_metrics(r, P, L, prm)
                metrics.update({"perf/tokens_per_s": batch.num_tokens / dt,
                                "perf/samples_per_s": batch.batch_size / dt, "time/step": dt})
                last = step + 1
                if job.train.eval_every and last % job.train.eval_every == 0 \
                        and last != job.train.steps:
                    metrics.update(evaluate(last))
                session.log(last, metrics)
                check_finite(metrics, step=last, checkpoint_root=session.ckpt_root)  # no save
                result = metrics
                due = job.checkpoint.save_every and last % job.checkpoint.save_every == 0
                if due or session.stop_requested:
                    save_training_state(session, cl, last, driver_state(), ["actor"])
                if session.stop_requested:
                    break
            if last == job.train.steps:
                ev = evaluate(last)
                if ev:
                    session.log(last, ev)
                    result = dict(result, **ev)
                    with open(os.path.join(session.output_dir, "rm_eval.json"), "w",
                              encoding="utf-8") as f:
                        json.dump({"step": last, **ev}, f, indent=1)
                if not (job.checkpoint.save_every and last % job.checkpoint.save_every == 0):
                    save_training_state(session, cl, last, driver_state(), ["actor"])
                hf_dir = os.path.join(session.output_dir, "hf")
                rm.execute(export_role_hf, hf_dir)
                if not os.path.isfile(os.path.join(hf_dir, "tokenizer_config.json")):
                    tok.export_hf(hf_dir)
                result["hf_dir"] = hf_dir
            result["step"] = last
            result["eval"] = history
    finally:
        session.close()
    return result
