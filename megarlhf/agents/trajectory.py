"""Token-exact trajectories: one token sequence per episode, never re-tokenized.

A trajectory is the prompt's ids, then each turn's tokens exactly as the engine generated them,
then the tokens the chat template appends for each observation::

    prompt ids | gen_1 (... <eos>) | obs_1 (template: end of turn, tool message, next turn's
    start) | gen_2 ... | gen_k

The observation tokens are found from text the template renders, never from re-tokenizing
earlier turns: with ``P`` the conversation so far rendered up to the model's turn
(``add_generation_prompt``), ``C`` the generated text and ``F`` the conversation with the
assistant message ``C`` and the observations (again up to the next turn)::

    F = P + C + S        (the template must extend what it rendered before: checked)

and the observation tokens are ``encode(S)`` (a closing stop token's text, already generated,
is not repeated). What is trained is exactly this sequence; the loss mask covers the generated
tokens only, and only they carry the engine's log-probs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence


class TemplateError(ValueError):
    """The chat template rewrites what it rendered before (it is not prefix-stable), so the
    observation tokens cannot be appended without re-tokenizing earlier turns."""


@dataclass
class Trajectory:
    """One episode.

    Attributes:
        prompt_ids: the prompt's token ids (chat template applied).
        messages: the conversation so far (prompt, assistant messages, observations).
        ids: every token after the prompt, generated and appended.
        generated: 1 for a generated token, 0 for an appended one (the loss mask).
        logprobs: the engine's log-prob of each generated token, 0.0 at appended tokens.
        reward: the sum of the environment's step rewards.
        turns: assistant messages generated.
        finish: "done" (the environment ended it), "max_turns", "max_tokens", "turn_length"
            (a turn reached its token limit without a stop token), "env_error", "env_timeout",
            "env_garbage" (the environment returned something invalid), "template".
        info: the environment's last ``info`` (numbers are averaged into metrics).
        env_seconds: wall time spent in the environment.
        observation_tokens: appended tokens.
    """

    prompt_ids: list[int]
    messages: list[dict[str, str]]
    ids: list[int] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    reward: float = 0.0
    turns: int = 0
    finish: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    env_seconds: float = 0.0
    observation_tokens: int = 0
    last_turn: list[int] = field(default_factory=list)  # the last generated turn's ids
    extended_prompt: bool = False  # the environment added opening messages to the prompt

    @property
    def context(self) -> list[int]:
        """What the model continues from at its next turn."""
        return self.prompt_ids + self.ids

    @property
    def generated_tokens(self) -> int:
        return sum(self.generated)


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
    """A probe conversation through the template (user, assistant, tool, user): raises
    :class:`TemplateError` before any trajectory runs when the template is not
    prefix-stable."""
    t = Trajectory(prompt_ids=[], messages=[{"role": "user", "content": "1+1?"}])
    t.messages.append({"role": "assistant", "content": "<tool>calc: 1+1</tool>"})
    assembler.observation_ids(t, [{"role": "tool", "content": "<result>2</result>"}])
    t.messages.append({"role": "tool", "content": "<result>2</result>"})
    t.messages.append({"role": "assistant", "content": "answer: 2"})
    assembler.observation_ids(t, [{"role": "user", "content": "sure?"}])


def assembler_for(tokenizer, stop_ids: Sequence[int]) -> TokenAssembler:
    """The :class:`TokenAssembler` of a megarlhf tokenizer (:mod:`megarlhf.data.tokenizer`):
    its chat template renders, its ``encode`` (no BOS) tokenizes the appended text, and a
    prompt an environment extended is tokenized as every prompt is
    (``apply_chat_template``)."""
    def render(messages, gen):
        try:
            return tokenizer.render_chat(list(messages), gen)
        except Exception as e:  # noqa: BLE001 - jinja's own errors: named, never swallowed
            roles = sorted({m["role"] for m in messages})
            raise TemplateError(f"the tokenizer's chat template cannot render messages of "
                                f"roles {roles}: {type(e).__name__}: {e}") from e

    return TokenAssembler(
        render=render,
        encode=lambda text: tokenizer.encode(text),
        decode=lambda ids: tokenizer.decode(list(ids)),
        token_text=lambda i: tokenizer.decode([int(i)], skip_special_tokens=False),
        stop_ids=stop_ids,
        encode_prompt=lambda messages: tokenizer.apply_chat_template(list(messages), True))
