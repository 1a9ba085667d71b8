"""Best-of-N arithmetic: selection by score, oracle pass@N, majority vote, nested N."""

import pytest
import torch

from megarlhf.rewards.bon_metrics import bon_curve, extract_answer, format_table, majority_index


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
    (methods.md 1.3, averaged over disjoint groups of N samples) on a hand-computed example."""
    # 2 prompts x 4 samples.
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.2],
                           [0.5, 0.1, 0.7, 0.7]])
    correct = torch.tensor([[0, 1, 0, 1],
                            [0, 0, 1, 1]], dtype=torch.bool)
    answers = [["4", "5", "4", "5"], ["1", "1", "2", "2"]]
    c = bon_curve(scores, correct, answers, [1, 2, 4])
    # N=1: 8 single samples, 4 right; every method picks the one sample.
    assert c[1] == {"accuracy": 0.5, "oracle": 0.5, "majority": 0.5, "mean": 0.5}
    # N=2, groups {0,1} and {2,3}: prompt 0 picks sample 1 (right) and sample 2 (0.3, wrong);
    # prompt 1 picks sample 0 (wrong) and, on the 0.7 tie, sample 2 (right) -> 2/4.
    # Oracle: 3 of 4 groups hold a right sample. Majority: prompt 0 ties "4"/"5" -> "4" (wrong)
    # twice; prompt 1: "1","1" (wrong) and "2","2" (right) -> 1/4.
    assert c[2] == {"accuracy": 0.5, "oracle": 0.75, "majority": 0.25, "mean": 0.5}
    # N=4, one group: prompt 0 picks sample 1 (right); prompt 1's tie picks sample 2 (right).
    # Majority: both prompts tie between two answers -> the first ("4", "1"), both wrong.
    assert c[4] == {"accuracy": 1.0, "oracle": 1.0, "majority": 0.0, "mean": 0.5}


def _random_case(seed, P=50, M=16):
    g = torch.Generator().manual_seed(seed)
    correct = torch.rand(P, M, generator=g) < 0.3
    scores = correct.float() * 0.5 + torch.rand(P, M, generator=g)  # informative RM
    answers = [[("right" if correct[p, j] else f"w{int(torch.randint(0, 3, (1,), generator=g))}")
                for j in range(M)] for p in range(P)]
    return scores, correct, answers


def test_bon_curve_groups_bounds_and_order():
    """If this fails, an accuracy exceeds the oracle (a bug in selection), N = 1 is not the
    single-sample accuracy, an informative RM does not help, or the estimate depends on the
    order of the disjoint groups."""
    P, M = 50, 16
    scores, correct, answers = _random_case(0, P, M)
    c = bon_curve(scores, correct, answers, [1, 2, 4, 8, 16])
    for n, r in c.items():
        assert r["accuracy"] <= r["oracle"] + 1e-9 and r["majority"] <= r["oracle"] + 1e-9
        assert r["mean"] == pytest.approx(float(correct.float().mean()))
    oracle = [c[n]["oracle"] for n in (1, 2, 4, 8, 16)]
    assert oracle == sorted(oracle)
    assert c[1]["accuracy"] == c[1]["oracle"] == c[1]["mean"]  # N = 1: no choice
    assert c[16]["accuracy"] > c[4]["accuracy"] > c[1]["accuracy"]  # informative scores
    # Swapping the two groups of 8 changes no estimate at N = 8, 4, 2, 1.
    perm = list(range(8, 16)) + list(range(8))
    cs = bon_curve(scores[:, perm], correct[:, perm], [[a[j] for j in perm] for a in answers],
                   [1, 2, 4, 8])
    assert all(cs[n] == c[n] for n in (1, 2, 4, 8))
    # N = M: the first (only) group is the whole set, as in the plain definition.
    best = scores.argmax(dim=1)
    assert c[16]["accuracy"] == int(correct[torch.arange(P), best].sum()) / P
    with pytest.raises(ValueError, match="outside"):
        bon_curve(scores, correct, answers, [17])
    assert "best-of-N" in format_table(c, P)


def test_bon_curve_leftover_samples_are_unused():
    """If this fails, N that does not divide M reads samples outside its groups."""
    scores, correct, answers = _random_case(1, 20, 10)
    c = bon_curve(scores, correct, answers, [3])
    c9 = bon_curve(scores[:, :9], correct[:, :9], [a[:9] for a in answers], [3])
    assert c[3] == c9[3]
