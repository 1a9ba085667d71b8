"""Built-in environments: ``calculator`` (an arithmetic tool), ``python`` (code in the sandbox
of :mod:`megarlhf.rewards.code_sandbox` as a tool) and ``guess`` (a multi-turn game without
tools).

Tool calls are written in the assistant message as ``<tool>NAME: ARGUMENT</tool>`` (``NAME`` is
``calc`` or ``python``); the environment answers with a ``tool`` message ``<result>...</result>``
and the model continues. A message without a call is the final answer: ``answer: X`` (or the
last number of the message) is compared with the row's ``answer``. A malformed call (an
unknown tool, an unclosed tag, a bad expression) is answered with an ``<error>`` observation and
counted (``info.tool_errors``), never raised.
"""

from __future__ import annotations

import re
import textwrap
from typing import Any

from megarlhf.agents.calc import CalcError, evaluate
from megarlhf.agents.env import Environment, StepResult
from megarlhf.rewards.code_sandbox import SandboxLimits, run_case

CALL = re.compile(r"<tool>\s*([A-Za-z_]+)\s*:(.*?)</tool>", re.S)
_ANSWER = re.compile(r"answer\s*[:=]\s*(-?\d+(?:\.\d+)?)", re.I)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def final_answer(text: str) -> str | None:
    """``answer: X`` in ``text``, else its last number, else None."""
    m = _ANSWER.search(text)
    if m:
        return m.group(1)
    nums = _NUMBER.findall(text)
    return nums[-1] if nums else None


def same_number(a: Any, b: Any) -> bool:
    try:
        return abs(float(a) - float(b)) <= 1e-6 * max(1.0, abs(float(b)))
    except (TypeError, ValueError):
        return False


class _ToolEnv(Environment):
    """Shared by the tool environments: parse a call, run it, or grade the final answer."""

    tool = ""

    def __init__(self, correct_reward: float = 1.0, wrong_reward: float = 0.0,
                 tool_error_reward: float = 0.0):
        self.correct_reward, self.wrong_reward = float(correct_reward), float(wrong_reward)
        self.tool_error_reward = float(tool_error_reward)
        self.answer: Any = None
        self.calls = self.errors = 0

    def reset(self, row: dict[str, Any]) -> list[dict[str, str]]:
        self.answer = row.get("answer")
        return []

    def run(self, argument: str) -> str:
        raise NotImplementedError

    def _info(self) -> dict[str, Any]:
        return {"tool_calls": self.calls, "tool_errors": self.errors}

    def step(self, assistant_text: str) -> StepResult:
        calls = CALL.findall(assistant_text)
        opened = assistant_text.count("<tool>")
        if calls or opened:
            self.calls += 1
            if len(calls) != 1 or opened != 1:
                return self._error("write exactly one <tool>NAME: ARGUMENT</tool> per message")
            name, argument = calls[0][0].strip(), calls[0][1]
            if name != self.tool:
                return self._error(f"unknown tool {name!r}; the tool is {self.tool!r}")
            try:
                out = self.run(argument)
            except (CalcError, ValueError) as e:
                return self._error(str(e))
            return StepResult([{"role": "tool", "content": f"<result>{out}</result>"}],
                              info=self._info())
        got = final_answer(assistant_text)
        ok = got is not None and same_number(got, self.answer)
        return StepResult(reward=self.correct_reward if ok else self.wrong_reward, done=True,
                          info=dict(self._info(), correct=float(ok)))

    def _error(self, message: str) -> StepResult:
        self.errors += 1
        return StepResult([{"role": "tool", "content": f"<error>{message}</error>"}],
                          reward=self.tool_error_reward, info=self._info())


class CalculatorEnv(_ToolEnv):
    """``<tool>calc: 12*(7+3)</tool>`` -> ``<result>120</result>`` (:func:`~megarlhf.agents.
    calc.evaluate`: numbers, + - * / // % ** and parentheses, bounded)."""

    tool = "calc"

    def run(self, argument: str) -> str:
        return str(evaluate(argument))


class PythonEnv(_ToolEnv):
    """``<tool>python: print(2**10)</tool>`` -> the program's stdout, run in the code sandbox
    (its time, memory and output limits; :mod:`megarlhf.rewards.code_sandbox`)."""

    tool = "python"

    def __init__(self, timeout_s: float = 5.0, memory_mb: int = 256, **kw):
        super().__init__(**kw)
        self.limits = SandboxLimits(timeout_s=float(timeout_s), memory_mb=int(memory_mb))

    def run(self, argument: str) -> str:
        code = textwrap.dedent(argument).strip()
        res = run_case(code, "", self.limits)  # no test: run the program
        if res.status != "pass":
            last = (res.stderr.strip().splitlines() or [""])[-1][:200]
            raise ValueError(f"the program ended with {res.status}: {last}")
        return res.stdout.strip()[:500]


class GuessEnv(Environment):
    """Guess the row's ``answer`` (an integer); each wrong guess is answered ``higher`` or
    ``lower``. Reward 1 for a right guess, less with every turn it took
    (``1 - penalty * (turns - 1)``, at least 0); a message without a number ends the episode
    with 0."""

    def __init__(self, penalty: float = 0.1):
        self.penalty = float(penalty)
        self.secret = 0
        self.turns = 0

    def reset(self, row: dict[str, Any]) -> list[dict[str, str]]:
        self.secret = int(float(row["answer"]))
        self.turns = 0
        return []

    def step(self, assistant_text: str) -> StepResult:
        self.turns += 1
        got = final_answer(assistant_text)
        if got is None:
            return StepResult(reward=0.0, done=True, info={"turns": self.turns})
        n = float(got)
        if n == self.secret:
            return StepResult(reward=max(0.0, 1.0 - self.penalty * (self.turns - 1)), done=True,
                              info={"turns": self.turns})
        hint = "higher" if n < self.secret else "lower"
        return StepResult([{"role": "user", "content": hint}], info={"turns": self.turns})
