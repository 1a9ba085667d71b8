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
from typing import Any

from megarlhf.data.conversation import (  # noqa: F401 - the layout, re-exported for agents
    TemplateError,
    TokenAssembler,
    assembler_for,
    check_template,
)


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
