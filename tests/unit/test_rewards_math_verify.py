"""The math verifier (megarlhf/rewards/math_verify.py): equivalent answer forms, wrong answers,
garbage, the integer fast path, and the timeout guard off the main thread."""

import threading
import time

import pytest

from megarlhf.rewards import RewardFn
from megarlhf.rewards.helper_process import run_in_helper
from megarlhf.rewards.math_verify import MathVerifier, extract_integer_answer, verify_answer

EQUIVALENT = [  # (response, ground truth)
    ("7*3=21\n12+21=33\nanswer: 33", "33"),
    ("answer: 0.5", "1/2"),
    ("answer: 1/2", "0.5"),
    ("so the result is $\\frac{1}{2}$", "0.5"),
    ("\\boxed{3}", "3"),
    ("Thus \\boxed{3}.", 3),
    ("\\boxed{\\frac{2}{4}}", "\\frac{1}{2}"),
    ("answer: -6", "-6"),
    ("answer: 33.", "33"),
    ("The answer is $\\sqrt{4}$", "2"),
]
WRONG = [
    ("answer: 34", "33"),
    ("answer: 0.4", "1/2"),
    ("\\boxed{4}", "3"),
    ("answer: 33\nanswer: 34", "33"),  # the last stated answer counts
    ("answer: -33", "33"),
]
GARBAGE = [("", "3"), ("asdf qwer", "3"), ("answer: x", "3"), ("}}}{{\\boxed{", "3"),
           ("\x00\x01", "1/2")]


def all_cases():
    cases = EQUIVALENT + WRONG + GARBAGE
    expected = [1.0] * len(EQUIVALENT) + [0.0] * (len(WRONG) + len(GARBAGE))
    return [None] * len(cases), [c[0] for c in cases], [{"answer": c[1]} for c in cases], expected


def test_equivalent_forms_wrong_answers_and_garbage():
    """If this fails, correct answers in another form score 0, or wrong/garbage answers score 1
    (the policy would be trained on a wrong reward)."""
    prompts, responses, meta, expected = all_cases()
    v = MathVerifier()
    assert isinstance(v, RewardFn)
    assert v(prompts, responses, meta) == expected
    v2 = MathVerifier(correct_reward=1.0, incorrect_reward=-1.0)
    assert v2(prompts[:2], ["answer: 33", "answer: 1"], [{"answer": "33"}, {"answer": "2"}]) == \
        [1.0, -1.0]


def test_integer_fast_path():
    """If this fails, the demo's integer answers go through sympy (slow) or are misread."""
    assert extract_integer_answer("7*3=21\nanswer: 33") == 33
    assert extract_integer_answer("answer: -4") == -4
    assert extract_integer_answer("answer: 1/2") is None
    assert extract_integer_answer("\\boxed{12} then answer: 13") == 13
    assert extract_integer_answer("answer: 13 then \\boxed{12}") == 12
    assert extract_integer_answer("no marker 12") is None
    t0 = time.perf_counter()
    for _ in range(2000):
        assert verify_answer("answer: 33", "33")
    assert time.perf_counter() - t0 < 1.0


def test_missing_ground_truth_is_an_error():
    """If this fails, prompts without an answer silently get reward 0 instead of an error."""
    with pytest.raises(ValueError, match="no 'answer'"):
        MathVerifier()([None], ["answer: 1"], [{}])
    with pytest.raises(ValueError, match="equal lengths"):
        MathVerifier()([None], ["a", "b"], [{}, {}])


def test_off_main_thread_and_isolated_give_the_same_results():
    """If this fails, the verifier breaks (math-verify's signal timeouts) or disagrees when
    called from a worker thread, or in the isolated helper process."""
    prompts, responses, meta, expected = all_cases()
    out = {}

    def work():
        out["r"] = MathVerifier()(prompts, responses, meta)

    t = threading.Thread(target=work)
    t.start()
    t.join(60)
    assert out["r"] == expected
    assert MathVerifier(isolate=True)(prompts, responses, meta) == expected


def test_helper_process_timeout_kills_and_recovers():
    """If this fails, a hanging verification stalls training instead of being killed after its
    time limit, or the helper does not come back for the next call."""
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="killed"):
        run_in_helper("time.sleep", [60], 1.0)
    assert time.monotonic() - t0 < 10
    assert run_in_helper("math.gcd", [12, 18], 10) == 6
    with pytest.raises(RuntimeError, match="ValueError"):
        run_in_helper("math.sqrt", [-1], 10)
