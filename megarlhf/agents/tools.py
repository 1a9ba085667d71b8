"""Tool calls in a model family's own format, parsed by vLLM's tool parsers
(``vllm/tool_parsers``: ``hermes`` for Qwen2.5/Qwen3 and Hermes, ``llama3_json``, ``mistral``,
``deepseek_v3``, ``kimi_k2``, ...), and the ``tools`` environment that runs Python functions
as tools.

The ``tools`` environment (``rollout.agent.env: tools``)::

    rollout:
      agent:
        env: tools
        options:
          tool_parser: hermes                       # vLLM's parser for the model's format
          tokenizer: /ckpt/qwen3-8b-sft              # the policy's HF tokenizer directory
          tools: {calc: megarlhf.agents.calc:evaluate}   # name -> module:function

Each assistant message is parsed; every call runs the named function with the call's JSON
arguments as keyword arguments and is answered with a ``tool`` message holding its JSON result
(or ``{"error": ...}``: an unknown tool, bad arguments, an exception). A message that starts a
call the parser cannot read is answered with an error message and counted
(``info.tool_errors``). A message without calls is the final answer, compared with the row's
``answer`` (numbers numerically, else as stripped text). The functions' schemas (from their
signatures and docstrings) are rendered into every prompt by the chat template's ``tools``.
"""

from __future__ import annotations

import importlib
import inspect
import json
from dataclasses import dataclass
from typing import Any, Callable

from megarlhf.agents.builtins import final_answer, same_number
from megarlhf.agents.env import EnvError, Environment, StepResult


@dataclass(frozen=True)
class ParsedCalls:
    """What a parser found in one assistant message: the calls ``(name, arguments)``, the
    text outside them, and an error when a call was started but could not be read."""

    calls: tuple[tuple[str, dict[str, Any]], ...]
    content: str
    error: str | None = None


class VLLMToolCallParser:
    """vLLM's tool-call parser ``name`` over the tokenizer in ``tokenizer_dir``.

    Raises:
        EnvError: vLLM has no parser of that name, or the tokenizer cannot be loaded.
    """

    def __init__(self, name: str, tokenizer_dir: str):
        from transformers import AutoTokenizer
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.tool_parsers import ToolParserManager

        try:
            cls = ToolParserManager.get_tool_parser(name)
        except KeyError:
            raise EnvError(f"rollout.agent.options.tool_parser = {name!r}: vLLM has no tool "
                           f"parser of that name (vllm/tool_parsers)") from None
        try:
            tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        except (OSError, ValueError) as e:
            raise EnvError(f"rollout.agent.options.tokenizer = {tokenizer_dir!r}: not a "
                           f"Hugging Face tokenizer directory ({e})") from None
        self.name = name
        self.parser = cls(tok)
        # The calls' text, not the request, is what the parsers read; a request carries the
        # options they consult (no tools: nothing is constrained).
        self.request = ChatCompletionRequest(model="megarlhf",
                                             messages=[{"role": "user", "content": "."}])
        self.start = getattr(cls, "tool_call_start_token", None)

    def parse(self, text: str) -> ParsedCalls:
        info = self.parser.extract_tool_calls(text, self.request)
        if not info.tools_called:
            if self.start and self.start in text:  # a call the parser could not read
                return ParsedCalls((), text, f"the {self.name} parser could not read the "
                                             "tool call (malformed JSON or tags)")
            return ParsedCalls((), info.content or "")
        calls = []
        for tc in info.tool_calls:
            try:
                args = json.loads(tc.function.arguments or "{}")
            except json.JSONDecodeError as e:
                return ParsedCalls((), text, f"arguments of {tc.function.name!r} are not JSON "
                                             f"({e})")
            if not isinstance(args, dict):
                return ParsedCalls((), text, f"arguments of {tc.function.name!r} must be a "
                                             "JSON object")
            calls.append((tc.function.name, args))
        return ParsedCalls(tuple(calls), info.content or "")


def _function(spec: str) -> Callable[..., Any]:
    mod, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise EnvError(f"rollout.agent.options.tools: {spec!r} is not an importable "
                       f"module:function ({e})") from None
    if not callable(fn):
        raise EnvError(f"rollout.agent.options.tools: {spec!r} is not callable")
    return fn


_JSON_TYPES = {int: "integer", float: "number", bool: "boolean", str: "string",
               "int": "integer", "float": "number", "bool": "boolean", "str": "string"}


def function_schema(name: str, fn: Callable[..., Any]) -> dict[str, Any]:
    """The OpenAI function schema of ``fn`` under ``name``."""
    sig = inspect.signature(fn)
    props, required = {}, []
    for p in sig.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        props[p.name] = {"type": _JSON_TYPES.get(p.annotation, "string")}
        if p.default is p.empty:
            required.append(p.name)
    doc = (inspect.getdoc(fn) or "").strip().split("\n\n")[0].replace("\n", " ")
    return {"type": "function",
            "function": {"name": name, "description": doc,
                         "parameters": {"type": "object", "properties": props,
                                        "required": required}}}


class FunctionToolsEnv(Environment):
    """Python functions as tools, calls parsed by vLLM (module docstring)."""

    def __init__(self, tools: dict[str, str], tokenizer: str, tool_parser: str = "hermes",
                 correct_reward: float = 1.0, wrong_reward: float = 0.0):
        if not isinstance(tools, dict) or not tools:
            raise EnvError("rollout.agent.options.tools: give {name: module:function, ...}")
        self.functions = {str(k): _function(v) for k, v in tools.items()}
        self.parser = VLLMToolCallParser(tool_parser, tokenizer)
        self.correct_reward, self.wrong_reward = float(correct_reward), float(wrong_reward)
        self.answer: Any = None
        self.calls = self.errors = 0

    def reset(self, row: dict[str, Any]) -> list[dict[str, str]]:
        self.answer = row.get("answer")
        return []

    def tools(self) -> list[dict[str, Any]]:
        """Each function's schema from its signature and docstring (parameters typed by their
        annotations: int, float, bool, else string)."""
        return [function_schema(name, fn) for name, fn in self.functions.items()]

    def _info(self) -> dict[str, Any]:
        return {"tool_calls": self.calls, "tool_errors": self.errors}

    def step(self, assistant_text: str) -> StepResult:
        parsed = self.parser.parse(assistant_text)
        if parsed.error is not None:
            self.calls += 1
            self.errors += 1
            return StepResult([{"role": "tool", "content": json.dumps({"error": parsed.error})}],
                              info=self._info())
        if not parsed.calls:
            got = final_answer(parsed.content)
            ok = (same_number(got, self.answer) if got is not None else False) or \
                parsed.content.strip() == str(self.answer).strip()
            return StepResult(reward=self.correct_reward if ok else self.wrong_reward,
                              done=True, info=dict(self._info(), correct=float(ok)))
        out = []
        for name, args in parsed.calls:
            self.calls += 1
            fn = self.functions.get(name)
            if fn is None:
                self.errors += 1
                result: Any = {"error": f"unknown tool {name!r}; tools: {sorted(self.functions)}"}
            else:
                try:
                    result = fn(**args)
                except Exception as e:  # noqa: BLE001 - the tool's failure is the model's answer
                    self.errors += 1
                    result = {"error": f"{type(e).__name__}: {e}"}
            out.append({"role": "tool", "content": json.dumps(result, default=str)})
        return StepResult(out, info=self._info())
