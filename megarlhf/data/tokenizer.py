"""One tokenizer interface over a sentencepiece model and a Hugging Face tokenizer directory.

Everything above this module (datasets, trainers, rollout, checkpoints) sees only
:class:`Tokenizer`:

* ``encode(text)`` gives the text's token ids and nothing else (no BOS/EOS unless asked for);
  the string forms of control tokens (``<s>``, ``</s>``, ...) inside ``text`` become those
  tokens, as Hugging Face tokenizers do, so both back-ends agree token for token.
* ``apply_chat_template(messages)`` gives the prompt ids a policy sees: the HF tokenizer's own
  chat template when it has one, else a :class:`ChatTemplate` (role formats, documented below).
* ``save(dir)`` writes the tokenizer next to a checkpoint so that :func:`load_tokenizer` gets it
  back; ``export_hf(dir)`` writes a directory that ``transformers.AutoTokenizer`` loads (for a
  sentencepiece model: a ``tokenizer.json`` built from the ``.model``, id for id identical, plus
  the chat template as Jinja), so an exported HF checkpoint carries its tokenizer.

:func:`train_sentencepiece` trains a small model offline and deterministically (the CPU demo's
tokenizer).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import string
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

Message = Mapping[str, str]  # {"role": "system"|"user"|"assistant", "content": str}

# File names of a tokenizer saved by :meth:`Tokenizer.save`.
SPM_MODEL_NAME = "tokenizer.model"
MEGARLHF_META_NAME = "megarlhf_tokenizer.json"

# Digits, ASCII letters and ASCII punctuation: always in a trained vocabulary.
DEFAULT_REQUIRED_CHARS = string.digits + string.ascii_letters + string.punctuation


# --------------------------------------------------------------------------------------------
# Chat template for tokenizers that have none (sentencepiece)
# --------------------------------------------------------------------------------------------

_ROLES = ("system", "user", "assistant")
# Messages may also come from a tool (an agent's environment): a tokenizer's own chat template
# renders them as it defines; megarlhf's format-string template renders them as user messages.
_MESSAGE_ROLES = _ROLES + ("tool",)


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template as plain format strings, one per role; ``{content}`` marks the message.

    A conversation renders as ``[bos] + fmt(m_1) + fmt(m_2) + ... [+ generation_prompt]`` and is
    then tokenized in one piece. With the defaults::

        [{"role": "user", "content": "12+7*3="}]  ->  "<|user|>12+7*3=\\n<|assistant|>"

    :func:`train_sentencepiece` makes the role tags single tokens (``user_defined_symbols``).
    Render the same template in Jinja with :meth:`to_jinja` (used by the HF export).

    Attributes:
        system: format of a system message.
        user: format of a user message.
        assistant: format of an assistant message earlier in the conversation.
        generation_prompt: appended when ``add_generation_prompt`` (the start of the reply).
        add_bos: put the BOS token first.
    """

    system: str = "<|system|>{content}\n"
    user: str = "<|user|>{content}\n"
    assistant: str = "<|assistant|>{content}\n"
    generation_prompt: str = "<|assistant|>"
    add_bos: bool = True

    def __post_init__(self):
        for role in _ROLES:
            fmt = getattr(self, role)
            if not isinstance(fmt, str) or fmt.count("{content}") != 1:
                raise ValueError(
                    f"chat template: the {role!r} format must be a string holding '{{content}}' "
                    f"exactly once, got {fmt!r}"
                )
        if not isinstance(self.generation_prompt, str):
            raise ValueError(f"chat template: generation_prompt must be a string, "
                             f"got {self.generation_prompt!r}")

    @classmethod
    def plain(cls, add_bos: bool = True) -> "ChatTemplate":
        """No role markers: the prompt text is followed directly by the reply (a completion
        model's format; the CPU demo uses it to keep sequences short)."""
        return cls(system="{content}", user="{content}", assistant="{content}",
                   generation_prompt="", add_bos=add_bos)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ChatTemplate":
        unknown = set(d) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(f"chat template: unknown keys {sorted(unknown)}; "
                             f"allowed: {sorted(cls.__dataclass_fields__)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def special_strings(self) -> list[str]:
        """The role tags (text around ``{content}``), to make them single tokens."""
        out = []
        for s in [getattr(self, r) for r in _ROLES] + [self.generation_prompt]:
            for part in s.split("{content}"):
                for tag in re.findall(r"<\|[^|]*\|>", part):
                    if tag not in out:
                        out.append(tag)
        return out

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The conversation as text (without BOS, which is added as an id)."""
        parts = []
        for i, m in enumerate(messages):
            role, content = _check_message(m, i)
            fmt = self.user if role == "tool" else getattr(self, role)
            parts.append(fmt.replace("{content}", content))
        if add_generation_prompt:
            parts.append(self.generation_prompt)
        return "".join(parts)

    def to_jinja(self) -> str:
        """The same template as a Hugging Face (Jinja) chat template."""
        def lit(s: str) -> str:
            return json.dumps(s)  # a JSON string literal is a valid Jinja string literal

        out = "{{ bos_token }}" if self.add_bos else ""
        out += "{% for message in messages %}"
        for k, role in enumerate(_ROLES):
            pre, post = getattr(self, role).split("{content}")
            out += ("{% if " if k == 0 else "{% elif ") + f"message['role'] == {lit(role)} %}}"
            out += f"{{{{ {lit(pre)} + message['content'] + {lit(post)} }}}}"
        pre, post = self.user.split("{content}")  # a tool's message renders as a user's
        out += f"{{% elif message['role'] == {lit('tool')} %}}"
        out += f"{{{{ {lit(pre)} + message['content'] + {lit(post)} }}}}"
        out += "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}{% endif %}"
        out += "{% endfor %}"
        gen = lit(self.generation_prompt)
        out += f"{{% if add_generation_prompt %}}{{{{ {gen} }}}}{{% endif %}}"
        return out


def _check_message(m: Any, i: int) -> tuple[str, str]:
    if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
        raise ValueError(f"message {i} must be a mapping with 'role' and 'content', got {m!r}")
    role, content = m["role"], m["content"]
    if role not in _MESSAGE_ROLES:
        raise ValueError(f"message {i} has role {role!r}; allowed roles: {list(_MESSAGE_ROLES)}")
    if not isinstance(content, str):
        raise ValueError(f"message {i} content must be a string, got {type(content).__name__}")
    return role, content


# --------------------------------------------------------------------------------------------
# The interface
# --------------------------------------------------------------------------------------------


class Tokenizer(ABC):
    """What megarlhf needs from a tokenizer. Ids are plain ``list[int]``."""

    kind: str = ""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids (every id in ``[0, vocab_size)`` is valid, added tokens included)."""

    @property
    @abstractmethod
    def bos_id(self) -> int | None: ...

    @property
    @abstractmethod
    def eos_id(self) -> int: ...

    @property
    @abstractmethod
    def pad_id(self) -> int:
        """The padding id; the EOS id where the tokenizer defines no pad token (padding is
        always masked, so any valid id does)."""

    @abstractmethod
    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    @abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """The id of a token string (a vocabulary entry), or None."""

    @abstractmethod
    def render_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True,
                    tools: Sequence[dict] | None = None) -> str:
        """The conversation as the text that :meth:`apply_chat_template` tokenizes; ``tools``
        (OpenAI function schemas) go to templates that describe tools (Hugging Face
        templates)."""

    @abstractmethod
    def apply_chat_template(self, messages: Sequence[Message],
                            add_generation_prompt: bool = True,
                            tools: Sequence[dict] | None = None) -> list[int]: ...

    @abstractmethod
    def save(self, directory: str | os.PathLike) -> Path:
        """Write the tokenizer into ``directory`` so that :func:`load_tokenizer` reloads it."""

    @abstractmethod
    def export_hf(self, directory: str | os.PathLike) -> Path:
        """Write a directory that ``transformers.AutoTokenizer.from_pretrained`` loads."""

    def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos:
            if self.bos_id is None:
                raise ValueError("add_bos=True but this tokenizer has no BOS token")
            ids = [self.bos_id] + ids
        if add_eos:
            ids = ids + [self.eos_id]
        return ids


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece ``.model`` with a :class:`ChatTemplate`.

    Args:
        model_file: path to the ``.model`` file.
        chat_template: the template for :meth:`apply_chat_template` (default :class:`ChatTemplate`).
    """

    kind = "sentencepiece"

    def __init__(self, model_file: str | os.PathLike, chat_template: ChatTemplate | None = None):
        import sentencepiece as spm

        self.model_file = Path(model_file)
        if not self.model_file.is_file():
            what = "is a directory, not" if self.model_file.is_dir() else "does not exist; need"
            raise FileNotFoundError(f"{self.model_file} {what} a sentencepiece .model file")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.model_file))
        self.chat_template = chat_template or ChatTemplate()
        n = self.sp.get_piece_size()
        # Control tokens (bos/eos/pad and other type-3 pieces) are matched in text like HF does.
        self._control = {self.sp.id_to_piece(i): i for i in range(n) if self.sp.is_control(i)}
        self._control_re = (
            re.compile("(" + "|".join(re.escape(p) for p in
                                       sorted(self._control, key=len, reverse=True)) + ")")
            if self._control else None
        )

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def bos_id(self) -> int | None:
        i = self.sp.bos_id()
        return i if i >= 0 else None

    @property
    def eos_id(self) -> int:
        i = self.sp.eos_id()
        if i < 0:
            raise ValueError(f"{self.model_file} has no EOS token (trained with eos_id=-1)")
        return i

    @property
    def pad_id(self) -> int:
        i = self.sp.pad_id()
        return i if i >= 0 else self.eos_id

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        if self._control_re is None:
            ids = list(self.sp.encode(text))
        else:
            ids = []
            for k, seg in enumerate(self._control_re.split(text)):
                if k % 2:
                    ids.append(self._control[seg])
                elif seg:
                    ids.extend(self.sp.encode(seg))
        return self._wrap(ids, add_bos, add_eos)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            return self.sp.decode(ids)  # sentencepiece drops control tokens
        # Keep control tokens as their strings.
        out, run = [], []
        for i in ids:
            if self.sp.is_control(i):
                if run:
                    out.append(self.sp.decode(run))
                    run = []
                out.append(self.sp.id_to_piece(i))
            else:
                run.append(i)
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        return None if (i == self.sp.unk_id() and token != self.sp.id_to_piece(i)) else i

    def render_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True,
                    tools: Sequence[dict] | None = None) -> str:
        if tools:
            raise ValueError("megarlhf's format-string chat template cannot describe tools; use "
                             "a Hugging Face tokenizer whose chat template takes `tools`")
        return self.chat_template.render(messages, add_generation_prompt)

    def apply_chat_template(self, messages: Sequence[Message],
                            add_generation_prompt: bool = True,
                            tools: Sequence[dict] | None = None) -> list[int]:
        text = self.render_chat(messages, add_generation_prompt, tools)
        return self.encode(text, add_bos=self.chat_template.add_bos and self.bos_id is not None)

    def save(self, directory: str | os.PathLike) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.model_file, d / SPM_MODEL_NAME)
        meta = {"kind": self.kind, "chat_template": self.chat_template.to_dict()}
        (d / MEGARLHF_META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        return d

    def export_hf(self, directory: str | os.PathLike) -> Path:
        return export_sentencepiece_to_hf(self, directory)


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer directory, loaded from local files only.

    Args:
        path: the directory (``tokenizer.json`` / ``tokenizer_config.json`` ...).
        chat_template: used only when the tokenizer has no chat template of its own.
        trust_remote_code: passed to ``AutoTokenizer.from_pretrained``.
    """

    kind = "hf"

    def __init__(self, path: str | os.PathLike, chat_template: ChatTemplate | None = None,
                 trust_remote_code: bool = False):
        from transformers import AutoTokenizer

        self.path = Path(path)
        if not self.path.is_dir():
            what = "is a file, not" if self.path.exists() else "does not exist; need"
            raise FileNotFoundError(f"{self.path} {what} a Hugging Face tokenizer directory")
        self.tok = AutoTokenizer.from_pretrained(
            str(self.path), local_files_only=True, trust_remote_code=trust_remote_code
        )
        self.fallback_template = chat_template or ChatTemplate()

    @property
    def vocab_size(self) -> int:
        return len(self.tok)

    @property
    def bos_id(self) -> int | None:
        return self.tok.bos_token_id

    @property
    def eos_id(self) -> int:
        if self.tok.eos_token_id is None:
            raise ValueError(f"the tokenizer in {self.path} has no EOS token")
        return self.tok.eos_token_id

    @property
    def pad_id(self) -> int:
        return self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_id

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tok, "chat_template", None))

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        return self._wrap(list(self.tok.encode(text, add_special_tokens=False)), add_bos, add_eos)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        i = self.tok.convert_tokens_to_ids(token)
        if i is None or (i == self.tok.unk_token_id and token != self.tok.unk_token):
            return None
        return i

    def render_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True,
                    tools: Sequence[dict] | None = None) -> str:
        for i, m in enumerate(messages):
            _check_message(m, i)
        if self.has_chat_template:
            return self.tok.apply_chat_template(
                [dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                tokenize=False, tools=list(tools) if tools else None,
            )
        if tools:
            raise ValueError(f"the tokenizer in {self.path} has no chat template of its own, so "
                             "it cannot describe tools")
        text = self.fallback_template.render(messages, add_generation_prompt)
        if self.fallback_template.add_bos and self.tok.bos_token:
            text = self.tok.bos_token + text
        return text

    def apply_chat_template(self, messages: Sequence[Message],
                            add_generation_prompt: bool = True,
                            tools: Sequence[dict] | None = None) -> list[int]:
        # The rendered text holds the special tokens (e.g. bos) as strings; encode parses them.
        return self.encode(self.render_chat(messages, add_generation_prompt, tools))

    def save(self, directory: str | os.PathLike) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.tok.save_pretrained(str(d))
        return d

    def export_hf(self, directory: str | os.PathLike) -> Path:
        return self.save(directory)


def load_tokenizer(path: str | os.PathLike, chat_template: ChatTemplate | None = None,
                   trust_remote_code: bool = False) -> Tokenizer:
    """Load a tokenizer: a sentencepiece ``.model`` file, a directory written by
    :meth:`Tokenizer.save`, or a Hugging Face tokenizer directory.

    Args:
        chat_template: overrides the saved template of a sentencepiece tokenizer; for an HF
            tokenizer, used only if it has no chat template of its own.
    """
    p = Path(path)
    if p.is_file():
        return SentencePieceTokenizer(p, chat_template)
    if not p.is_dir():
        raise FileNotFoundError(f"no tokenizer at {p}: give a sentencepiece .model file or a "
                                f"tokenizer directory")
    meta_file = p / MEGARLHF_META_NAME
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        if meta.get("kind") == SentencePieceTokenizer.kind:
            tmpl = chat_template or ChatTemplate.from_dict(meta.get("chat_template", {}))
            return SentencePieceTokenizer(p / SPM_MODEL_NAME, tmpl)
    if (p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file():
        return HFTokenizer(p, chat_template, trust_remote_code)
    if (p / SPM_MODEL_NAME).is_file():
        return SentencePieceTokenizer(p / SPM_MODEL_NAME, chat_template)
    raise FileNotFoundError(
        f"{p} holds no tokenizer: expected {MEGARLHF_META_NAME} + {SPM_MODEL_NAME} (megarlhf), "
        f"tokenizer.json / tokenizer_config.json (Hugging Face) or {SPM_MODEL_NAME}"
    )


# --------------------------------------------------------------------------------------------
# Training a sentencepiece model offline
# --------------------------------------------------------------------------------------------


def train_sentencepiece(
    texts: Iterable[str],
    out_prefix: str | os.PathLike,
    vocab_size: int,
    *,
    model_type: str = "bpe",
    user_defined_symbols: Sequence[str] = ("\n",),
    chat_template: ChatTemplate | None = None,
    byte_fallback: bool = False,
    required_chars: str = DEFAULT_REQUIRED_CHARS,
    split_digits: bool = True,
    seed: int = 0,
    max_sentence_length: int = 16384,
) -> SentencePieceTokenizer:
    """Train a sentencepiece model offline, deterministically (one thread, fixed seed, input
    order kept), and return it as a :class:`SentencePieceTokenizer`.

    Choices made for RLHF on small tasks:

    * ids: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, ``<pad>`` 3;
    * text is kept as is: no Unicode normalization, no whitespace collapsing, no dummy prefix
      space, so ``encode(prompt) + encode(response)`` lines up with the text and the model
      exports exactly to a Hugging Face ``tokenizer.json`` (:func:`export_sentencepiece_to_hf`);
    * ``split_digits``: every digit is its own token (arithmetic is learnt digit by digit);
    * ``user_defined_symbols`` are always single tokens — by default the newline (so the PRM
      step delimiter is one token; sentencepiece trains on lines and could not learn it
      otherwise) plus the chat template's role tags;
    * ``required_chars`` are in the vocabulary whatever the corpus (digits, operators, letters);
      with ``byte_fallback`` any other character becomes byte tokens instead of ``<unk>`` (this
      adds 256 ids).

    ``vocab_size`` is an upper bound: a small corpus may give fewer pieces
    (``hard_vocab_limit=False``); read the result's ``vocab_size``.

    Args:
        texts: training texts; newlines inside a text are fine (each line is a sentence).
        out_prefix: writes ``{out_prefix}.model`` and ``{out_prefix}.vocab``.
        vocab_size: the most pieces to learn.
        model_type: "bpe" or "unigram".
        chat_template: the template saved with the tokenizer (default :class:`ChatTemplate`);
            its role tags are added to ``user_defined_symbols``.
    """
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    chat_template = chat_template or ChatTemplate()
    symbols = list(dict.fromkeys(list(user_defined_symbols) + chat_template.special_strings()))
    single_char_symbols = {s for s in symbols if len(s) == 1}
    required = "".join(sorted(set(required_chars) - {" ", "\n"} - single_char_symbols))

    # sentencepiece trains on lines; a newline itself is a user-defined symbol.
    sentences = [line for t in texts for line in t.split("\n") if line]
    if not sentences:
        raise ValueError("train_sentencepiece: no non-empty text to train on")
    n_min = 4 + len(symbols) + len(required) + (256 if byte_fallback else 0)
    if vocab_size < n_min:
        raise ValueError(
            f"train_sentencepiece: vocab_size={vocab_size} is below the {n_min} pieces that must "
            f"be in it (4 specials, {len(symbols)} user-defined symbols, {len(required)} required "
            f"chars{', 256 bytes' if byte_fallback else ''}); raise vocab_size or pass fewer "
            f"required_chars"
        )
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_prefix=str(out_prefix),
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=1.0,
        num_threads=1,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        max_sentence_length=max_sentence_length,
        user_defined_symbols=symbols,
        required_chars=required,
        byte_fallback=byte_fallback,
        split_digits=split_digits,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return SentencePieceTokenizer(f"{out_prefix}.model", chat_template)


# --------------------------------------------------------------------------------------------
# Exporting a sentencepiece model as a Hugging Face tokenizer
# --------------------------------------------------------------------------------------------


def _spm_proto(model_file: Path):
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(model_file.read_bytes())
    return m


def export_sentencepiece_to_hf(tokenizer: SentencePieceTokenizer,
                               directory: str | os.PathLike) -> Path:
    """Write a Hugging Face tokenizer directory equivalent to a sentencepiece model.

    The ``tokenizer.json`` is built from the model's pieces (a ``tokenizers`` BPE with merges
    ordered by piece score, or a Unigram with the piece scores), control pieces become special
    tokens and user-defined symbols added tokens; ``encode`` gives the same ids and ``decode``
    the same text as sentencepiece (tested). The chat template is written as Jinja, and the
    ``.model`` is copied beside it.

    Raises:
        ValueError: the model uses an option the ``tokenizers`` pipeline cannot reproduce
            exactly (``add_dummy_prefix`` or ``remove_extra_whitespaces``: both act on the whole
            text in sentencepiece but on each piece between added tokens in ``tokenizers``).
            Models from :func:`train_sentencepiece` have neither.
    """
    from tokenizers import AddedToken, decoders, models, normalizers
    from tokenizers import Tokenizer as RustTokenizer
    from transformers import PreTrainedTokenizerFast

    proto = _spm_proto(tokenizer.model_file)
    ts, ns = proto.trainer_spec, proto.normalizer_spec
    for opt in ("add_dummy_prefix", "remove_extra_whitespaces"):
        if getattr(ns, opt):
            raise ValueError(
                f"{tokenizer.model_file}: cannot export exactly to a Hugging Face tokenizer: the "
                f"model was trained with {opt}=true; retrain with {opt}=false (as "
                f"megarlhf.data.tokenizer.train_sentencepiece does) or ship the model's own HF "
                f"tokenizer"
            )
    if not ns.escape_whitespaces:
        raise ValueError(f"{tokenizer.model_file}: escape_whitespaces=false is not supported")

    pieces = list(proto.pieces)
    vocab_scores = [(p.piece, p.score) for p in pieces]
    NORMAL, UNKNOWN, CONTROL, USER, BYTE = 1, 2, 3, 4, 6
    if ts.model_type == 1:  # unigram
        model = models.Unigram(vocab_scores, unk_id=ts.unk_id, byte_fallback=ts.byte_fallback)
    elif ts.model_type == 2:  # bpe: sentencepiece merges the pair whose result scores highest
        normal = {p.piece: (i, p.score) for i, p in enumerate(pieces) if p.type == NORMAL}
        merges = []
        for piece, (_, score) in normal.items():
            local = [(piece[:k], piece[k:], score) for k in range(1, len(piece))
                     if piece[:k] in normal and piece[k:] in normal]
            local.sort(key=lambda x: (normal[x[0]][0], normal[x[1]][0]))
            merges.extend(local)
        merges.sort(key=lambda v: (v[2], len(v[0]), len(v[1])), reverse=True)
        model = models.BPE(
            {p: i for i, (p, _) in enumerate(vocab_scores)}, [(a, b) for a, b, _ in merges],
            unk_token=ts.unk_piece, fuse_unk=True, byte_fallback=ts.byte_fallback, dropout=None,
        )
    else:
        raise ValueError(f"{tokenizer.model_file}: model_type {ts.model_type} (char/word) is not "
                         f"supported for HF export; use bpe or unigram")

    rt = RustTokenizer(model)
    norms = []
    if ns.precompiled_charsmap:
        norms.append(normalizers.Precompiled(ns.precompiled_charsmap))
    norms.append(normalizers.Replace(" ", "▁"))
    rt.normalizer = normalizers.Sequence(norms)
    dec = [decoders.Replace("▁", " ")]
    if ts.byte_fallback:
        dec.append(decoders.ByteFallback())
    dec.append(decoders.Fuse())
    rt.decoder = decoders.Sequence(dec)
    rt.add_tokens([AddedToken(p.piece, normalized=False, special=(p.type == CONTROL))
                   for p in pieces if p.type in (CONTROL, USER)])

    def piece(i: int) -> str | None:
        return pieces[i].piece if 0 <= i < len(pieces) else None

    hf = PreTrainedTokenizerFast(
        tokenizer_object=rt,
        bos_token=piece(ts.bos_id), eos_token=piece(ts.eos_id),
        unk_token=piece(ts.unk_id), pad_token=piece(ts.pad_id),
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = tokenizer.chat_template.to_jinja()
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(d))
    shutil.copyfile(tokenizer.model_file, d / SPM_MODEL_NAME)
    # A class name that transformers 4.x and 5.x both resolve.
    cfg_file = d / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_file.write_text(json.dumps(cfg, indent=2) + "\n")
    return d
