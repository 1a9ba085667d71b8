"""Best-of-N evaluation of a reward model (methods.md 1.3). ``megarlhf eval bon CONFIG``.

For each test prompt (``data.eval_path``, the first ``bon.num_prompts``) the policy
(``actor.model.hf_dir``) samples ``M = max(bon.n_values)`` responses at ``bon.temperature``; the
verifier marks each right or wrong and the reward model (``reward_model``) scores each text
exactly as RL and RM training do (:class:`~megarlhf.rewards.reward_model.RewardModelScorer`:
``prompt + response + EOS`` in its tokenizer; an ORM at the EOS, a PRM by
``reward.prm_aggregation`` of its step scores). Best-of-N, oracle (pass@N), majority-vote and
mean accuracy for every N are :func:`megarlhf.rewards.bon_metrics.bon_curve`.

Writes ``<output_dir>/bon.json`` (the table) and ``bon_samples.jsonl`` (every sample with its
score and verdict), logs ``bon/accuracy@N``, ``bon/oracle@N``, ``bon/majority@N``,
``bon/mean@N`` (step 0) and the curves ``bon/accuracy``, ``bon/oracle``, ``bon/majority``
with the step axis = N, and prints the table.

Sampling and scoring are two phases: the policy's rollout replicas are released before the
reward model's workers start, so both may use the whole cluster.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from megarlhf.config import ConfigError, JobConfig
from megarlhf.controller.cluster import Cluster
from megarlhf.controller.rm_data import policy_rollout
from megarlhf.controller.sampling import BEST_OF_N, sampling_params
from megarlhf.controller.session import Session
from megarlhf.data.datasets import FieldNames, load_prompts
from megarlhf.data.job_data import load_job_tokenizer, prompt_token_ids
from megarlhf.planning import validate
from megarlhf.rewards.bon_metrics import bon_curve, extract_answer, format_table
from megarlhf.rewards.math_verify import verify_answer
from megarlhf.rewards.reward_model import RewardModelScorer


def _load_test_prompts(job: JobConfig):
    d = job.data
    if not d.eval_path or not os.path.exists(d.eval_path):
        raise ConfigError(f"data.eval_path = {d.eval_path!r} does not exist (the test prompts)")
    rows = load_prompts(d.eval_path, FieldNames.from_dict({"prompt": d.prompt_key,
                                                          "answer": d.answer_key}))
    no_answer = [r for r in rows if r.answer is None]
    if no_answer:
        raise ConfigError(f"{no_answer[0].source}: no '{d.answer_key}'; best-of-N checks each "
                          "picked answer against the ground truth, so every test prompt needs "
                          "one")
    return rows[: job.bon.num_prompts] if job.bon.num_prompts else rows


def rm_scores(job: JobConfig, group, rm_tok, prompts: list[Any], responses: list[list[str]]
              ) -> torch.Tensor:
    """``(P, M)`` reward-model scores of the M response texts of each of P prompts, scored as
    RL and RM training score them (:class:`~megarlhf.rewards.reward_model.RewardModelScorer`)."""
    M = len(responses[0]) if responses else 0
    scorer = RewardModelScorer(job, group, rm_tok)
    flat = scorer([p for p, ts in zip(prompts, responses) for _ in ts],
                  [t for ts in responses for t in ts])
    return flat.view(len(prompts), M)


def eval_bon(job: JobConfig) -> dict[str, Any]:
    """Runs the best-of-N evaluation (see the module docstring).

    Returns:
        ``{"curve": {N: {...}}, "num_prompts", "samples_per_prompt", "path"}``.
    """
    if job.kind != "bon":
        raise ConfigError(f"eval_bon runs kind=bon jobs, got kind={job.kind}")
    if job.reward_model is None or job.reward_model.model is None:
        raise ConfigError("kind=bon needs reward_model.model (an exported reward model)")
    validate(job)
    b = job.bon
    M = max(b.n_values)
    tok = load_job_tokenizer(job)
    rm_tok = load_job_tokenizer(job, model=job.reward_model.model)
    rows = _load_test_prompts(job)
    pids = [prompt_token_ids(job, tok, row.prompt, row.source) for row in rows]
    rows = [row for row, p in zip(rows, pids) if p is not None]
    pids = [p for p in pids if p is not None]
    if not rows:
        raise ConfigError("data.eval_path: every test prompt was skipped (data.overlong_prompt)")
    session = Session(job, total_steps=1, desc="bon")
    try:
        session.log_line(f"megarlhf: best-of-N: {len(rows)} prompts x {M} samples from "
                         f"{job.actor.model.hf_dir} at temperature {b.temperature}")
        params = sampling_params(job, tok, n=M, offset=BEST_OF_N, temperature=b.temperature)
        with session.timer("generate"):
            with policy_rollout(job, job.actor.model.hf_dir) as group:
                outs = group.generate(pids, params)
        responses = [[tok.decode(s.token_ids) for s in o.samples] for o in outs]
        correct = torch.tensor([[verify_answer(t, row.answer) for t in ts]
                                for row, ts in zip(rows, responses)], dtype=torch.bool)
        answers = [[extract_answer(t) for t in ts] for ts in responses]
        with session.timer("score"):
            with Cluster(job, roles=["reward_model"], rollout=False,
                         pad_id=rm_tok.pad_id) as cl:
                scores = rm_scores(job, cl["reward_model"], rm_tok,
                                   [row.prompt for row in rows], responses)
        curve = bon_curve(scores, correct, answers, sorted(b.n_values))
        times = session.timer.pop()
        flat: dict[str, float] = {}
        for n, res in curve.items():
            flat.update({f"bon/{k}@{n}": v for k, v in res.items()})
        flat.update({f"time/{k}": v for k, v in times.items()})
        session.log(0, flat)
        for n, res in curve.items():
            session.log(n, {"bon/accuracy": res["accuracy"], "bon/oracle": res["oracle"],
                            "bon/majority": res["majority"], "bon/mean": res["mean"]})
        out = {"num_prompts": len(rows), "samples_per_prompt": M,
               "temperature": b.temperature, "policy": job.actor.model.hf_dir,
               "reward_model": job.reward_model.model.hf_dir, "rm_type": job.reward.rm_type,
               "curve": {str(n): v for n, v in curve.items()}, "seconds": times}
        path = os.path.join(session.output_dir, "bon.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
        with open(os.path.join(session.output_dir, "bon_samples.jsonl"), "w",
                  encoding="utf-8") as f:
            for row, ts, sc, cc in zip(rows, responses, scores.tolist(), correct.tolist()):
                f.write(json.dumps({"id": row.id, "answer": row.answer, "responses": ts,
                                    "scores": sc, "correct": cc}) + "\n")
        table = format_table(curve, len(rows))
        session.log_line(table)
    finally:
        session.close()
    return {"curve": curve, "num_prompts": len(rows), "samples_per_prompt": M, "path": path,
            "table": table}
