"""Math answer verification: a fast exact-integer path, then the ``math-verify`` library.

``MathVerifier`` is a :class:`~megarlhf.rewards.base.RewardFn`: 1.0 when a response's final
answer equals the row's ground truth (``metadata["answer"]``), else 0.0.

1. Fast path (the CPU demo, and any integer ground truth): when the ground truth is an integer
   and the response states its answer explicitly as an integer (``answer: 33`` or
   ``\\boxed{33}``, the last one counts), compare the integers; no sympy.
2. Otherwise ``math_verify.parse`` extracts the answer (LaTeX, ``\\boxed{}``, plain
   expressions) from both texts and ``math_verify.verify(gold, answer)`` compares them
   symbolically, so ``0.5`` equals ``1/2`` and ``\\frac{1}{2}``.

Timeout guard: sympy can hang on adversarial input. math-verify bounds each parse/compare with
``signal.alarm``, which works only in the main thread. Called from another thread (a Ray actor's
thread pool, a rollout callback), the verification runs in a helper process instead, killed and
counted as wrong when it outlives its limit (:mod:`megarlhf.rewards.helper_process`); with
``isolate=True`` every non-integer verification goes there.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import threading
from typing import Any, Mapping, Sequence

from megarlhf.rewards.base import check_batch
from megarlhf.rewards.helper_process import run_in_helper

log = logging.getLogger(__name__)

_INT_RE = re.compile(r"\s*([-+]?\d+)\s*")
_BOXED_INT_RE = re.compile(r"\\boxed\{\s*([-+]?\d+)\s*\}")


def stated_answer(text: str, answer_prefix: str = "answer:", *, rest_of_line: bool = False
                  ) -> str | None:
    """The raw text of the answer a response states last: after its last ``answer_prefix`` (the
    next word, or with ``rest_of_line`` the rest of that line) or in its last ``\\boxed{}``,
    whichever comes later; None when it states none."""
    prefix = re.escape(answer_prefix.strip())
    best_pos, best = -1, None
    for m in re.finditer(prefix + (r"[ \t]*([^\n]*)" if rest_of_line else r"[ \t]*(\S+)"), text):
        best_pos, best = m.start(), m.group(1)
    for m in re.finditer(r"\\boxed\{([^{}]*)\}", text):
        if m.start() > best_pos:
            best_pos, best = m.start(), m.group(1)
    return best


def extract_integer_answer(text: str, answer_prefix: str = "answer:") -> int | None:
    """The integer a response states as its answer (the last ``answer: N`` or ``\\boxed{N}``),
    or None when it states none, or states a non-integer."""
    best = stated_answer(text, answer_prefix)
    if best is None:
        return None
    m = _INT_RE.fullmatch(best.rstrip(".,;$"))
    return int(m.group(1)) if m else None


def _gold_integer(gold: Any) -> int | None:
    if isinstance(gold, bool):
        return None
    if isinstance(gold, int):
        return gold
    if isinstance(gold, float) and gold.is_integer():
        return int(gold)
    if isinstance(gold, str):
        m = _INT_RE.fullmatch(gold) or _BOXED_INT_RE.fullmatch(gold.strip())
        if m:
            return int(m.group(1))
    return None


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str, timeout_s: int):
    from math_verify import parse

    return parse(gold, parsing_timeout=timeout_s)


def _verify_main_thread(response: str, gold: str, timeout_s: int) -> bool:
    """math-verify with its own signal-based timeouts (main thread only)."""
    from math_verify import parse, verify

    g = _parse_gold(gold, timeout_s)
    if not g:
        log.warning("math verifier: cannot parse the ground truth %r; scoring as wrong", gold)
        return False
    a = parse(response, parsing_timeout=timeout_s)
    if not a:
        return False
    return bool(verify(g, a, timeout_seconds=timeout_s))


def verify_answer(response: str, gold: Any, timeout_s: float = 5.0,
                  answer_prefix: str = "answer:", isolate: bool = False) -> bool:
    """Whether ``response``'s final answer equals ``gold`` (see the module docstring).

    Args:
        timeout_s: the most seconds for one parse or comparison.
        isolate: always run math-verify in the helper process (a hard wall-time limit even
            against C-level hangs), not only off the main thread.
    """
    g = _gold_integer(gold)
    if g is not None:
        a = extract_integer_answer(response, answer_prefix)
        if a is not None:
            return a == g
    gold_text = str(gold)
    t = max(1, math.ceil(timeout_s))
    if not isolate and threading.current_thread() is threading.main_thread():
        return _verify_main_thread(response, gold_text, t)
    try:
        # The helper runs it in its own main thread, with math-verify's timeouts; the outer
        # limit catches what those miss (3 steps: parse gold, parse answer, compare; and the
        # helper's first start, which imports sympy).
        return bool(run_in_helper(f"{__name__}._verify_main_thread", [response, gold_text, t],
                                  3 * t + 10))
    except TimeoutError:
        log.warning("math verifier: timed out on a response of %d chars; scoring as wrong",
                    len(response))
        return False


class MathVerifier:
    """Reward 1.0 for a correct final answer, 0.0 otherwise (a :class:`RewardFn`).

    Args:
        answer_key: the metadata key holding the ground truth.
        timeout_s: the most seconds for one parse or comparison.
        correct_reward / incorrect_reward: the two reward values.
        answer_prefix: marks an explicit answer line (``answer: 33``).
        isolate: run math-verify in the helper process even in the main thread.
    """

    def __init__(self, answer_key: str = "answer", timeout_s: float = 5.0,
                 correct_reward: float = 1.0, incorrect_reward: float = 0.0,
                 answer_prefix: str = "answer:", isolate: bool = False):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.answer_key, self.timeout_s = answer_key, timeout_s
        self.correct_reward, self.incorrect_reward = float(correct_reward), float(incorrect_reward)
        self.answer_prefix = answer_prefix
        self.isolate = isolate

    def is_correct(self, response: str, gold: Any) -> bool:
        return verify_answer(response, gold, self.timeout_s, self.answer_prefix, self.isolate)

    def __call__(self, prompts: Sequence[Any], responses: Sequence[str],
                 metadata: Sequence[Mapping[str, Any]] | None = None) -> list[float]:
        metadata = check_batch(prompts, responses, metadata)
        out = []
        for i, (r, m) in enumerate(zip(responses, metadata)):
            gold = m.get(self.answer_key)
            if gold is None:
                raise ValueError(f"math verifier: sample {i} has no '{self.answer_key}' in its "
                                 f"metadata; the prompt rows need a ground-truth answer")
            out.append(self.correct_reward if self.is_correct(r, gold) else self.incorrect_reward)
        return out
