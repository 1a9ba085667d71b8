"""Datasets of a job as token ids: prompts for rollouts, SFT examples, held-out evaluation.

Every row is read and validated up front (a bad row raises ``DatasetError`` naming the file,
line and field) before any worker starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from megarlhf.config import ConfigError, JobConfig
from megarlhf.data.datasets import (
    DatasetError,
    FieldNames,
    load_prompts,
    load_sft,
    prompt_messages,
    tokenize_prompt,
)
from megarlhf.data.conversation import TemplateError, assembler_for, conversation_sample
from megarlhf.data.tokenizer import load_tokenizer


@dataclass
class PromptItem:
    """One prompt of a rollout phase.

    Attributes:
        ids: the prompt's token ids in the policy's tokenizer (chat template applied).
        text: the prompt text (a plain-text prompt; "" for chat messages).
        answer: ground truth for verifiers.
        metadata: the row's other fields (e.g. code tests).
        prompt: the prompt as the data file gives it (text or chat messages), so that another
            model (the reward model) can tokenize it with its own tokenizer.
    """

    ids: list[int]
    text: str = ""
    answer: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)
    prompt: Any = None


def load_job_tokenizer(job: JobConfig, model=None):
    """The tokenizer of ``model`` (default: the actor's): ``model.tokenizer`` or ``hf_dir``."""
    m = model or job.actor.model
    path = m.tokenizer or m.hf_dir
    if path is None:
        raise ConfigError("no tokenizer: set actor.model.tokenizer (a sentencepiece .model file "
                          "or an HF tokenizer directory) for a model given as model.arch")
    if not os.path.exists(path):
        raise ConfigError(f"tokenizer path {path!r} does not exist (model.tokenizer / "
                          "model.hf_dir)")
    try:
        return load_tokenizer(path)
    except (OSError, ValueError) as e:  # no tokenizer files, an unreadable model file
        raise ConfigError(f"{path} is not a usable tokenizer (model.tokenizer / model.hf_dir): "
                          f"{e}") from None


def _paths(p: str | None, what: str) -> str:
    if not p:
        raise ConfigError(f"data.{what} is required for this job")
    if not os.path.exists(p):
        raise ConfigError(f"data.{what} = {p!r} does not exist")
    return p


def prompt_token_ids(job: JobConfig, tokenizer, prompt, source) -> list[int] | None:
    """A prompt's token ids as every job feeds it to a model: through the tokenizer's chat
    template (``data.apply_chat_template``; None when ``data.overlong_prompt=skip`` drops it),
    else the text of its last message with a BOS."""
    d = job.data
    if d.apply_chat_template:
        out = tokenize_prompt(tokenizer, prompt, d.max_prompt_len, d.overlong_prompt,
                              source=source)
        return None if out is None else out[0]
    text = prompt if isinstance(prompt, str) else prompt_messages(prompt)[-1]["content"]
    return tokenizer.encode(text, add_bos=True)


def load_prompt_items(job: JobConfig, tokenizer, path: str | None = None,
                      what: str = "train_path") -> list[PromptItem]:
    """Prompts (with answers / test cases as metadata), tokenized through the chat template."""
    d = job.data
    fields = FieldNames.from_dict({"prompt": d.prompt_key, "answer": d.answer_key})
    rows = load_prompts(_paths(path or getattr(d, what), what), fields)
    items = []
    for r in rows:
        ids = prompt_token_ids(job, tokenizer, r.prompt, r.source)
        if ids is None:
            continue
        items.append(PromptItem(ids=ids, text=r.prompt if isinstance(r.prompt, str) else "",
                                answer=r.answer, metadata=r.metadata(), prompt=r.prompt))
    if not items:
        raise ConfigError(f"data.{what}: no usable prompts")
    return items


@dataclass
class SFTSample:
    ids: list[int]
    loss_mask: list[int]


def load_sft_samples(job: JobConfig, tokenizer, path: str | None = None) -> list[SFTSample]:
    """Prompt + response + EOS with the loss on the response tokens; a row of ``messages``
    without a response is a multi-turn conversation, trained on every assistant message and
    laid out as an agent's trajectory (:mod:`megarlhf.data.conversation`); over-long rows
    refused."""
    d = job.data
    fields = FieldNames.from_dict({"prompt": d.prompt_key, "response": d.response_key})
    rows = load_sft(_paths(path or d.train_path, "train_path"), fields)
    out = []
    assembler = None
    for r in rows:
        if r.response is None:  # a multi-turn conversation: laid out as agent trajectories
            if not d.apply_chat_template:
                raise r.source.error("messages", "is a multi-turn conversation (no response)",
                                     "set data.apply_chat_template=true: the chat template lays "
                                     "out its turns")
            if assembler is None:
                assembler = assembler_for(tokenizer, [tokenizer.eos_id])
            try:
                ids, mask = conversation_sample(assembler, r.prompt, tokenizer.eos_id)
            except TemplateError as e:
                raise ConfigError(f"data.train_path: multi-turn conversations need a chat "
                                  f"template that only appends: {e}") from None
            if len(ids) > job.train.max_seq_len:
                raise DatasetError(r.source.path, r.source.line, "messages",
                                   f"the conversation is {len(ids)} tokens",
                                   f"raise train.max_seq_len (now {job.train.max_seq_len}) or "
                                   "shorten the example", line_kind=r.source.line_kind)
            out.append(SFTSample(ids, mask))
            continue
        if d.apply_chat_template:
            p = tokenize_prompt(tokenizer, r.prompt, d.max_prompt_len, d.overlong_prompt,
                                source=r.source)
            if p is None:
                continue
            pids = p[0]
        else:
            pids = tokenizer.encode(r.prompt, add_bos=True)
        rids = tokenizer.encode(r.response) + [tokenizer.eos_id]
        if len(pids) + len(rids) > job.train.max_seq_len:
            raise DatasetError(r.source.path, r.source.line, d.response_key,
                               f"prompt + response are {len(pids) + len(rids)} tokens",
                               f"raise train.max_seq_len (now {job.train.max_seq_len}) or "
                               "shorten the example", line_kind=r.source.line_kind)
        out.append(SFTSample(pids + rids, [0] * len(pids) + [1] * len(rids)))
    if not out:
        raise ConfigError("data.train_path: no usable SFT examples")
    return out
