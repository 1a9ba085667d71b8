"""How a conversation becomes tokens exactly as a model generated and saw it: the layout of
multi-turn agent trajectories (:mod:`megarlhf.agents`) and of multi-turn SFT rows.

A conversation is the prompt's ids, then each assistant message's tokens (as generated; for
SFT data, its text tokenized and the stop token), then the tokens the chat template appends for
the following non-assistant messages. Those are found from text the template renders, never by
re-tokenizing earlier turns: with ``P`` the conversation so far rendered up to the model's turn
(``add_generation_prompt``), ``C`` the assistant's text and ``F`` the conversation with the
assistant message ``C`` and the next messages (again up to the next turn)::

    F = P + C + S        (the template must extend what it rendered before: checked)

and the appended tokens are ``encode(S)`` (a closing stop token's text, already generated, is
not repeated). The loss covers the assistant tokens only.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence


class TemplateError(ValueError):
    """The chat template rewrites what it rendered before (it is not prefix-stable), so the
    observation tokens cannot be appended without re-tokenizing earlier turns."""


class _Turns:
    """The minimal state :meth:`TokenAssembler.add_turn` / ``observation_ids`` keep."""

    def __init__(self, messages):
        self.messages = [dict(m) for m in messages]
        self.ids: list[int] = []
        self.generated: list[int] = []
        self.logprobs: list[float] = []
        self.turns = 0
        self.last_turn: list[int] = []
        self.observation_tokens = 0


class TokenAssembler:
    """Appends turns to trajectories token-exactly (module docstring).

    Args:
        render: ``render(messages, add_generation_prompt) -> str``, the chat template.
        encode: text -> ids, without BOS.
        decode: ids -> text (special tokens skipped).
        token_text: one id -> its text as the template writes it (special tokens kept).
        stop_ids: the engine's stop tokens (the end of an assistant turn).
        encode_prompt: messages -> the prompt's ids (BOS and generation prompt included), for
            a prompt an environment extended before the first turn.
    """

    def __init__(self, render: Callable[[Sequence[dict], bool], str],
                 encode: Callable[[str], list[int]], decode: Callable[[Sequence[int]], str],
                 token_text: Callable[[int], str], stop_ids: Sequence[int],
                 encode_prompt: Callable[[Sequence[dict]], list[int]] | None = None):
        self.render, self.encode, self.decode = render, encode, decode
        self.token_text, self.stop_ids = token_text, set(int(t) for t in stop_ids)
        self._encode_prompt = encode_prompt

    def encode_prompt(self, messages: Sequence[dict]) -> list[int]:
        if self._encode_prompt is None:
            raise TemplateError("this assembler cannot encode prompts (no encode_prompt)")
        return list(self._encode_prompt(messages))

    def content(self, gen_ids: Sequence[int]) -> str:
        """The assistant message's text of a turn (a closing stop token excluded)."""
        ids = list(gen_ids)
        if ids and ids[-1] in self.stop_ids:
            ids = ids[:-1]
        return self.decode(ids)

    def add_turn(self, t: Trajectory, gen_ids: Sequence[int],
                 logprobs: Sequence[float] | None) -> str:
        """Appends one generated turn; returns its text (what the environment sees)."""
        text = self.content(gen_ids)
        t.ids.extend(int(x) for x in gen_ids)
        t.generated.extend([1] * len(gen_ids))
        t.logprobs.extend(float(x) for x in (logprobs if logprobs is not None
                                             else [0.0] * len(gen_ids)))
        t.messages.append({"role": "assistant", "content": text})
        t.turns += 1
        t.last_turn = list(gen_ids)  # for the observation's stop-token rule
        return text

    def observation_ids(self, t: Trajectory, observations: Sequence[dict[str, str]]
                        ) -> list[int]:
        """The tokens the template appends for ``observations`` after the last turn (the end
        of the assistant turn, the observations, the start of the next assistant turn).

        Raises:
            TemplateError: the template does not extend its earlier rendering.
        """
        before = self.render(t.messages[:-1], True) + t.messages[-1]["content"]
        after = self.render(t.messages + list(observations), True)
        if not after.startswith(before):
            at = next((i for i, (a, b) in enumerate(zip(after, before)) if a != b),
                      min(len(after), len(before)))
            raise TemplateError(
                "the chat template renders the conversation with the new messages differently "
                f"from what it rendered before (they differ at character {at}: "
                f"{before[at:at + 40]!r} became {after[at:at + 40]!r}); an agent's trajectory "
                "needs a template that only appends (one that does not rewrite earlier "
                "assistant messages, e.g. by dropping their reasoning)")
        suffix = after[len(before):]
        last = t.last_turn
        if last and last[-1] in self.stop_ids:
            stop = self.token_text(last[-1])
            if stop and suffix.startswith(stop):
                suffix = suffix[len(stop):]  # generated already
        return self.encode(suffix) if suffix else []

    def add_observations(self, t: Trajectory, observations: Sequence[dict[str, str]],
                         ids: Sequence[int]) -> None:
        t.ids.extend(int(x) for x in ids)
        t.generated.extend([0] * len(ids))
        t.logprobs.extend([0.0] * len(ids))
        t.observation_tokens += len(ids)
        t.messages.extend(dict(m) for m in observations)


def check_template(assembler: TokenAssembler) -> None:
    """A probe conversation through the template (user, assistant, tool, assistant, user):
    raises :class:`TemplateError` before any trajectory runs when the template is not
    prefix-stable or cannot render a tool's message."""
    t = _Turns([{"role": "user", "content": "1+1?"}])
    t.messages.append({"role": "assistant", "content": "<tool>calc: 1+1</tool>"})
    assembler.observation_ids(t, [{"role": "tool", "content": "<result>2</result>"}])
    t.messages.append({"role": "tool", "content": "<result>2</result>"})
    t.messages.append({"role": "assistant", "content": "answer: 2"})
    assembler.observation_ids(t, [{"role": "user", "content": "sure?"}])


def assembler_for(tokenizer, stop_ids: Sequence[int],
                  tools: Sequence[dict] | None = None) -> TokenAssembler:
    """The :class:`TokenAssembler` of a megarlhf tokenizer (:mod:`megarlhf.data.tokenizer`):
    its chat template renders (describing ``tools``, OpenAI function schemas, in every
    rendering), its ``encode`` (no BOS) tokenizes the appended text, and a prompt is tokenized
    as every prompt is (``apply_chat_template``)."""
    tools = list(tools) if tools else None

    def render(messages, gen):
        try:
            return tokenizer.render_chat(list(messages), gen, tools)
        except Exception as e:  # noqa: BLE001 - jinja's own errors: named, never swallowed
            roles = sorted({m["role"] for m in messages})
            raise TemplateError(f"the tokenizer's chat template cannot render messages of "
                                f"roles {roles}{' with tools' if tools else ''}: "
                                f"{type(e).__name__}: {e}") from e

    def encode_prompt(messages):
        try:
            return tokenizer.apply_chat_template(list(messages), True, tools)
        except Exception as e:  # noqa: BLE001 - as above
            raise TemplateError(f"the tokenizer's chat template cannot render the prompt"
                                f"{' with tools' if tools else ''}: {type(e).__name__}: {e}"
                                ) from e

    return TokenAssembler(
        render=render,
        encode=lambda text: tokenizer.encode(text),
        # special tokens the model generated inside a turn (e.g. <tool_call> in some
        # families) stay in its text: the environment and the template see what was generated
        decode=lambda ids: tokenizer.decode(list(ids), skip_special_tokens=False),
        token_text=lambda i: tokenizer.decode([int(i)], skip_special_tokens=False),
        stop_ids=stop_ids,
        encode_prompt=encode_prompt)


def conversation_sample(assembler: TokenAssembler, messages: Sequence[dict[str, str]],
                        eos_id: int) -> tuple[list[int], list[int]]:
    """A whole conversation (ending with an assistant message) as ``(ids, loss_mask)``, laid
    out as an agent's trajectory: each assistant message is its text tokenized plus
    ``eos_id`` (loss 1), everything else the template's tokens (loss 0).

    Raises:
        ValueError: no assistant message, or it is not the last one.
        TemplateError: the template is not prefix-stable.
    """
    msgs = [dict(m) for m in messages]
    first = next((k for k, m in enumerate(msgs) if m["role"] == "assistant"), None)
    if first is None or msgs[-1]["role"] != "assistant":
        raise ValueError("a multi-turn SFT conversation needs assistant messages and must end "
                         "with one")
    t = _Turns(msgs[:first])
    prompt = assembler.encode_prompt(t.messages)
    k = first
    while k < len(msgs):
        m = msgs[k]
        assembler.add_turn(t, assembler.encode(m["content"]) + [int(eos_id)], None)
        k += 1
        obs = []
        while k < len(msgs) and msgs[k]["role"] != "assistant":
            obs.append(msgs[k])
            k += 1
        if obs:
            assembler.add_observations(t, obs, assembler.observation_ids(t, obs))
    return prompt + t.ids, [0] * len(prompt) + t.generated
