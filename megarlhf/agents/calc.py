"""A safe arithmetic evaluator for the ``calculator`` tool: Python's own parser, a whitelist of
node types, and bounds on every intermediate value (no ``eval``, no names, no calls).

>>> evaluate("12 * (7 + 3) - 4 / 2")
118
>>> evaluate("2 ** 100000")
Traceback (most recent call last):
  ...
megarlhf.agents.calc.CalcError: 2 ** 100000: the exponent must be an integer in [0, 64]
"""

from __future__ import annotations

import ast
import operator
from fractions import Fraction

MAX_LEN = 200  # characters of an expression
MAX_ABS = 10 ** 18  # bound on every intermediate value
MAX_EXPONENT = 64

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
           ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class CalcError(ValueError):
    """The expression is not plain arithmetic, or its value leaves the bounds; the message
    says which (it is shown to the model as the tool's answer)."""


def _value(node: ast.AST, text: str) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        if abs(node.value) > MAX_ABS:
            raise CalcError(f"{text}: a number is too large (|x| > 1e18)")
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_value(node.operand, text))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        a, b = _value(node.left, text), _value(node.right, text)
        op = type(node.op)
        if op in (ast.Div, ast.FloorDiv, ast.Mod) and b == 0:
            raise CalcError(f"{text}: division by zero")
        if op is ast.Pow:
            if b.denominator != 1 or not 0 <= b <= MAX_EXPONENT:
                raise CalcError(f"{text}: the exponent must be an integer in [0, {MAX_EXPONENT}]")
            if abs(a) > 1 and abs(a).numerator.bit_length() * int(b) > 64 * 2:
                raise CalcError(f"{text}: the result is too large")
            out = a ** int(b)
        else:
            out = _BINARY[op](a, b)
            if op is ast.FloorDiv:
                out = Fraction(out)
        if abs(out) > MAX_ABS:
            raise CalcError(f"{text}: the result is too large (|x| > 1e18)")
        return out
    raise CalcError(f"{text}: only numbers, + - * / // % ** and parentheses are allowed")


def evaluate(text: str) -> int | float:
    """The value of the arithmetic expression ``text``: an int when it is whole, else a float
    rounded to 10 significant digits.

    Raises:
        CalcError: anything but plain arithmetic within the bounds.
    """
    if not isinstance(text, str) or not text.strip():
        raise CalcError("empty expression")
    text = text.strip()
    if len(text) > MAX_LEN:
        raise CalcError(f"expression longer than {MAX_LEN} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise CalcError(f"{text}: not an arithmetic expression") from None
    value = _value(tree.body, text)
    if value.denominator == 1:
        return int(value)
    return float(f"{float(value):.10g}")
