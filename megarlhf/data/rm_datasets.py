"""Reward-model inputs and datasets: the one input builder, preference pairs and labelled
responses as token ids, the data-scaling selection (methods.md 1.4), the layout of a batch.

:func:`rm_input` builds every sequence a reward model sees - ``prompt + response + EOS`` in its
own tokenizer, with a PRM's step read positions (:mod:`megarlhf.rewards.reward_model` explains
the format): RM training here, RL and best-of-N through
:class:`~megarlhf.rewards.reward_model.RewardModelScorer`. Rows are read and validated before
any worker starts.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from megarlhf.config import ConfigError, JobConfig
from megarlhf.data.datasets import (
    DatasetError,
    FieldNames,
    load_labelled_responses,
    load_preference_pairs,
    read_records,
    tokenize_response_steps,
)
from megarlhf.data.job_data import prompt_token_ids
from megarlhf.engine.batch import TokenBatch
from megarlhf.rl import rm_losses as R


# ------------------------------------------------------------------ the reward model's input
@dataclass
class RMInput:
    """One sequence a reward model scores.

    Attributes:
        ids: ``prompt + response + EOS`` token ids (the reward model's tokenizer).
        step_pos: PRM read positions (indices into ``ids``; the last one ``len(ids) - 1``);
            ``()`` for an outcome model.
    """

    ids: list[int]
    step_pos: tuple[int, ...] = ()

    @property
    def read_pos(self) -> tuple[int, ...]:
        """Where the scores are read: the step ends (PRM), else the last token (the EOS)."""
        return self.step_pos or (len(self.ids) - 1,)


def rm_input(tokenizer, prompt_ids: Sequence[int], response: str, *, prm: bool,
             delimiter: str = "\n") -> RMInput:
    """``prompt_ids + encode(response) + [EOS]`` and, for a PRM, the step read positions.

    Raises:
        ValueError: (PRM) a step boundary splits a token; the delimiter must be one token.
    """
    if prm:
        rids, ends = tokenize_response_steps(tokenizer, response, delimiter)
    else:
        rids, ends = tokenizer.encode(response), []
    ids = list(prompt_ids) + rids + [tokenizer.eos_id]
    pos = tuple(len(prompt_ids) + e for e in ends[:-1]) + (len(ids) - 1,) if prm else ()
    return RMInput(ids, pos)


# ------------------------------------------------------------------ datasets
@dataclass
class RMSequence(RMInput):
    """One training sequence: an :class:`RMInput` (``ids``:
    ``prompt + response + EOS``; ``step_pos``: PRM read positions) with its labels.

    Attributes:
        label: the outcome label (labelled rows), else None.
        step_labels: one label in [0, 1] per ``step_pos`` (None: unknown).
        group: the prompt, as a string key (data-scaling selection, per-prompt caps).
    """

    label: int | None = None
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


def _prompt_key(prompt) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(list(prompt), sort_keys=True)


def _check_len(job: JobConfig, n: int, source, field: str) -> None:
    if n > job.train.max_seq_len:
        raise DatasetError(source.path, source.line, field, f"prompt + {field} + EOS are {n} "
                           "tokens", f"raise train.max_seq_len (now {job.train.max_seq_len}) or "
                           "shorten the example", line_kind=source.line_kind)


def response_sequence(job: JobConfig, tok, prompt_ids: list[int], response: str, source,
                      field: str, *, steps: bool = False) -> RMSequence:
    """``prompt_ids + encode(response) + [EOS]`` (:func:`rm_input`); with ``steps`` the PRM
    read positions too. Refuses a row over ``train.max_seq_len``."""
    try:
        x = rm_input(tok, prompt_ids, response, prm=steps,
                     delimiter=job.reward.prm_step_delimiter)
    except ValueError as e:
        raise source.error(field, str(e), "set reward.prm_step_delimiter to a string the "
                           "tokenizer keeps as one token") from None
    _check_len(job, len(x.ids), source, field)
    return RMSequence(ids=x.ids, step_pos=x.step_pos)


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


def read_answers(path: str, key: str) -> list[Any]:
    """The ``key`` column of a labelled file, row by row (automatic step labels need it)."""
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
