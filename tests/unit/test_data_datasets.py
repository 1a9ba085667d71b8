"""Datasets (megarlhf/data/datasets.py): jsonl/parquet loaders, row validation errors, the
resumable sampler and prompt tokenization."""

import json

import pytest

from megarlhf.data.datasets import (
    DatasetError,
    FieldNames,
    ResumableSampler,
    Source,
    load_labelled_responses,
    load_preference_pairs,
    load_prompts,
    load_sft,
    split_steps,
    tokenize_prompt,
    tokenize_prompts,
    tokenize_response_steps,
    write_jsonl,
    write_parquet,
)
from megarlhf.data.tokenizer import ChatTemplate, SentencePieceTokenizer, train_sentencepiece

PROMPTS = [
    {"id": "a", "prompt": "1+2=", "answer": "3"},
    {"id": "b", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
     "answer": 7},
    {"id": 3, "prompt": "write add", "test_cases": ["assert add(1, 2) == 3"]},
    {"prompt": "echo", "test_cases": [{"input": "x\n", "output": "x"}]},
]
PAIRS = [
    {"prompt": "1+2=", "chosen": "1+2=3\nanswer: 3", "rejected": "1+2=4\nanswer: 4"},
    {"messages": [{"role": "user", "content": "hi"}], "chosen": "hello", "rejected": "go away"},
]
LABELLED = [
    {"prompt": "1+2=", "response": "1+2=3\nanswer: 3", "label": 1, "step_labels": [1.0, 1.0]},
    {"prompt": "2*3+1=", "response": "2*3=5\n5+1=6\nanswer: 6", "label": 0,
     "step_labels": [0.0, 0.0, 0.0]},
    {"prompt": "1+1=", "response": "answer: 2", "label": 1},
]
SFT = [{"prompt": "1+2=", "response": "1+2=3\nanswer: 3"}]
# Parquet columns have one type: the same prompts with uniform types.
PROMPTS_TYPED = [
    {"id": "a", "prompt": "1+2=", "answer": "3", "test_cases": None},
    {"id": "b", "messages": [{"role": "user", "content": "q"}], "answer": "7", "test_cases": None},
    {"id": None, "prompt": "echo", "answer": None,
     "test_cases": [{"input": "x\n", "output": "x"}, {"input": "", "output": ""}]},
]


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def as_tuple(rows):
    """Rows without their source (which names the file)."""
    return [tuple(v for k, v in vars(r).items() if k != "source") for r in rows]


@pytest.mark.parametrize("loader,records", [
    (load_prompts, PROMPTS_TYPED), (load_preference_pairs, PAIRS),
    (load_labelled_responses, LABELLED), (load_sft, SFT),
])
def test_jsonl_and_parquet_give_the_same_rows(tmp_path, loader, records):
    """If this fails, the same data gives different training rows depending on its file format."""
    a = loader(write_jsonl(tmp_path / "d.jsonl", records))
    b = loader(write_parquet(tmp_path / "d.parquet", records))
    assert as_tuple(a) == as_tuple(b)
    assert len(a) == len(records)
    assert a[0].source == Source(str(tmp_path / "d.jsonl"), 1, "line")
    assert b[0].source == Source(str(tmp_path / "d.parquet"), 0, "row")


def test_row_contents(tmp_path):
    """If this fails, fields are parsed wrongly: prompt vs messages, answers as text, test
    cases, default ids, labels, or the steps a PRM scores."""
    p = load_prompts(write_jsonl(tmp_path / "p.jsonl", PROMPTS))
    assert p[0].prompt == "1+2=" and p[0].answer == "3"
    assert p[0].messages() == [{"role": "user", "content": "1+2="}]
    assert p[1].prompt == ({"role": "system", "content": "s"}, {"role": "user", "content": "q"})
    assert p[1].answer == "7" and p[2].id == "3" and p[3].id == "p:3"
    assert p[3].test_cases == ({"input": "x\n", "output": "x"},)
    assert p[2].metadata() == {"id": "3", "answer": None,
                               "test_cases": ("assert add(1, 2) == 3",)}
    lab = load_labelled_responses(write_jsonl(tmp_path / "l.jsonl", LABELLED))
    assert [r.label for r in lab] == [1, 0, 1]
    assert lab[1].steps == ("2*3=5", "5+1=6", "answer: 6")
    assert lab[2].step_labels is None
    rows = [{"prompt": "p", "response": "r", "label": True}, {"prompt": "p", "response": "r",
                                                              "label": 0.0}]
    assert [r.label for r in load_labelled_responses(write_jsonl(tmp_path / "b.jsonl", rows))] \
        == [1, 0]
    # A custom delimiter and custom column names.
    rows = [{"question": "q", "output": "a ## b ## c", "ok": 0, "steps": [1, 0.5, 0]}]
    f = FieldNames(prompt="question", response="output", label="ok", step_labels="steps")
    lab = load_labelled_responses(write_jsonl(tmp_path / "c.jsonl", rows), f, step_delimiter="##")
    assert lab[0].steps == ("a ", " b ", " c") and lab[0].step_labels == (1.0, 0.5, 0.0)
    assert split_steps("a\n\nb\n", "\n") == ["a", "b"]
    with pytest.raises(ValueError, match="unknown names"):
        FieldNames.from_dict({"promt": "x"})


GOOD_PROMPT = '{"prompt": "1+2=", "answer": "3"}'
GOOD_LAB = '{"prompt": "p", "response": "a\\nb", "label": 1}'

# (loader, lines (the bad one last), field named in the error (None: whole row), text in message)
ERROR_CASES = {
    "invalid_json": (load_prompts, ['{"prompt": "x"'], None, "invalid JSON"),
    "not_an_object": (load_prompts, ['["prompt"]'], None, "instead of an object"),
    "missing_prompt": (load_prompts, ['{"answer": "3"}'], "prompt", "missing"),
    "prompt_wrong_type": (load_prompts, ['{"prompt": 12}'], "prompt", "must be a string"),
    "empty_prompt": (load_prompts, ['{"prompt": "   "}'], "prompt", "is empty"),
    "prompt_and_messages": (load_prompts, ['{"prompt": "a", "messages": [{"role": "user", '
                                           '"content": "b"}]}'], "prompt", "both"),
    "bad_role": (load_prompts, ['{"messages": [{"role": "bot", "content": "b"}]}'],
                 "messages[0].role", "use one of"),
    "messages_not_list": (load_prompts, ['{"messages": "hi"}'], "messages", "non-empty list"),
    "answer_wrong_type": (load_prompts, ['{"prompt": "a", "answer": [3]}'], "answer",
                          "string or a number"),
    "bad_test_case": (load_prompts, ['{"prompt": "a", "test_cases": [{"input": "1"}]}'],
                      "test_cases[0]", "assert string"),
    "duplicate_id": (load_prompts, ['{"id": 1, "prompt": "a"}', '{"id": "1", "prompt": "b"}'],
                     "id", "duplicate id"),
    "missing_chosen": (load_preference_pairs, ['{"prompt": "a", "rejected": "r"}'], "chosen",
                       "missing"),
    "identical_pair": (load_preference_pairs, ['{"prompt": "a", "chosen": "x", "rejected": "x"}'],
                       "rejected", "identical"),
    "label_not_binary": (load_labelled_responses,
                         ['{"prompt": "p", "response": "r", "label": 0.5}'], "label", "0 or 1"),
    "label_string": (load_labelled_responses,
                     ['{"prompt": "p", "response": "r", "label": "yes"}'], "label", "0 or 1"),
    "label_missing": (load_labelled_responses, ['{"prompt": "p", "response": "r"}'], "label",
                      "missing"),
    "step_count": (load_labelled_responses,
                   ['{"prompt": "p", "response": "a\\nb\\nc", "label": 1, "step_labels": [1, 1]}'],
                   "step_labels", "has 2 labels but the response has 3 steps"),
    "step_label_range": (load_labelled_responses,
                         ['{"prompt": "p", "response": "a", "label": 1, "step_labels": [1.5]}'],
                         "step_labels[0]", "in [0, 1]"),
    "response_wrong_type": (load_sft, ['{"prompt": "p", "response": null}'], "response",
                            "missing"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_bad_row_error_names_file_line_field(tmp_path, case):
    """If this fails, a bad data row is accepted, or its error does not say which file, line
    and field to fix."""
    loader, lines, field, text = ERROR_CASES[case]
    good = GOOD_LAB if loader is load_labelled_responses else GOOD_PROMPT
    if loader in (load_preference_pairs, load_sft):
        good = '{"prompt": "p", "chosen": "c", "rejected": "r", "response": "x"}'
    # Good rows and a blank line first: the reported line must be the file's line number.
    path = write_lines(tmp_path / "data.jsonl", [good.replace('"p"', f'"p{i}"') for i in range(3)]
                       + [""] + lines)
    bad_line = 4 + len(lines)
    with pytest.raises(DatasetError) as ei:
        loader(path)
    err = ei.value
    assert err.path == str(path) and err.line == bad_line and err.field == field
    msg = str(err)
    assert str(path) in msg and f"line {bad_line}" in msg and text in msg
    if field:
        assert f"field '{field}'" in msg
    assert ";" in msg  # the problem; then what to change


def test_parquet_errors_name_the_row(tmp_path):
    """If this fails, errors in parquet files do not point at the bad row."""
    rows = [dict(r) for r in LABELLED[:2]] + [{"prompt": "p", "response": "r", "label": 3}]
    path = write_parquet(tmp_path / "d.parquet", rows)
    with pytest.raises(DatasetError) as ei:
        load_labelled_responses(path)
    assert (ei.value.line, ei.value.field) == (2, "label")
    assert "row 2" in str(ei.value)
    # A column that is not in the file at all.
    path = write_parquet(tmp_path / "e.parquet", [{"question": "q"}])
    with pytest.raises(DatasetError, match="field 'prompt'.*data.prompt_key"):
        load_prompts(path)


def test_file_level_errors(tmp_path):
    """If this fails, an empty, missing or unsupported file passes silently or fails obscurely."""
    with pytest.raises(DatasetError, match="no rows"):
        load_prompts(write_lines(tmp_path / "e.jsonl", ["", "  "]))
    with pytest.raises(DatasetError, match="nope.jsonl: no such file"):
        load_prompts(tmp_path / "nope.jsonl")
    with pytest.raises(DatasetError, match="is a directory: not a data file"):
        load_prompts(tmp_path)
    (tmp_path / "d.csv").write_text("prompt\nx\n")
    with pytest.raises(DatasetError, match=r"\.jsonl.*\.parquet"):
        load_prompts(tmp_path / "d.csv")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(DatasetError, match="not a readable parquet"):
        load_prompts(tmp_path / "bad.parquet")
    (tmp_path / "u.jsonl").write_bytes(b'{"prompt": "\xff"}\n')
    with pytest.raises(DatasetError, match="line 1.*UTF-8"):
        load_prompts(tmp_path / "u.jsonl")


def test_sampler_resume_gives_identical_continuation():
    """If this fails, a resumed run sees a different data order than an uninterrupted one."""
    ref = ResumableSampler(10, seed=7)
    stream = ref.take(35)
    # Each epoch is a permutation, and epochs differ.
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert stream[:10] != stream[10:20]
    for cut in (0, 3, 10, 17, 29):
        s = ResumableSampler(10, seed=7)
        s.take(cut)
        state = json.loads(json.dumps(s.state_dict()))  # it survives a JSON checkpoint
        assert set(state) == {"seed", "epoch", "index", "num_samples"}
        fresh = ResumableSampler(10, seed=0)
        fresh.load_state_dict(state)
        assert fresh.take(35 - cut) == stream[cut:]
    assert ResumableSampler(10, seed=8).take(10) != stream[:10]
    assert ResumableSampler(10, shuffle=False).take(12) == list(range(10)) + [0, 1]
    with pytest.raises(ValueError, match="same data files"):
        ResumableSampler(11).load_state_dict(ref.state_dict())


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = ["1+2=3\nanswer: 3", "hello world", "12*3=36\n36-1=35\nanswer: 35"] * 20
    sp = train_sentencepiece(texts, tmp_path_factory.mktemp("tok") / "t", 140)
    return SentencePieceTokenizer(sp.model_file, ChatTemplate.plain())


def test_tokenize_prompt_overflow_modes(tok, tmp_path):
    """If this fails, an over-long prompt is silently cut, cut from the wrong side (losing the
    question), or its error does not name the row."""
    long = "1+2+3+4+5+6+7+8+9="
    ids, cut = tokenize_prompt(tok, long, 64)
    assert ids == [tok.bos_id] + tok.encode(long) and not cut
    ids, cut = tokenize_prompt(tok, long, 8, "truncate_left")
    assert cut and ids == [tok.bos_id] + tok.encode(long)[-7:]
    assert tokenize_prompt(tok, long, 8, "skip") is None
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "1="}, {"prompt": long}])
    rows = load_prompts(path)
    with pytest.raises(DatasetError) as ei:
        tokenize_prompts(tok, rows, 8)
    assert ei.value.line == 2 and ei.value.field == "prompt" and "max_prompt_len=8" in str(ei.value)
    kept, skipped = tokenize_prompts(tok, rows, 8, "skip")
    assert skipped == 1 and [k.example.id for k in kept] == [rows[0].id]
    with pytest.raises(ValueError, match="overflow"):
        tokenize_prompt(tok, long, 8, "cut")


def test_response_step_positions(tok):
    """If this fails, a PRM reads step scores at the wrong tokens."""
    resp = "12*3=36\n36-1=35\nanswer: 35"
    ids, ends = tokenize_response_steps(tok, resp, "\n")
    assert ids == tok.encode(resp)
    nl = tok.token_to_id("\n")
    assert [ids[e] for e in ends[:-1]] == [nl, nl] and ends[-1] == len(ids) - 1
    assert tok.decode(ids[: ends[0] + 1]) == "12*3=36\n"
    ids, ends = tokenize_response_steps(tok, resp, "\n", add_eos=True)
    assert ids[-1] == tok.eos_id and ends[-1] == len(ids) - 2
