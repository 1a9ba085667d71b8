"""Best-of-N evaluation of a reward model (methods.md 1.3). ``megarlhf eval bon CONFIG``.

For each test prompt (``data.eval_path``, the first ``bon.num_prompts``) the policy
(``actor.model.hf_dir``) samples ``M = max(bon.n_values)`` responses at ``bon.temperature``; the
verifier marks each right or wrong and the reward model (``reward_model``) scores each: an ORM
at the last token, a PRM by ``reward.prm_aggregation`` of its step scores. For every N the M
samples of a prompt are split into ``M // N`` disjoint groups of N (each an independent draw of
N samples; averaging over the groups cuts the variance of the small-N estimates). Over P
prompts and the groups G of each, with ``c_j`` = sample j is right::

    best-of-N     mean_{p,G} c_{argmax_{j in G} score_j}        (ties: the earliest sample)
    oracle@N      mean_{p,G} max_{j in G} c_j                    (pass@N)
    majority@N    mean_{p,G} c_{j*}, j* a sample of the most frequent final answer in G
                  (ties: the answer that appears first; no answer at all = wrong)
    mean@N        mean_{p,G} mean_{j in G} c_j                   (a single sample's accuracy)

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
from collections.abc import Sequence
from typing import Any

import torch

from megarlhf.config import ConfigError, JobConfig

def extract_answer(text: str, answer_prefix: str = "answer:") -> str | None:
    """The final answer a response states, as a key for majority voting: the integer (``"+7"``
    and ``"7"`` agree) or else the stripped text after the last ``answer_prefix`` or in the
    last ``\\boxed{}``; None when it states none."""
    from megarlhf.rewards.math_verify import extract_integer_answer, stated_answer

    a = extract_integer_answer(text, answer_prefix)
    if a is not None:
        return str(a)
    best = stated_answer(text, answer_prefix, rest_of_line=True)
    if best is None:
        return None
    best = best.strip().rstrip(".,;$").strip()
    return best or None


def majority_index(answers: Sequence[str | None]) -> int | None:
    """Index of the first sample whose answer is the most frequent one (ties: the answer that
    appears first); None when no sample states an answer."""
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, a in enumerate(answers):
        if a is None:
            continue
        counts[a] = counts.get(a, 0) + 1
        first.setdefault(a, i)
    if not counts:
        return None
    top = max(counts.values())
    return min(first[a] for a, c in counts.items() if c == top)


def bon_curve(scores: torch.Tensor, correct: torch.Tensor,
              answers: Sequence[Sequence[str | None]], n_values: Sequence[int]
              ) -> dict[int, dict[str, float]]:
    """Best-of-N, oracle, majority-vote and mean accuracy for every N (module docstring).

    The M samples of a prompt are split into ``M // N`` disjoint groups of N consecutive
    samples (``[0, N), [N, 2N), ...``); each group is an independent draw of N samples, so each
    method's accuracy over a group is an unbiased estimate of its accuracy at N, and their mean
    over the groups and prompts is reported (``M // N`` times the trials of the first N alone,
    same expectation). Within a group every method sees the same N samples, so best-of-N and
    majority never exceed the oracle. Samples left over (``M % N``) are not used at that N.

    Args:
        scores: ``(P, M)`` reward-model scores of M samples per prompt.
        correct: ``(P, M)`` bool, the verifier's verdicts.
        answers: P lists of M extracted answers (None: no answer).
        n_values: the N to report, each ``<= M``.

    Returns:
        ``{N: {"accuracy", "oracle", "majority", "mean"}}``; "mean" is the accuracy of a single
        sample (over the groups' samples).
    """
    P, M = scores.shape
    if correct.shape != (P, M) or len(answers) != P:
        raise ValueError(f"scores {tuple(scores.shape)}, correct {tuple(correct.shape)} and "
                         f"{len(answers)} answer lists do not match")
    c = correct.bool()
    out: dict[int, dict[str, float]] = {}
    for n in n_values:
        if not 1 <= n <= M:
            raise ValueError(f"N = {n} is outside 1..{M} (samples per prompt)")
        G = M // n
        s = scores[:, :G * n].float().reshape(P, G, n)
        cg = c[:, :G * n].reshape(P, G, n)
        # The first maximum of each group (ties: the earliest sample), made explicit.
        best = (s == s.max(dim=2, keepdim=True).values).float().argmax(dim=2)  # (P, G)
        picked = cg.gather(2, best.unsqueeze(-1)).squeeze(-1)  # (P, G)
        maj = 0
        for p in range(P):
            for g in range(G):
                j = majority_index(answers[p][g * n:(g + 1) * n])
                maj += j is not None and bool(cg[p, g, j])
        trials = P * G
        out[n] = {  # exact fractions (counts / trials), comparable across methods
            "accuracy": int(picked.sum()) / trials,
            "oracle": int(cg.any(dim=2).sum()) / trials,
            "majority": maj / trials,
            "mean": int(cg.sum()) / (trials * n),
        }
    return out


def format_table(curve: dict[int, dict[str, float]], num_prompts: int) -> str:
    lines = [f"best-of-N on {num_prompts} prompts (accuracy of the answer each method picks)",
             f"{'N':>5}  {'best-of-N':>9}  {'majority':>8}  {'oracle':>8}  {'mean':>6}"]
    for n, r in sorted(curve.items()):
        lines.append(f"{n:>5}  {r['accuracy']:>9.3f}  {r['majority']:>8.3f}  "
                     f"{r['oracle']:>8.3f}  {r['mean']:>6.3f}")
    return "\n".join(lines)


def _load_test_prompts(job: JobConfig):
    from megarlhf.data.datasets import FieldNames, load_prompts

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


def rm_scores(job: JobConfig, group, rm_tok, prompts: Sequence[Any],
              responses: Sequence[Sequence[str]]) -> torch.Tensor:
    """``(P, M)`` reward-model scores of response texts, re-tokenized with the RM's tokenizer
    exactly as in RM training (``prompt + response + EOS``; a truncated sample gets the EOS
    too). ORM: the logit at the last token; PRM: ``reward.prm_aggregation`` of the steps."""
    from megarlhf.data.job_data import prompt_token_ids
    from megarlhf.controller.rm import prm_scores, score_sequences
    from megarlhf.data.datasets import Source, tokenize_response_steps

    prm = job.reward.rm_type == "prm"
    seqs, pos = [], []
    for prompt, texts in zip(prompts, responses):
        pids = prompt_token_ids(job, rm_tok, prompt, Source("<test prompt>"))
        if pids is None:
            raise ConfigError("a test prompt is over data.max_prompt_len for the reward model's "
                              "tokenizer; raise data.max_prompt_len")
        for t in texts:
            if prm:
                try:
                    rids, ends = tokenize_response_steps(rm_tok, t,
                                                         job.reward.prm_step_delimiter)
                except ValueError as e:
                    raise ConfigError(f"reward.prm_step_delimiter: {e}") from None
            else:
                rids, ends = rm_tok.encode(t), []
            ids = list(pids) + rids + [rm_tok.eos_id]
            seqs.append(ids)
            pos.append(tuple(len(pids) + e for e in ends[:-1]) + (len(ids) - 1,))
    values = score_sequences(group, seqs, rm_tok.pad_id)
    if prm:
        flat = prm_scores(values, pos, job.reward.prm_aggregation)
    else:
        flat = torch.stack([v[-1] for v in values])
    return flat.view(len(prompts), -1)


def eval_bon(job: JobConfig) -> dict[str, Any]:
    """Runs the best-of-N evaluation (see the module docstring).

    Returns:
        ``{"curve": {N: {...}}, "num_prompts", "samples_per_prompt", "path"}``.
    """
    from megarlhf.controller.cluster import Cluster
    from megarlhf.data.job_data import load_job_tokenizer
    from megarlhf.data.job_data import prompt_token_ids
    from megarlhf.controller.rm_data import policy_rollout
    from megarlhf.controller.session import Session
    from megarlhf.rewards.math_verify import verify_answer
    from megarlhf.rollout.base import SamplingParams

    if job.kind != "bon":
        raise ConfigError(f"eval_bon runs kind=bon jobs, got kind={job.kind}")
    if job.reward_model is None or job.reward_model.model is None:
        raise ConfigError("kind=bon needs reward_model.model (an exported reward model)")
    b, r = job.bon, job.rollout
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
        params = SamplingParams(n=M, temperature=b.temperature, top_p=r.top_p, top_k=r.top_k,
                                max_new_tokens=r.max_new_tokens,
                                stop_token_ids=tuple(dict.fromkeys([tok.eos_id,
                                                                    *r.stop_token_ids])),
                                seed=job.seed * 1_000_003 + 13, logprobs=False)
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
