"""Reward-model data from a policy's own samples, labelled by the verifier.

:func:`sample_and_label` samples N responses per prompt from a policy (an HF directory served by
a :class:`~megarlhf.workers.RolloutGroup`), checks each final answer with the math verifier, and
writes, in the formats :mod:`megarlhf.data.datasets` loads:

* ``labelled.jsonl`` — ``id, prompt, response, label`` (1 = right answer) and ``answer`` (the
  ground truth, which automatic PRM step labels need), optionally ``step_labels``;
* ``pairs.jsonl`` — ``id, prompt, chosen, rejected``: a right and a wrong response of the same
  prompt (each response in at most one pair: ``min(#right, #wrong)`` pairs per prompt);
* with ``eval_fraction > 0`` the same two files for a held-out share of the prompts
  (``labelled_eval.jsonl``, ``pairs_eval.jsonl``), split by prompt so no held-out prompt is
  trained on.

This is how the CPU demo gets an ORM for its SFT model ("an ORM trained on its samples labelled
by the verifier"). The two data-scaling axes of methods.md 1.4 are its arguments:
``num_prompts`` (distinct prompts) and ``n_per_prompt`` (responses per prompt).

:func:`policy_rollout` starts a rollout group serving any HF directory on its own placement
(used here, for PRM step labels and for best-of-N sampling); :func:`label_steps_with_policy`
labels PRM steps (Math-Shepherd, :mod:`megarlhf.rewards.prm_labels`) from a policy's rollouts.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

from megarlhf.config import ConfigError, JobConfig
from megarlhf.controller.cluster import ClusterPlacement, init_ray, slot_resource_for
from megarlhf.controller.sampling import PRM_LABELS, RM_DATA, sampling_params
from megarlhf.data.datasets import FieldNames, load_prompts, write_jsonl
from megarlhf.data.job_data import load_job_tokenizer, prompt_token_ids
from megarlhf.data.tokenizer import load_tokenizer
from megarlhf.planning.placement import PlacementPlan, Pool, RolePlacement, Slot
from megarlhf.rewards.math_verify import verify_answer
from megarlhf.rewards.prm_labels import (
    LabelType,
    PrefixRequest,
    StepExample,
    rollout_step_labels,
)
from megarlhf.workers import RolloutGroup, RolloutSpec


@contextlib.contextmanager
def policy_rollout(job: JobConfig, hf_dir: str, *, max_prompt_len: int | None = None
                   ) -> Iterator[Any]:
    """A :class:`~megarlhf.workers.RolloutGroup` serving ``hf_dir``, released on exit.

    The replicas follow ``job.rollout`` (engine, tp, num_gpus) on a placement of their own
    (``rollout.num_gpus`` slots on ``job.cluster``), so this works inside any job kind; run it
    before or after the job's trainer groups, not beside them, on a full cluster.

    Args:
        max_prompt_len: longest prompt in tokens (vLLM's max_model_len is this plus
            ``rollout.max_new_tokens``); default ``data.max_prompt_len``.
    """
    if not hf_dir or not os.path.isdir(hf_dir):
        raise ConfigError(f"policy {hf_dir!r} is not an HF model directory (config.json + "
                          "weights); point it at an exported model, e.g. <sft output_dir>/hf")
    init_ray(job)
    c, r = job.cluster, job.rollout
    if r.num_gpus > c.total_gpus:
        raise ConfigError(f"rollout.num_gpus = {r.num_gpus} > the cluster's {c.total_gpus} GPUs")
    gpn = c.gpus_per_node
    slots = tuple(Slot(i // gpn, i % gpn) for i in range(r.num_gpus))
    pool = Pool(0, ("rollout",), slots)
    plan = PlacementPlan("split", c.num_nodes, gpn, (pool,),
                         {"rollout": RolePlacement("rollout", 0, slots, pool.fraction, r.tp)})
    spec = RolloutSpec.from_job(job, model=hf_dir)
    spec = replace(spec, max_model_len=(max_prompt_len or job.data.max_prompt_len)
                   + r.max_new_tokens)
    resource = slot_resource_for(job)
    placement = ClusterPlacement(plan, resource)
    # CPU replicas: torch threads for half the cores. Intra-op threads spin while they wait, so
    # on a busy machine a replica that asks for every core runs many times slower (measured on
    # 2 cores: 512 samples of a tiny model take 0.8 s with 1 thread, 20 s with 2 under load).
    threads = max(1, (os.cpu_count() or 1) // (2 * max(1, r.num_replicas))) \
        if resource == "CPU" else None
    group = None
    try:
        group = RolloutGroup.create(placement, spec, threads=threads)
        yield group
    finally:
        if group is not None:
            group.shutdown()
        placement.release()


def policy_tokenizer(job: JobConfig, policy_hf_dir: str):
    """The policy's tokenizer: the one saved in its HF directory, else the actor's
    (``actor.model.tokenizer``)."""
    has_own = any(os.path.isfile(os.path.join(policy_hf_dir, f)) for f in (
        "tokenizer_config.json", "tokenizer.json", "tokenizer.model"))
    return load_tokenizer(policy_hf_dir) if has_own else load_job_tokenizer(job)


def pair_up(responses: list[str], labels: list[int], max_pairs: int | None = None,
            all_pairs: bool = False) -> list[tuple[int, int]]:
    """(right, wrong) index pairs of one prompt's responses, skipping empty texts and pairs of
    equal texts.

    Disjoint (default): the i-th right response with the i-th wrong one, each response in at
    most one pair (``min(#right, #wrong)`` pairs). ``all_pairs``: every (right, wrong)
    combination, ordered by shifted diagonals (the disjoint pairs first, then right i with
    wrong i+1, ...) so a cap keeps the responses evenly used. ``max_pairs`` caps the count.
    """
    right = [i for i, l in enumerate(labels) if l and responses[i].strip()]
    wrong = [i for i, l in enumerate(labels) if not l and responses[i].strip()]
    if not right or not wrong:
        return []
    if all_pairs:
        cand = [(right[a], wrong[(a + shift) % len(wrong)]) for shift in range(len(wrong))
                for a in range(len(right))]
        cand = list(dict.fromkeys(cand))
    else:
        cand = list(zip(right, wrong))
    out = [(c, w) for c, w in cand if responses[c] != responses[w]]
    return out[:max_pairs] if max_pairs is not None else out


def build_rm_records(prompts: list[dict[str, Any]], responses: list[list[str]],
                     labels: list[list[int]], *, max_pairs_per_prompt: int | None = None,
                     all_pairs: bool = False,
                     step_labels: list[list[tuple[float, ...]]] | None = None
                     ) -> tuple[list[dict], list[dict]]:
    """jsonl records for ``labelled`` and ``pairs`` files (pure).

    Args:
        prompts: per prompt ``{"id", "prompt" (text) or "messages", "answer"}``.
        responses: per prompt, its sampled response texts.
        labels: per prompt, 0/1 per response.
        max_pairs_per_prompt / all_pairs: see :func:`pair_up`.
        step_labels: per prompt, per response, step labels (optional).

    Returns:
        ``(labelled_records, pair_records)``.
    """
    labelled, pairs = [], []
    for p, rs, ls in zip(prompts, responses, labels, strict=True):
        base = {k: p[k] for k in ("prompt", "messages") if k in p}
        for j, (text, lab) in enumerate(zip(rs, ls, strict=True)):
            rec = dict(id=f"{p['id']}-s{j}", **base, response=text, label=int(lab),
                       answer=p.get("answer"))
            labelled.append(rec)
        for c, w in pair_up(rs, ls, max_pairs_per_prompt, all_pairs):
            pairs.append(dict(id=f"{p['id']}-p{c}-{w}", **base, chosen=rs[c], rejected=rs[w]))
    if step_labels is not None:
        flat = [lab for per_prompt in step_labels for lab in per_prompt]
        if len(flat) != len(labelled):
            raise ValueError(f"{len(flat)} step-label lists for {len(labelled)} responses")
        for rec, sl in zip(labelled, flat):
            rec["step_labels"] = list(sl)
    return labelled, pairs


def sample_and_label(job: JobConfig, policy_hf_dir: str, prompts_path: str, out_dir: str, *,
                     n_per_prompt: int = 4, num_prompts: int | None = None,
                     temperature: float | None = None, eval_fraction: float = 0.0,
                     max_pairs_per_prompt: int | None = None, all_pairs: bool = False,
                     step_label_rollouts: int = 0,
                     answer_prefix: str = "answer:") -> dict[str, Any]:
    """Samples, labels and writes RM training data (see the module docstring).

    Args:
        job: cluster, rollout (engine, max_new_tokens, top-p/k), data (prompt fields, chat
            template, max_prompt_len) and seed settings; any job kind.
        policy_hf_dir: the policy (an HF directory, e.g. ``<sft output_dir>/hf``); its tokenizer
            is ``job.actor.model.tokenizer`` or the directory's own.
        prompts_path: prompts with ground-truth answers (jsonl / parquet).
        out_dir: where the files go.
        n_per_prompt: responses sampled per prompt (N).
        num_prompts: use the first ``num_prompts`` prompts of the file (null: all).
        temperature: sampling temperature (default ``rollout.temperature``).
        eval_fraction: share of the prompts (a seeded choice) written to the held-out files.
        max_pairs_per_prompt: cap on pairs per prompt (default: no cap).
        all_pairs: pair every right response with every wrong one of its prompt (default: each
            response in at most one pair, see :func:`pair_up`).
        step_label_rollouts: K > 0 also writes Math-Shepherd ``step_labels`` (K rollouts per
            step, soft fractions; :func:`label_steps_with_policy`).

    Returns:
        ``{"labelled", "pairs"[, "eval_labelled", "eval_pairs"]}`` paths and the counts
        ``num_prompts``, ``num_responses``, ``num_pairs``, ``accuracy`` (share of right samples).
    """
    if n_per_prompt < 1:
        raise ConfigError(f"n_per_prompt must be >= 1, got {n_per_prompt}")
    if not 0.0 <= eval_fraction < 1.0:
        raise ConfigError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if num_prompts is not None and num_prompts < 1:
        raise ConfigError(f"num_prompts must be >= 1 (or None for all), got {num_prompts}")
    d = job.data
    tok = policy_tokenizer(job, policy_hf_dir)
    rows = load_prompts(prompts_path, FieldNames.from_dict({"prompt": d.prompt_key,
                                                           "answer": d.answer_key}))
    rows = [r for r in rows if r.answer is not None]
    if not rows:
        raise ConfigError(f"{prompts_path}: no prompt has an '{d.answer_key}'; the verifier "
                          "labels samples against the ground-truth answer")
    rows = rows[:num_prompts] if num_prompts else rows
    ids, kept = [], []
    for r in rows:
        t = prompt_token_ids(job, tok, r.prompt, r.source)
        if t is not None:
            ids.append(t)
            kept.append(r)
    params = sampling_params(job, tok, n=n_per_prompt, offset=RM_DATA, temperature=temperature)
    with policy_rollout(job, policy_hf_dir,
                        max_prompt_len=job.train.max_seq_len if step_label_rollouts
                        else None) as group:
        outs = group.generate(ids, params)
        responses = [[tok.decode(s.token_ids) for s in o.samples] for o in outs]
        labels = [[int(verify_answer(t, r.answer, answer_prefix=answer_prefix)) for t in ts]
                  for r, ts in zip(kept, responses)]
        step_labels = None
        if step_label_rollouts:
            flat = [StepExample(p, t, r.answer) for p, r, ts in zip(ids, kept, responses)
                    for t in ts]
            got = label_steps_with_policy(job, tok, flat, policy_hf_dir=policy_hf_dir,
                                          k=step_label_rollouts, rollout=group,
                                          answer_prefix=answer_prefix)
            step_labels = [got[i * n_per_prompt:(i + 1) * n_per_prompt]
                           for i in range(len(kept))]
    prompt_recs = []
    for r in kept:
        rec: dict[str, Any] = {"id": r.id, "answer": r.answer}
        if isinstance(r.prompt, str):
            rec["prompt"] = r.prompt
        else:
            rec["messages"] = [dict(m) for m in r.prompt]
        prompt_recs.append(rec)
    order = list(range(len(kept)))
    random.Random(f"megarlhf-rm-data:{job.seed}").shuffle(order)
    n_eval = int(round(eval_fraction * len(kept)))
    held = set(order[:n_eval])
    os.makedirs(out_dir, exist_ok=True)
    result: dict[str, Any] = {}
    for suffix, members in (("", [i for i in range(len(kept)) if i not in held]),
                            ("_eval", sorted(held))):
        if not members:
            continue
        lab, pairs = build_rm_records(
            [prompt_recs[i] for i in members], [responses[i] for i in members],
            [labels[i] for i in members], max_pairs_per_prompt=max_pairs_per_prompt,
            all_pairs=all_pairs,
            step_labels=[step_labels[i] for i in members] if step_labels else None)
        key = "eval_" if suffix else ""
        result[f"{key}labelled"] = str(write_jsonl(os.path.join(out_dir,
                                                                f"labelled{suffix}.jsonl"), lab))
        if pairs:
            result[f"{key}pairs"] = str(write_jsonl(os.path.join(out_dir,
                                                                 f"pairs{suffix}.jsonl"), pairs))
        result[f"{key}num_pairs"] = len(pairs)
    flat_labels = [l for ls in labels for l in ls]
    result.update(num_prompts=len(kept), num_responses=len(flat_labels),
                  accuracy=sum(flat_labels) / max(1, len(flat_labels)))
    if "pairs" not in result:
        raise ConfigError(f"no prompt has both a right and a wrong sample among its "
                          f"{n_per_prompt} (sample accuracy {result['accuracy']:.3f}); sample "
                          "more responses per prompt (n_per_prompt) or more prompts")
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    return result


def label_steps_with_policy(job, tokenizer, examples: Sequence[StepExample], *,
                            policy_hf_dir: str, k: int, label_type: LabelType = "soft",
                            rollout=None, answer_prefix: str = "answer:",
                            log: Callable[[str], None] | None = None
                            ) -> list[tuple[float, ...]]:
    """:func:`rollout_step_labels` with rollouts sampled from a policy (Ray, rollout engine).

    ``example.prompt`` must be the prompt's token ids (through the chat template, as the policy
    saw prompts in training). Each prefix is ``prompt ids + tokenizer.encode(prefix text)``;
    sampling follows ``job.rollout`` (temperature, top-p/k, max_new_tokens) with the seed of
    :data:`~megarlhf.controller.sampling.PRM_LABELS`, so labels are reproducible on one engine.

    Args:
        job: the job (cluster, rollout settings, seed).
        tokenizer: the policy's tokenizer.
        policy_hf_dir: the policy to roll out (an HF model directory).
        k: rollouts per intermediate step.
        rollout: an already running RolloutGroup serving the policy (else one is started and
            stopped here).
    """
    r = job.rollout
    temperature = r.temperature if r.temperature > 0 else 1.0

    def run(group) -> list[tuple[float, ...]]:
        def complete(requests: list[PrefixRequest], n: int) -> list[list[str]]:
            prompts = [list(q.prompt) + tokenizer.encode(q.prefix) for q in requests]
            params = sampling_params(job, tokenizer, n=n, offset=PRM_LABELS,
                                     temperature=temperature)
            if log is not None:
                log(f"megarlhf: PRM step labels: {len(prompts)} step prefixes x {n} rollouts "
                    f"from {policy_hf_dir}")
            outs = group.generate(prompts, params)
            return [[tokenizer.decode(s.token_ids) for s in o.samples] for o in outs]

        def is_correct(text: str, answer: Any) -> bool:
            return verify_answer(text, answer, answer_prefix=answer_prefix)

        return rollout_step_labels(examples, complete, is_correct, k,
                                   job.reward.prm_step_delimiter, label_type)

    if rollout is not None:
        return run(rollout)
    with policy_rollout(job, policy_hf_dir, max_prompt_len=job.train.max_seq_len) as group:
        return run(group)
