"""Best-of-N arithmetic: selection by score, oracle pass@N, majority vote, nested N."""

import pytest
import torch

from megarlhf.controller.bon import bon_curve, extract_answer, format_table, majority_index


def test_extract_answer_keys_for_voting():
    """If this fails, equal answers written differently split the vote (or non-answers vote)."""
    assert extract_answer("1+2=3\nanswer: 3") == "3"
    assert extract_answer("answer: +3") == extract_answer("answer: 3")
    assert extract_answer("answer: 2\nanswer: 5") == "5"  # the last one counts
    assert extract_answer("so \\boxed{7}") == "7"
    assert extract_answer("answer: x/2.") == "x/2"
    assert extract_answer("no idea") is None
    assert extract_answer("answer: ") is None


def test_majority_index_ties_and_missing():
    """If this fails, majority vote picks an answer that is not the most frequent, breaks ties
    unpredictably, or counts responses without an answer."""
    assert majority_index(["3", "4", "4", None]) == 1
    assert majority_index(["3", "4", "4", "3"]) == 0  # tie: the answer seen first
    assert majority_index([None, "5", None, None]) == 1
    assert majority_index([None, None]) is None
    assert majority_index([]) is None


def test_bon_curve_hand_computed():
    """If this fails, best-of-N, oracle, majority or mean accuracy differ from the definition
    (methods.md 1.3) on a hand-computed example."""
    # 2 prompts x 4 samples.
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.2],
                           [0.5, 0.1, 0.7, 0.7]])
    correct = torch.tensor([[0, 1, 0, 1],
                            [0, 0, 1, 1]], dtype=torch.bool)
    answers = [["4", "5", "4", "5"], ["1", "1", "2", "2"]]
    c = bon_curve(scores, correct, answers, [1, 2, 4])
    # N=1: only sample 0 -> both wrong.
    assert c[1] == {"accuracy": 0.0, "oracle": 0.0, "majority": 0.0, "mean": 0.0}
    # N=2: prompt 0 picks sample 1 (0.9, right); prompt 1 picks sample 0 (0.5, wrong).
    # Oracle: prompt 0 yes, prompt 1 no. Majority: prompt 0 tie 4/5 -> "4" (first) wrong;
    # prompt 1: "1" twice -> wrong.
    assert c[2] == {"accuracy": 0.5, "oracle": 0.5, "majority": 0.0, "mean": 0.25}
    # N=4: prompt 1 ties 0.7/0.7 -> first (sample 2, right). Majority: prompt 0 tie -> "4"
    # wrong; prompt 1 tie "1"/"2" -> "1" wrong.
    assert c[4] == {"accuracy": 1.0, "oracle": 1.0, "majority": 0.0, "mean": 0.5}


def test_bon_curve_is_nested_and_oracle_bounds():
    """If this fails, larger N does not reuse the smaller N's samples, or an accuracy exceeds
    the oracle (a bug in selection)."""
    g = torch.Generator().manual_seed(0)
    P, M = 50, 16
    correct = torch.rand(P, M, generator=g) < 0.3
    scores = correct.float() * 0.5 + torch.rand(P, M, generator=g)  # informative RM
    answers = [[("right" if correct[p, j] else f"w{int(torch.randint(0, 3, (1,), generator=g))}")
                for j in range(M)] for p in range(P)]
    c = bon_curve(scores, correct, answers, [1, 2, 4, 8, 16])
    for n, r in c.items():
        assert r["accuracy"] <= r["oracle"] + 1e-9 and r["majority"] <= r["oracle"] + 1e-9
    oracle = [c[n]["oracle"] for n in (1, 2, 4, 8, 16)]
    assert oracle == sorted(oracle)  # pass@N never decreases with nested samples
    assert c[1]["accuracy"] == c[1]["oracle"] == c[1]["mean"]  # N = 1: no choice
    # Same result on the first 8 columns alone: N uses the first N samples only.
    c8 = bon_curve(scores[:, :8], correct[:, :8], [a[:8] for a in answers], [1, 2, 4, 8])
    assert all(c8[n] == c[n] for n in (1, 2, 4, 8))
    with pytest.raises(ValueError, match="outside"):
        bon_curve(scores, correct, answers, [17])
    assert "best-of-N" in format_table(c, P)
