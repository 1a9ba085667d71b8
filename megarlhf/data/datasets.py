"""Datasets from jsonl and parquet: prompts, preference pairs, labelled responses, SFT pairs.

Files are read and validated whole when loaded — before any model is built — and a bad row
raises :class:`DatasetError` naming the file, the line (jsonl, 1-based) or row (parquet, 0-based),
the field and what to change. Rows become small frozen dataclasses; the trainers index them
through a :class:`ResumableSampler`, whose state (seed, epoch, index) goes into checkpoints so a
resumed run sees exactly the data stream it would have seen.

Row kinds and their fields (names configurable through :class:`FieldNames`):

============== ===========================================================================
prompts        ``prompt`` (text) or ``messages`` (chat list); optional ``answer`` (ground truth
               for a verifier), ``test_cases`` (code: assert strings or {"input", "output"}),
               ``id``
pairs          ``prompt`` or ``messages``, ``chosen``, ``rejected``; optional ``id``
labelled       ``prompt`` or ``messages``, ``response``, ``label`` (0/1); optional
               ``step_labels`` (floats in [0, 1], one per step of the response, steps split by
               ``step_delimiter``; for a PRM), ``id``
sft            ``prompt`` or ``messages``, ``response``; optional ``id``
============== ===========================================================================

A row without an ``id`` gets ``"{file stem}:{0-based row number}"``.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass, fields as dc_fields
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence, Union

from megarlhf.data.tokenizer import Tokenizer

Messages = tuple[dict, ...]
Prompt = Union[str, Messages]
Paths = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]
_ROLES = ("system", "user", "assistant", "tool")


class DatasetError(ValueError):
    """A data file is unreadable or holds a bad row.

    Attributes:
        path: the file.
        line: the jsonl line number (1-based) or parquet row index (0-based); None for errors
            about the whole file.
        field: the field at fault (``None`` for errors about the whole row/file).
    """

    def __init__(self, path: str | os.PathLike, line: int | None, field: str | None,
                 problem: str, fix: str, *, line_kind: str = "line"):
        self.path = str(path)
        self.line = line
        self.line_kind = line_kind
        self.field = field
        self.problem = problem
        self.fix = fix
        where = self.path if line is None else f"{self.path}, {line_kind} {line}"
        what = f"field '{field}': " if field else ""
        super().__init__(f"{where}: {what}{problem}; {fix}")


@dataclass(frozen=True)
class FieldNames:
    """Which key (jsonl) or column (parquet) holds each logical field."""

    prompt: str = "prompt"
    messages: str = "messages"
    answer: str = "answer"
    test_cases: str = "test_cases"
    id: str = "id"
    chosen: str = "chosen"
    rejected: str = "rejected"
    response: str = "response"
    label: str = "label"
    step_labels: str = "step_labels"

    @classmethod
    def from_dict(cls, d: Mapping[str, str] | None) -> "FieldNames":
        d = dict(d or {})
        known = {f.name for f in dc_fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"FieldNames: unknown names {sorted(unknown)} (logical fields); "
                             f"known: {sorted(known)}")
        return cls(**d)


# The config setting that names each logical field's column (data.<field>_key); the fields
# without one (messages, test_cases, id) use their default column names.
CONFIG_KEYS = {"prompt": "data.prompt_key", "answer": "data.answer_key",
               "chosen": "data.chosen_key", "rejected": "data.rejected_key",
               "response": "data.response_key", "label": "data.label_key",
               "step_labels": "data.step_labels_key"}


def _rename_hint(logical: str) -> str:
    key = CONFIG_KEYS.get(logical)
    return f", or set {key} to the name of your column" if key else ""


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """Where a row came from, for error messages: ``data.jsonl, line 12``."""

    path: str = "<memory>"
    line: int | None = None
    line_kind: str = "line"  # "line" (jsonl, 1-based) or "row" (parquet, 0-based)

    def __str__(self) -> str:
        return self.path if self.line is None else f"{self.path}, {self.line_kind} {self.line}"

    def error(self, field: str | None, problem: str, fix: str) -> DatasetError:
        return DatasetError(self.path, self.line, field, problem, fix, line_kind=self.line_kind)


@dataclass(frozen=True)
class PromptExample:
    """A prompt for generation. ``prompt`` is text or a tuple of chat messages."""

    id: str
    prompt: Prompt
    answer: str | None = None
    test_cases: tuple | None = None
    source: Source = Source()

    def messages(self) -> list[dict]:
        return prompt_messages(self.prompt)

    def metadata(self) -> dict[str, Any]:
        """What a reward function gets for this prompt."""
        return {"id": self.id, "answer": self.answer, "test_cases": self.test_cases}


@dataclass(frozen=True)
class PreferencePair:
    id: str
    prompt: Prompt
    chosen: str
    rejected: str
    source: Source = Source()

    def messages(self) -> list[dict]:
        return prompt_messages(self.prompt)


@dataclass(frozen=True)
class LabelledResponse:
    """A response with a 0/1 outcome label and, for a PRM, one label per step."""

    id: str
    prompt: Prompt
    response: str
    label: int
    step_labels: tuple[float, ...] | None = None
    steps: tuple[str, ...] = ()
    source: Source = Source()

    def messages(self) -> list[dict]:
        return prompt_messages(self.prompt)


@dataclass(frozen=True)
class SFTExample:
    """One SFT row: a prompt and its response, or (``response`` None) a whole multi-turn
    conversation in ``prompt`` ending with an assistant message (every assistant message is
    trained; :func:`megarlhf.data.conversation.conversation_sample` lays it out)."""

    id: str
    prompt: Prompt
    response: str | None
    source: Source = Source()

    def messages(self) -> list[dict]:
        return prompt_messages(self.prompt)


def prompt_messages(prompt: Prompt) -> list[dict]:
    """A prompt as chat messages: text becomes one user message."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]


def split_steps(response: str, delimiter: str = "\n") -> list[str]:
    """The reasoning steps of a response: the non-blank pieces between delimiters.

    ``"7*3=21\\n12+21=33\\nanswer: 33"`` -> ``["7*3=21", "12+21=33", "answer: 33"]``.
    """
    if not delimiter:
        raise ValueError("step delimiter must be a non-empty string")
    return [s for s in response.split(delimiter) if s.strip()]


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------


def _format_of(path: Path) -> str:
    if path.is_dir():
        raise DatasetError(f"{path} is a directory", None, None, "not a data file",
                           "give the path of a .jsonl or .parquet file")
    name = path.name.lower()
    if name.endswith(".jsonl"):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    raise DatasetError(path, None, None, "unknown file type",
                       "use a .jsonl file (one JSON object per line) or a .parquet file")


def read_records(path: str | os.PathLike,
                 columns: Sequence[str] | None = None) -> Iterator[tuple[int, dict]]:
    """Yield ``(line, record)`` for every row of a jsonl or parquet file.

    ``line`` is the 1-based line number for jsonl (blank lines are skipped) and the 0-based row
    index for parquet. ``columns`` (parquet) reads only those columns that exist.
    """
    path = Path(path)
    if not path.is_dir() and not path.is_file():
        raise DatasetError(path, None, None, "no such file", "check the path in the config")
    fmt = _format_of(path)
    if fmt == "jsonl":
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a BOM is fine
                except UnicodeDecodeError as e:
                    raise DatasetError(path, lineno, None, f"not valid UTF-8 ({e.reason})",
                                       "save the file as UTF-8") from None
                if not text.strip():
                    continue
                try:
                    rec = json.loads(text)
                except json.JSONDecodeError as e:
                    raise DatasetError(path, lineno, None,
                                       f"invalid JSON ({e.msg} at column {e.colno})",
                                       "each line must hold one complete JSON object") from None
                except RecursionError:
                    raise DatasetError(path, lineno, None, "JSON nested too deeply",
                                       "each line must hold one flat JSON object") from None
                if not isinstance(rec, dict):
                    raise DatasetError(path, lineno, None,
                                       f"a JSON {type(rec).__name__} instead of an object",
                                       "each line must hold one JSON object {...}")
                yield lineno, rec
    else:
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises ArrowInvalid and friends
            raise DatasetError(path, None, None, f"not a readable parquet file ({e})",
                               "rewrite the file with pyarrow/pandas .to_parquet") from None
        names = pf.schema_arrow.names
        cols = [c for c in columns if c in names] if columns is not None else None
        row = 0
        batches = pf.iter_batches(columns=cols, batch_size=4096)
        while True:
            try:
                batch = next(batches)
                recs = batch.to_pylist()
            except StopIteration:
                break
            except Exception as e:  # noqa: BLE001 - pyarrow: OSError, ArrowInvalid, ...
                raise DatasetError(path, None, None,
                                   f"unreadable from row {row} on ({type(e).__name__}: "
                                   f"{str(e).strip()})",
                                   "the file is corrupt: rewrite it with pyarrow/pandas "
                                   ".to_parquet") from None
            for rec in recs:
                yield row, rec
                row += 1


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


class _Row:
    """One record with its location, and checks that raise :class:`DatasetError`."""

    def __init__(self, path: Path, line: int, rec: dict, kind: str, ordinal: int):
        self.path, self.line, self.rec, self.ordinal = path, line, rec, ordinal
        self.kind = "row" if kind == "parquet" else "line"

        self.source = Source(str(path), line, self.kind)

    def error(self, field: str | None, problem: str, fix: str) -> DatasetError:
        return self.source.error(field, problem, fix)

    def get(self, key: str) -> Any:
        return self.rec.get(key)  # parquet nulls and absent keys are both None

    def has(self, key: str) -> bool:
        return self.rec.get(key) is not None

    def text(self, key: str, *, allow_empty: bool = False, logical: str = "") -> str:
        v = self.get(key)
        if v is None:
            raise self.error(key, "missing",
                             f"add a '{key}' string to every row{_rename_hint(logical)}")
        if not isinstance(v, str):
            raise self.error(key, f"must be a string, got {type(v).__name__} {_short(v)}",
                             f"store '{key}' as text")
        if not allow_empty and not v.strip():
            raise self.error(key, "is empty", f"give a non-empty '{key}' or drop the row")
        return v

    def prompt(self, f: FieldNames) -> Prompt:
        has_p, has_m = self.has(f.prompt), self.has(f.messages)
        if has_p and has_m:
            raise self.error(f.prompt, f"both '{f.prompt}' and '{f.messages}' are set",
                             "give one of them per row")
        if not has_p and not has_m:
            raise self.error(f.prompt, f"missing (neither '{f.prompt}' nor '{f.messages}')",
                             f"add a '{f.prompt}' string or a '{f.messages}' list"
                             f"{_rename_hint('prompt')}")
        if has_p:
            return self.text(f.prompt, logical="prompt")
        msgs = self.get(f.messages)
        if not isinstance(msgs, (list, tuple)) or not msgs:
            raise self.error(f.messages,
                             f"must be a non-empty list of messages, got {_short(msgs)}",
                             'give [{"role": "user", "content": "..."}, ...]')
        out = []
        for i, m in enumerate(msgs):
            name = f"{f.messages}[{i}]"
            if not isinstance(m, dict):
                raise self.error(name, f"must be an object, got {_short(m)}",
                                 'give {"role": ..., "content": ...}')
            if m.get("role") not in _ROLES:
                raise self.error(f"{name}.role", f"is {m.get('role')!r}",
                                 f"use one of {list(_ROLES)}")
            if not isinstance(m.get("content"), str):
                raise self.error(f"{name}.content",
                                 f"must be a string, got {_short(m.get('content'))}",
                                 "give the message text as a string")
            out.append({"role": m["role"], "content": m["content"]})
        if not any(m["content"].strip() for m in out):
            raise self.error(f.messages, "every message is empty", "give a non-empty prompt")
        return tuple(out)

    def row_id(self, f: FieldNames) -> str:
        v = self.get(f.id)
        if v is None:  # file stem and 0-based row number: the same for jsonl and parquet
            return f"{self.path.stem}:{self.ordinal}"
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise self.error(f.id, f"must be a string or an integer, got {_short(v)}",
                             "use a string id or drop the field")
        return str(v)

    def answer(self, f: FieldNames) -> str | None:
        v = self.get(f.answer)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise self.error(f.answer, f"must be a string or a number, got {_short(v)}",
                             "store the ground-truth answer as text, "
                             "e.g. \"1/2\" or \"\\boxed{3}\"")
        if isinstance(v, float) and not math.isfinite(v):
            raise self.error(f.answer, f"is {v}", "give a finite answer")
        return str(v)

    def test_cases(self, f: FieldNames) -> tuple | None:
        v = self.get(f.test_cases)
        if v is None:
            return None
        if not isinstance(v, (list, tuple)) or not v:
            raise self.error(f.test_cases, f"must be a non-empty list, got {_short(v)}",
                             'give ["assert f(1) == 2", ...] or [{"input": ..., "output": ...}]')
        out = []
        for i, c in enumerate(v):
            if isinstance(c, str):
                out.append(c)
            elif (isinstance(c, dict) and isinstance(c.get("input"), str)
                  and isinstance(c.get("output"), str)):
                out.append({"input": c["input"], "output": c["output"]})
            else:
                raise self.error(f"{f.test_cases}[{i}]", f"is {_short(c)}",
                                 'give an assert string or {"input": str, "output": str}')
        return tuple(out)

    def label(self, f: FieldNames) -> int:
        v = self.get(f.label)
        if v is None:
            raise self.error(f.label, "missing", f"add '{f.label}': 0 or 1 to every row"
                             f"{_rename_hint('label')}")
        if isinstance(v, bool):
            return int(v)
        if isinstance(v, (int, float)) and v in (0, 1):
            return int(v)
        raise self.error(f.label, f"must be 0 or 1, got {_short(v)}",
                         "use 1 for a correct/accepted response and 0 otherwise "
                         "(per-step soft labels go in step_labels)")

    def step_labels(self, f: FieldNames, steps: list[str], delimiter: str) -> tuple | None:
        v = self.get(f.step_labels)
        if v is None:
            return None
        if not isinstance(v, (list, tuple)):
            raise self.error(f.step_labels, f"must be a list of numbers, got {_short(v)}",
                             "give one number in [0, 1] per step")
        out = []
        for i, x in enumerate(v):
            if isinstance(x, bool):
                x = float(x)
            if not isinstance(x, (int, float)) or not (0.0 <= x <= 1.0):
                raise self.error(f"{f.step_labels}[{i}]", f"is {_short(x)}",
                                 "each step label must be a number in [0, 1]")
            out.append(float(x))
        if len(out) != len(steps):
            raise self.error(
                f.step_labels,
                f"has {len(out)} labels but the response has {len(steps)} steps when split by "
                f"{delimiter!r}",
                "give one label per step, or set reward.prm_step_delimiter to the delimiter "
                "the responses use",
            )
        return tuple(out)


def _short(v: Any, n: int = 40) -> str:
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def _load(paths: Paths, columns: list[str],
          make: Callable[[_Row], Any], id_field: str) -> list:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise ValueError("no data files given")
    out, seen = [], {}
    for p in paths:
        p = Path(p)
        kind = _format_of(p)
        n0 = len(out)
        for ordinal, (line, rec) in enumerate(read_records(p, columns)):
            row = _Row(p, line, rec, kind, ordinal)
            ex = make(row)
            if ex.id in seen:
                raise row.error(id_field, f"duplicate id {ex.id!r} (first at {seen[ex.id]})",
                                "make ids unique or drop the id field")
            seen[ex.id] = str(row.source)
            out.append(ex)
        if len(out) == n0:
            raise DatasetError(p, None, None, "no rows", "the file is empty; give a file with data")
    return out


def load_prompts(paths: Paths, fields: FieldNames | None = None) -> list[PromptExample]:
    """Load and validate prompt rows from jsonl/parquet file(s)."""
    f = fields or FieldNames()

    def make(r: _Row) -> PromptExample:
        return PromptExample(id=r.row_id(f), prompt=r.prompt(f), answer=r.answer(f),
                             test_cases=r.test_cases(f), source=r.source)

    return _load(paths, [f.prompt, f.messages, f.answer, f.test_cases, f.id], make, f.id)


def load_preference_pairs(paths: Paths, fields: FieldNames | None = None) -> list[PreferencePair]:
    """Load and validate (prompt, chosen, rejected) rows."""
    f = fields or FieldNames()

    def make(r: _Row) -> PreferencePair:
        prompt = r.prompt(f)
        chosen = r.text(f.chosen, logical="chosen")
        rejected = r.text(f.rejected, logical="rejected")
        if chosen == rejected:
            raise r.error(f.rejected, "is identical to chosen",
                          "drop the row (an identical pair carries no preference)")
        return PreferencePair(id=r.row_id(f), prompt=prompt, chosen=chosen, rejected=rejected,
                              source=r.source)

    return _load(paths, [f.prompt, f.messages, f.chosen, f.rejected, f.id], make, f.id)


def load_labelled_responses(paths: Paths, fields: FieldNames | None = None,
                            step_delimiter: str = "\n") -> list[LabelledResponse]:
    """Load and validate (prompt, response, label[, step_labels]) rows.

    Args:
        step_delimiter: separates the steps of a response (see :func:`split_steps`); each row's
            ``step_labels``, when given, must have one label per step.
    """
    f = fields or FieldNames()

    def make(r: _Row) -> LabelledResponse:
        prompt = r.prompt(f)
        response = r.text(f.response, allow_empty=True, logical="response")
        label = r.label(f)
        steps = split_steps(response, step_delimiter)
        return LabelledResponse(id=r.row_id(f), prompt=prompt, response=response, label=label,
                                step_labels=r.step_labels(f, steps, step_delimiter),
                                steps=tuple(steps), source=r.source)

    return _load(paths, [f.prompt, f.messages, f.response, f.label, f.step_labels, f.id],
                 make, f.id)


def load_sft(paths: Paths, fields: FieldNames | None = None) -> list[SFTExample]:
    """Load and validate (prompt, response) rows for supervised fine-tuning."""
    f = fields or FieldNames()

    def make(r: _Row) -> SFTExample:
        prompt = r.prompt(f)
        if not r.has(f.response) and not isinstance(prompt, str) \
                and prompt[-1]["role"] == "assistant":
            return SFTExample(id=r.row_id(f), prompt=prompt, response=None, source=r.source)
        return SFTExample(id=r.row_id(f), prompt=prompt,
                          response=r.text(f.response, logical="response"), source=r.source)

    return _load(paths, [f.prompt, f.messages, f.response, f.id], make, f.id)


# --------------------------------------------------------------------------------------------
# Writing (the demo and tests use these)
# --------------------------------------------------------------------------------------------


def write_jsonl(path: str | os.PathLike, records: Sequence[Mapping[str, Any]]) -> Path:
    """Write records as jsonl (atomically: a temp file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def write_parquet(path: str | os.PathLike, records: Sequence[Mapping[str, Any]]) -> Path:
    """Write records as a parquet file: one column per key of any record (missing values are
    null), column types inferred by pyarrow (so each key needs one type across records)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    keys = list(dict.fromkeys(k for r in records for k in r))
    pq.write_table(pa.Table.from_pydict({k: [r.get(k) for r in records] for k in keys}), tmp)
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------------
# Deterministic, resumable order
# --------------------------------------------------------------------------------------------


class ResumableSampler:
    """An endless stream of dataset indices: epoch after epoch, each a permutation of
    ``range(num_samples)`` fixed by ``(seed, epoch)`` (or the identity without shuffling).

    The state is three numbers (plus ``num_samples`` to catch a changed dataset on resume)::

        s = sampler.state_dict()     # {"seed": 0, "epoch": 2, "index": 17, "num_samples": 100}
        ...
        sampler.load_state_dict(s)   # the next indices are those that followed the save
    """

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True):
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"ResumableSampler needs num_samples >= 1, got {num_samples!r}")
        self.num_samples, self.seed, self.shuffle = num_samples, int(seed), shuffle
        self.epoch, self.index = 0, 0
        self._order: list[int] | None = None

    def _epoch_order(self) -> list[int]:
        if self._order is None:
            order = list(range(self.num_samples))
            if self.shuffle:
                # A string seed is hashed with SHA-512: stable across Python versions/platforms.
                random.Random(f"megarlhf-sampler:{self.seed}:{self.epoch}").shuffle(order)
            self._order = order
        return self._order

    def __iter__(self) -> "ResumableSampler":
        return self

    def __next__(self) -> int:
        i = self._epoch_order()[self.index]
        self.index += 1
        if self.index == self.num_samples:
            self.epoch, self.index, self._order = self.epoch + 1, 0, None
        return i

    def take(self, n: int) -> list[int]:
        """The next ``n`` indices (may cross an epoch boundary)."""
        return [next(self) for _ in range(n)]

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "index": self.index,
                "num_samples": self.num_samples}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        n = state.get("num_samples", self.num_samples)
        if n != self.num_samples:
            raise ValueError(
                f"sampler state is for a dataset of {n} rows but this one has "
                f"{self.num_samples}; resume with the same data files (or start a new run)"
            )
        if not 0 <= int(state["index"]) < self.num_samples or int(state["epoch"]) < 0:
            raise ValueError(f"invalid sampler state {dict(state)}")
        self.seed = int(state["seed"])
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = None


# --------------------------------------------------------------------------------------------
# Tokenization helpers
# --------------------------------------------------------------------------------------------

Overflow = Literal["error", "truncate_left", "skip"]
OVERFLOW_MODES = ("error", "truncate_left", "skip")


@dataclass(frozen=True)
class TokenizedPrompt:
    example: Any  # the row (PromptExample, PreferencePair, ...)
    ids: list[int]
    truncated: bool = False


def tokenize_prompt(tokenizer: Tokenizer, prompt: Prompt, max_prompt_len: int,
                    overflow: Overflow = "error",
                    source: Source | None = None) -> tuple[list[int], bool] | None:
    """A prompt's ids through the tokenizer's chat template (with the generation prompt).

    Over ``max_prompt_len`` tokens: ``"error"`` raises :class:`DatasetError`; ``"truncate_left"``
    keeps the last tokens (the end of the conversation and the generation prompt; a leading
    BOS is kept); ``"skip"`` returns None.

    Returns:
        ``(ids, truncated)``, or None for a skipped prompt.
    """
    if overflow not in OVERFLOW_MODES:
        raise ValueError(f"overflow must be one of {OVERFLOW_MODES}, got {overflow!r}")
    if max_prompt_len < 1:
        raise ValueError(f"max_prompt_len must be >= 1, got {max_prompt_len}")
    ids = tokenizer.apply_chat_template(prompt_messages(prompt), add_generation_prompt=True)
    if len(ids) <= max_prompt_len:
        return ids, False
    if overflow == "skip":
        return None
    if overflow == "truncate_left":
        bos = tokenizer.bos_id
        if bos is not None and ids and ids[0] == bos and max_prompt_len > 1:
            return [bos] + ids[len(ids) - (max_prompt_len - 1):], True
        return ids[len(ids) - max_prompt_len:], True
    raise (source or Source()).error(
        "prompt",
        f"is {len(ids)} tokens with the chat template, over max_prompt_len={max_prompt_len}",
        "raise data.max_prompt_len, shorten the prompt, or set data.overlong_prompt to "
        "'truncate_left' or 'skip'",
    )


def tokenize_prompts(tokenizer: Tokenizer, examples: Sequence[Any], max_prompt_len: int,
                     overflow: Overflow = "error") -> tuple[list[TokenizedPrompt], int]:
    """Tokenize every row's prompt up front (so overflow errors come before any training).

    Returns:
        the kept rows with their ids, and the number of rows skipped (``overflow="skip"``).
    """
    out, skipped = [], 0
    for ex in examples:
        r = tokenize_prompt(tokenizer, ex.prompt, max_prompt_len, overflow, ex.source)
        if r is None:
            skipped += 1
        else:
            out.append(TokenizedPrompt(ex, r[0], r[1]))
    return out, skipped


def tokenize_response_steps(tokenizer: Tokenizer, response: str, delimiter: str = "\n",
                            add_eos: bool = False) -> tuple[list[int], list[int]]:
    """A response's ids and, for each step, the index of the step's last token (where a PRM
    reads its score). A step ends after its delimiter when one follows it.

    Raises:
        ValueError: if tokenizing a prefix of the response does not give a prefix of its ids
            (a token spans a step boundary); make the delimiter a single token (e.g. a
            user-defined symbol of the sentencepiece model).
    """
    ids = tokenizer.encode(response, add_eos=add_eos)
    ends, pos = [], 0
    for piece in response.split(delimiter):
        start = pos
        pos += len(piece)
        if pos < len(response):
            pos += len(delimiter)
        if not piece.strip():
            continue
        prefix = tokenizer.encode(response[:pos])
        if ids[: len(prefix)] != prefix:
            raise ValueError(
                f"step boundary at character {pos} splits a token of the response "
                f"{response[max(0, start - 10):pos + 10]!r}; use a step delimiter that is a "
                f"single token"
            )
        ends.append(len(prefix) - 1)
    return ids, ends
