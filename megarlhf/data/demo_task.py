"""The CPU demo's task: integer arithmetic with a step-by-step solution, generated on the fly.

A problem is an expression and ``=``; its solution reduces one operation per step (``*`` first,
then ``+``/``-``, left to right) and ends with the answer::

    prompt    "12+7*3="
    solution  "7*3=21\\n12+21=33\\nanswer: 33"      steps split by the step delimiter ("\\n")

Everything is a function of a seed. Train and held-out problems are disjoint: a problem's split
is decided by a hash of its prompt text, so it does not depend on the seed or on the order of
generation. Texts stay short (a 3-operand problem with 2-digit numbers and its solution is
about 40 characters), for tiny models with sequences of at most 64 tokens.

:func:`write_demo_data` writes the task in the formats of :mod:`megarlhf.data.datasets`
(prompts, SFT pairs, preference pairs, labelled responses with step labels), so the demo runs
through the real loaders.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

from megarlhf.data.datasets import write_jsonl, write_parquet

Split = Literal["train", "heldout"]


@dataclass(frozen=True)
class ArithmeticConfig:
    """The difficulty and text format of the task.

    Attributes:
        min_operands: fewest numbers in a problem (>= 2).
        max_operands: most numbers in a problem.
        min_value: smallest operand (>= 0).
        max_value: largest operand (the digit range: 9 for one digit, 99 for two).
        operators: the operators to draw from, a subset of "+-*".
        heldout_fraction: share of all problems (by prompt hash) in the held-out split.
        step_delimiter: separates solution steps (the PRM's step boundary).
        answer_prefix: starts the final step; :meth:`ArithmeticTask.extract_answer` looks for it.
    """

    min_operands: int = 2
    max_operands: int = 3
    min_value: int = 0
    max_value: int = 9
    operators: str = "+-*"
    heldout_fraction: float = 0.2
    step_delimiter: str = "\n"
    answer_prefix: str = "answer: "

    def __post_init__(self):
        if not 2 <= self.min_operands <= self.max_operands:
            raise ValueError(f"demo task: need 2 <= min_operands <= max_operands, got "
                             f"{self.min_operands}, {self.max_operands}")
        if not 0 <= self.min_value <= self.max_value:
            raise ValueError(f"demo task: need 0 <= min_value <= max_value, got "
                             f"{self.min_value}, {self.max_value}")
        if not self.operators or set(self.operators) - set("+-*"):
            raise ValueError(f"demo task: operators must be a non-empty subset of '+-*', got "
                             f"{self.operators!r}")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"demo task: heldout_fraction must be in (0, 1), got "
                             f"{self.heldout_fraction}")
        if not self.step_delimiter or not self.answer_prefix.strip():
            raise ValueError("demo task: step_delimiter and answer_prefix must be non-empty")
        if self.step_delimiter in self.answer_prefix:
            raise ValueError("demo task: answer_prefix must not contain the step delimiter")


@dataclass(frozen=True)
class ArithmeticProblem:
    """One problem with its reference solution.

    Attributes:
        prompt: the expression and "=", e.g. "12+7*3=".
        answer: the integer value.
        steps: the solution steps, the last one "answer: 33".
        solution: the steps joined by the step delimiter.
    """

    prompt: str
    answer: int
    steps: tuple[str, ...]
    solution: str


class ArithmeticTask:
    """Problem generation, splits, solutions and answer checking for one config."""

    def __init__(self, config: ArithmeticConfig | None = None):
        self.config = config or ArithmeticConfig()
        prefix = re.escape(self.config.answer_prefix.strip())
        self._answer_re = re.compile(prefix + r"\s*(-?\d+)")

    # -- splits ---------------------------------------------------------------------------

    def split_of(self, prompt: str) -> Split:
        """"heldout" for a fixed ``heldout_fraction`` of all prompts (by SHA-256), else "train"."""
        h = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big")
        return "heldout" if h / 2**64 < self.config.heldout_fraction else "train"

    # -- problems --------------------------------------------------------------------------

    def make_problem(self, operands: list[int], operators: list[str]) -> ArithmeticProblem:
        """The problem ``operands[0] operators[0] operands[1] ...`` with its solution."""
        if len(operators) != len(operands) - 1:
            raise ValueError("need exactly one operator fewer than operands")
        prompt = "".join(f"{a}{op}" for a, op in zip(operands, operators)) + f"{operands[-1]}="
        steps, answer = self._solve(operands, operators)
        return ArithmeticProblem(prompt, answer, tuple(steps),
                                 self.config.step_delimiter.join(steps))

    def random_problem(self, rng: random.Random) -> ArithmeticProblem:
        c = self.config
        n = rng.randint(c.min_operands, c.max_operands)
        operands = [rng.randint(c.min_value, c.max_value) for _ in range(n)]
        operators = [rng.choice(c.operators) for _ in range(n - 1)]
        return self.make_problem(operands, operators)

    def stream(self, split: Split, seed: int) -> Iterator[ArithmeticProblem]:
        """An endless, deterministic stream of problems of one split (repeats possible)."""
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        rng = random.Random(f"megarlhf-arith:{split}:{seed}")
        while True:
            p = self.random_problem(rng)
            if self.split_of(p.prompt) == split:
                yield p

    def problems(self, split: Split, n: int, seed: int = 0,
                 unique: bool = True) -> list[ArithmeticProblem]:
        """``n`` problems of one split, deterministic in ``seed``; distinct when ``unique``.

        Raises:
            ValueError: the config has too few distinct problems in this split for ``n``.
        """
        out, seen, tries = [], set(), 0
        budget = 200 * n + 10_000
        for p in self.stream(split, seed):
            tries += 1
            if tries > budget:
                raise ValueError(
                    f"demo task: found only {len(out)} distinct {split} problems after {budget} "
                    f"draws, {n} wanted; raise max_value/max_operands or ask for fewer"
                )
            if unique and p.prompt in seen:
                continue
            seen.add(p.prompt)
            out.append(p)
            if len(out) == n:
                return out
        raise AssertionError("unreachable")

    # -- solutions -------------------------------------------------------------------------

    def _solve(self, operands: list[int], operators: list[str],
               error_at: int | None = None, delta: int = 0) -> tuple[list[str], int]:
        """Reduce ``*`` then ``+``/``-``, left to right, one operation per step. With
        ``error_at=k`` the k-th operation's result is off by ``delta`` (later steps compute
        correctly from the wrong value)."""
        vals, ops = list(operands), list(operators)
        steps, k = [], 0
        while ops:
            i = ops.index("*") if "*" in ops else 0
            a, op, b = vals[i], ops[i], vals[i + 1]
            r = a * b if op == "*" else a + b if op == "+" else a - b
            if k == error_at:
                r += delta
            steps.append(f"{a}{op}{b}={r}")
            vals[i: i + 2] = [r]
            del ops[i]
            k += 1
        steps.append(f"{self.config.answer_prefix}{vals[0]}")
        return steps, vals[0]

    def corrupt(self, problem: ArithmeticProblem,
                rng: random.Random) -> tuple[str, tuple[float, ...], int]:
        """A wrong solution: one operation's result is off by 1 to 3, the steps after it follow
        from the wrong value (if that leaves the answer right, e.g. ``...*0``, the final answer
        alone is off instead).

        Returns:
            (solution text, step labels: 1.0 before the error and 0.0 from it on, wrong answer)
        """
        operands = [int(x) for x in re.findall(r"\d+", problem.prompt)]
        operators = re.findall(r"[+\-*]", problem.prompt)
        for _ in range(10):
            k = rng.randrange(len(operators))
            delta = rng.choice([-3, -2, -1, 1, 2, 3])
            steps, answer = self._solve(operands, operators, error_at=k, delta=delta)
            if answer != problem.answer:
                break
        else:  # the error was masked every time (e.g. "...*0"): get only the last step wrong
            k = len(operators)
            answer = problem.answer + rng.choice([-3, -2, -1, 1, 2, 3])
            steps = list(problem.steps[:-1]) + [f"{self.config.answer_prefix}{answer}"]
        labels = tuple(1.0 if i < k else 0.0 for i in range(len(steps)))
        return self.config.step_delimiter.join(steps), labels, answer

    # -- checking --------------------------------------------------------------------------

    def extract_answer(self, text: str) -> int | None:
        """The integer after the last ``answer:`` in ``text``, or None."""
        found = self._answer_re.findall(text)
        return int(found[-1]) if found else None

    def is_correct(self, response: str, answer: int) -> bool:
        return self.extract_answer(response) == answer


def write_demo_data(out_dir: str | Path, task: ArithmeticTask | None = None, seed: int = 0,
                    n_train: int = 2000, n_heldout: int = 200, n_pairs: int = 500,
                    n_labelled: int = 500, fmt: str = "jsonl") -> dict[str, Path]:
    """Write the demo task as data files that :mod:`megarlhf.data.datasets` loads.

    Files (``{name}.{fmt}``):

    * ``prompts_train`` / ``prompts_heldout`` — ``id, prompt, answer`` (``load_prompts``);
    * ``sft_train`` — ``id, prompt, response`` with the reference solution (``load_sft``);
    * ``pairs_train`` — ``id, prompt, chosen, rejected``: reference vs corrupted solution
      (``load_preference_pairs``);
    * ``labelled_train`` — ``id, prompt, response, label, step_labels``: half reference
      solutions (label 1, all steps 1.0), half corrupted (label 0, steps 0.0 from the error on)
      (``load_labelled_responses`` with the task's step delimiter).

    Returns:
        name -> path.
    """
    if fmt not in ("jsonl", "parquet"):
        raise ValueError(f"fmt must be 'jsonl' or 'parquet', got {fmt!r}")
    task = task or ArithmeticTask()
    write = write_jsonl if fmt == "jsonl" else write_parquet
    out_dir = Path(out_dir)
    train = task.problems("train", n_train, seed)
    heldout = task.problems("heldout", n_heldout, seed)
    rng = random.Random(f"megarlhf-arith-data:{seed}")
    files = {}

    def put(name: str, records: list[dict]):
        files[name] = write(out_dir / f"{name}.{fmt}", records)

    put("prompts_train", [{"id": f"train-{i}", "prompt": p.prompt, "answer": str(p.answer)}
                          for i, p in enumerate(train)])
    put("prompts_heldout", [{"id": f"heldout-{i}", "prompt": p.prompt, "answer": str(p.answer)}
                            for i, p in enumerate(heldout)])
    put("sft_train", [{"id": f"sft-{i}", "prompt": p.prompt, "response": p.solution}
                      for i, p in enumerate(train)])
    pairs = []
    for i in range(n_pairs):
        p = train[i % len(train)]
        wrong, _, _ = task.corrupt(p, rng)
        pairs.append({"id": f"pair-{i}", "prompt": p.prompt, "chosen": p.solution,
                      "rejected": wrong})
    put("pairs_train", pairs)
    labelled = []
    for i in range(n_labelled):
        p = train[i % len(train)]
        if i % 2 == 0:
            labelled.append({"id": f"lab-{i}", "prompt": p.prompt, "response": p.solution,
                             "label": 1, "step_labels": [1.0] * len(p.steps)})
        else:
            wrong, labels, _ = task.corrupt(p, rng)
            labelled.append({"id": f"lab-{i}", "prompt": p.prompt, "response": wrong,
                             "label": 0, "step_labels": list(labels)})
    put("labelled_train", labelled)
    return files
