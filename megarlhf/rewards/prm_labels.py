"""Automatic PRM step labels from policy rollouts (Math-Shepherd; methods.md 1.2).

A solution ``y = s_1 d s_2 d ... d s_n`` (steps ``s_k`` separated by the delimiter ``d``) gets one
label per step. For an intermediate step ``k < n`` the policy continues the prefix
``p_k = s_1 d ... s_k d`` K times; with ``c_k`` of the K completed solutions ``p_k + z`` reaching
the right final answer::

    soft label  y_k = c_k / K            (an estimate of P(correct | prefix p_k))
    hard label  y_k = 1[c_k > 0]         (some continuation of the prefix is right)

The final step's label is the verifier's verdict on the solution itself (its "rollouts" are the
solution: nothing follows the last step).

:func:`rollout_step_labels` is the label math, pure: it takes a batched completer
``complete(requests, K) -> K continuation texts per request`` and a verifier, so it runs without
a model (tests pass a fake completer). The completer that samples from a policy on a rollout
group is :func:`megarlhf.controller.rm_data.label_steps_with_policy`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

LabelType = Literal["soft", "hard"]


@dataclass(frozen=True)
class StepExample:
    """One solution to label.

    Attributes:
        prompt: passed through to the completer unchanged (token ids, text, chat messages).
        response: the solution text.
        answer: the ground truth the verifier compares final answers with.
    """

    prompt: Any
    response: str
    answer: Any


@dataclass(frozen=True)
class PrefixRequest:
    """"Continue this solution prefix": the prompt and the response text up to a step end."""

    prompt: Any
    prefix: str
    example: int  # index of the StepExample
    step: int  # 0-based index of the step the prefix ends with


def step_prefixes(response: str, delimiter: str) -> list[str]:
    """The response's prefixes that end each step, delimiter included when one follows.

    Steps are the non-blank pieces between delimiters (as :func:`megarlhf.data.datasets.
    split_steps` cuts them), so ``len(step_prefixes(r, d)) == len(split_steps(r, d))``; the last
    prefix is the whole response (plus a trailing delimiter only if the response has one).

    ``"1+2=3\\n3*4=12\\nanswer: 12"`` -> ``["1+2=3\\n", "1+2=3\\n3*4=12\\n",
    "1+2=3\\n3*4=12\\nanswer: 12"]``.
    """
    if not delimiter:
        raise ValueError("step delimiter must be a non-empty string")
    out, pos = [], 0
    for piece in response.split(delimiter):
        pos += len(piece)
        if pos < len(response):
            pos += len(delimiter)
        if piece.strip():
            out.append(response[:pos])
    return out


def labels_from_outcomes(outcomes: Sequence[bool], label_type: LabelType = "soft") -> float:
    """One step's label from the verdicts of its K rollouts: the fraction right (soft) or
    whether any is right (hard)."""
    if label_type not in ("soft", "hard"):
        raise ValueError(f"label_type must be 'soft' or 'hard', got {label_type!r}")
    if not outcomes:
        raise ValueError("a step label needs at least one rollout")
    right = sum(bool(o) for o in outcomes)
    return right / len(outcomes) if label_type == "soft" else float(right > 0)


def rollout_step_labels(examples: Sequence[StepExample],
                        complete: Callable[[list[PrefixRequest], int], list[list[str]]],
                        is_correct: Callable[[str, Any], bool], k: int, delimiter: str = "\n",
                        label_type: LabelType = "soft") -> list[tuple[float, ...]]:
    """Math-Shepherd step labels of every example (see the module docstring).

    Args:
        examples: the solutions to label.
        complete: ``complete(requests, K)`` returns, for each request, K continuation texts of
            ``request.prefix`` (the text generated after it, without the prefix). Called once
            with every intermediate prefix of every example (it batches as it likes).
        is_correct: ``is_correct(full_solution_text, answer)``, the verifier.
        k: rollouts per step (K >= 1).
        delimiter: the step delimiter.
        label_type: ``"soft"`` (fraction right) or ``"hard"`` (any right).

    Returns:
        per example, one label in [0, 1] per step (``len == len(split_steps(response))``); a
        response without steps gets ``()``.
    """
    if k < 1:
        raise ValueError(f"PRM step labelling needs K >= 1 rollouts per step, got {k}")
    if label_type not in ("soft", "hard"):
        raise ValueError(f"label_type must be 'soft' or 'hard', got {label_type!r}")
    requests: list[PrefixRequest] = []
    n_steps: list[int] = []
    for i, ex in enumerate(examples):
        prefixes = step_prefixes(ex.response, delimiter)
        n_steps.append(len(prefixes))
        requests.extend(PrefixRequest(ex.prompt, p, i, s) for s, p in enumerate(prefixes[:-1]))
    completions = complete(requests, k) if requests else []
    if len(completions) != len(requests):
        raise ValueError(f"the completer returned {len(completions)} results for "
                         f"{len(requests)} prefixes")
    labels: list[list[float]] = [[0.0] * n for n in n_steps]
    for req, texts in zip(requests, completions):
        if len(texts) != k:
            raise ValueError(f"the completer returned {len(texts)} continuations of a prefix, "
                             f"{k} were asked for")
        answer = examples[req.example].answer
        labels[req.example][req.step] = labels_from_outcomes(
            [is_correct(req.prefix + t, answer) for t in texts], label_type)
    for i, ex in enumerate(examples):
        if n_steps[i]:
            labels[i][-1] = float(bool(is_correct(ex.response, ex.answer)))
    return [tuple(x) for x in labels]
