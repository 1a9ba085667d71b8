"""Best-of-N metrics (methods.md 1.3), pure: from the scores and verdicts of M samples per
prompt to best-of-N, oracle (pass@N), majority-vote and mean accuracy for every N.

The M samples of a prompt are split into ``M // N`` disjoint groups of N (each an independent
draw of N samples; averaging over the groups cuts the variance of the small-N estimates). Over
P prompts and the groups G of each, with ``c_j`` = sample j is right::

    best-of-N     mean_{p,G} c_{argmax_{j in G} score_j}        (ties: the earliest sample)
    oracle@N      mean_{p,G} max_{j in G} c_j                    (pass@N)
    majority@N    mean_{p,G} c_{j*}, j* a sample of the most frequent final answer in G
                  (ties: the answer that appears first; no answer at all = wrong)
    mean@N        mean_{p,G} mean_{j in G} c_j                   (a single sample's accuracy)

The evaluation that samples and scores is :mod:`megarlhf.controller.bon`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megarlhf.rewards.math_verify import extract_integer_answer, stated_answer


def extract_answer(text: str, answer_prefix: str = "answer:") -> str | None:
    """The final answer a response states, as a key for majority voting: the integer (``"+7"``
    and ``"7"`` agree) or else the stripped text after the last ``answer_prefix`` or in the
    last ``\\boxed{}``; None when it states none."""
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
