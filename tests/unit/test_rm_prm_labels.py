"""Automatic PRM step labels (Math-Shepherd): labels equal the rollout fractions."""

import pytest

from megarlhf.rewards.prm_labels import (
    PrefixRequest,
    StepExample,
    labels_from_outcomes,
    rollout_step_labels,
    step_prefixes,
)
from megarlhf.data.datasets import split_steps
from megarlhf.rewards.math_verify import verify_answer

# "12+7*3=": 7*3=21, 12+21=33. The first step is right, the second wrong (the answer follows
# from the wrong value), so rollouts from the first prefix can still reach 33, rollouts from
# the second cannot (they continue from 34).
PROMPT = "12+7*3="
WRONG = "7*3=21\n12+21=34\nanswer: 34"
RIGHT = "7*3=21\n12+21=33\nanswer: 33"


def fake_completer(table):
    """Continuations from a fixed table: prefix text -> K continuation texts. Records calls."""
    calls = []

    def complete(requests, k):
        calls.append((list(requests), k))
        return [list(table[r.prefix][:k]) for r in requests]

    return complete, calls


def is_correct(text, answer):
    return verify_answer(text, answer)


def test_step_prefixes_match_split_steps():
    """If this fails, step prefixes and the loader's steps disagree (labels land on the wrong
    step)."""
    for resp in (RIGHT, "\n7*3=21\n\nanswer: 33\n", "answer: 1", ""):
        pre = step_prefixes(resp, "\n")
        assert len(pre) == len(split_steps(resp, "\n"))
        assert all(resp.startswith(p) for p in pre)
    assert step_prefixes(RIGHT, "\n") == ["7*3=21\n", "7*3=21\n12+21=33\n", RIGHT]


def test_labels_equal_rollout_fractions_on_a_hand_made_example():
    """If this fails, the PRM's automatic step labels are not the fraction of rollouts from each
    prefix that reach the right answer (Math-Shepherd soft labels) or whether any does (hard)."""
    table = {
        # After step 1 (right): 3 of 4 continuations reach 33.
        "7*3=21\n": ["12+21=33\nanswer: 33", "12+21=33\nanswer: 33", "12+21=31\nanswer: 31",
                     "12+21=33\nanswer: 33"],
        # After step 2 (wrong): none does.
        "7*3=21\n12+21=34\n": ["answer: 34", "answer: 34", "answer: 35", "answer: 34"],
    }
    complete, calls = fake_completer(table)
    ex = StepExample(prompt=[1, 2, 3], response=WRONG, answer="33")
    soft = rollout_step_labels([ex], complete, is_correct, k=4, label_type="soft")
    assert soft == [(0.75, 0.0, 0.0)]  # last step: the verifier's verdict on the response
    hard = rollout_step_labels([ex], complete, is_correct, k=4, label_type="hard")
    assert hard == [(1.0, 0.0, 0.0)]
    # One batched call with both intermediate prefixes, the prompt passed through.
    reqs, k = calls[0]
    assert k == 4 and [r.prefix for r in reqs] == list(table)
    assert all(isinstance(r, PrefixRequest) and r.prompt == [1, 2, 3] for r in reqs)


def test_several_examples_and_final_step_is_outcome():
    """If this fails, labels of one example leak into another, or a right solution's last step
    is not labelled 1."""
    table = {
        "7*3=21\n": ["12+21=33\nanswer: 33", "12+21=30\nanswer: 30"],
        "7*3=21\n12+21=33\n": ["answer: 33", "answer: 33"],
        "7*3=21\n12+21=34\n": ["answer: 34", "answer: 33"],
        "2+2=4\n": ["answer: 4", "answer: 5"],
    }
    complete, _ = fake_completer(table)
    exs = [StepExample(0, RIGHT, 33), StepExample(1, WRONG, 33),
           StepExample(2, "2+2=4\nanswer: 4", "4"), StepExample(3, "", "1")]
    out = rollout_step_labels(exs, complete, is_correct, k=2)
    assert out == [(0.5, 1.0, 1.0), (0.5, 0.5, 0.0), (0.5, 1.0), ()]


def test_bad_inputs_are_refused():
    """If this fails, K = 0, an unknown label type or a short completer result slips through."""
    ex = [StepExample(0, RIGHT, "33")]
    with pytest.raises(ValueError, match="K >= 1"):
        rollout_step_labels(ex, lambda r, k: [], is_correct, k=0)
    with pytest.raises(ValueError, match="soft' or 'hard"):
        rollout_step_labels(ex, lambda r, k: [], is_correct, k=1, label_type="mean")
    with pytest.raises(ValueError, match="returned 1 continuations"):
        rollout_step_labels(ex, lambda r, k: [["x"] for _ in r], is_correct, k=2)
    assert labels_from_outcomes([True, False, False, False]) == 0.25
    assert labels_from_outcomes([False, False], "hard") == 0.0
