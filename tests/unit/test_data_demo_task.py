"""The CPU demo's arithmetic task (megarlhf/data/demo_task.py): determinism, disjoint splits,
correct answers and solutions, step structure, and data files the real loaders accept."""

import random
import re

import pytest

from megarlhf.data.datasets import (
    load_labelled_responses,
    load_preference_pairs,
    load_prompts,
    load_sft,
    split_steps,
)
from megarlhf.data.demo_task import ArithmeticConfig, ArithmeticTask, write_demo_data
from megarlhf.data.tokenizer import ChatTemplate, SentencePieceTokenizer, train_sentencepiece

HARD = ArithmeticConfig(min_operands=2, max_operands=4, max_value=99)


def test_generation_is_deterministic():
    """If this fails, the demo's data depends on something besides the seed, and runs (or a
    resumed run) see different problems."""
    task = ArithmeticTask()
    a = task.problems("train", 50, seed=3)
    assert a == ArithmeticTask().problems("train", 50, seed=3)
    assert a != task.problems("train", 50, seed=4)
    s1, s2 = task.stream("heldout", 9), task.stream("heldout", 9)
    assert [next(s1) for _ in range(20)] == [next(s2) for _ in range(20)]


def test_splits_are_disjoint():
    """If this fails, held-out accuracy is measured on training problems."""
    task = ArithmeticTask(ArithmeticConfig(max_value=20))
    train = {p.prompt for p in task.problems("train", 800, seed=0)}
    held = {p.prompt for p in task.problems("heldout", 200, seed=0)}
    assert len(train) == 800 and len(held) == 200 and not train & held
    # The split is a property of the prompt, whatever the seed or generation order.
    for seed in (1, 2):
        assert all(task.split_of(p.prompt) == "train" for p in task.problems("train", 100, seed))
    rng = random.Random(0)
    frac = sum(task.split_of(task.random_problem(rng).prompt) == "heldout"
               for _ in range(4000)) / 4000
    assert abs(frac - task.config.heldout_fraction) < 0.05


@pytest.mark.parametrize("config", [ArithmeticConfig(), HARD,
                                    ArithmeticConfig(operators="-", max_value=50)])
def test_answers_and_solution_steps_are_correct(config):
    """If this fails, the task teaches wrong arithmetic: an answer or a solution step disagrees
    with Python's evaluation (precedence: * before + and -)."""
    task = ArithmeticTask(config)
    for p in task.problems("train", 300, seed=1):
        assert p.prompt.endswith("=")
        assert p.answer == eval(p.prompt[:-1])
        nums = [int(x) for x in re.findall(r"\d+", p.prompt)]
        ops = re.findall(r"[+\-*]", p.prompt)
        assert config.min_operands <= len(nums) <= config.max_operands
        assert all(config.min_value <= n <= config.max_value for n in nums)
        assert len(p.steps) == len(ops) + 1
        for step in p.steps[:-1]:  # "a op b=c" with the correct c
            lhs, rhs = step.split("=")
            assert eval(lhs) == int(rhs), step
        assert p.steps[-1] == f"answer: {p.answer}"
        assert split_steps(p.solution, config.step_delimiter) == list(p.steps)
        assert task.extract_answer(p.solution) == p.answer and task.is_correct(p.solution, p.answer)


def test_solution_order_and_answer_extraction():
    """If this fails, the reference solution format or the answer extractor changed (the demo's
    verifier and PRM steps depend on both)."""
    task = ArithmeticTask()
    p = task.make_problem([12, 7, 3], ["+", "*"])
    assert (p.prompt, p.solution, p.answer) == ("12+7*3=", "7*3=21\n12+21=33\nanswer: 33", 33)
    p = task.make_problem([3, 7, 2], ["-", "-"])
    assert p.solution == "3-7=-4\n-4-2=-6\nanswer: -6"
    assert task.extract_answer("answer: 5\nanswer: -12") == -12
    assert task.extract_answer("answer:7") == 7
    assert task.extract_answer("no answer here") is None
    assert not task.is_correct("answer: 34", 33)


def test_corrupted_solutions_are_wrong_with_matching_step_labels():
    """If this fails, preference/PRM data built from the task has rejected answers that are
    right, or step labels that do not mark the first wrong step."""
    task = ArithmeticTask(HARD)
    rng = random.Random(0)
    for p in task.problems("train", 300, seed=2) + [task.make_problem([5, 3, 0], ["+", "*"])]:
        text, labels, wrong = task.corrupt(p, rng)
        steps = split_steps(text)
        assert len(steps) == len(labels) == len(p.steps)
        assert wrong != p.answer and task.extract_answer(text) == wrong
        k = labels.index(0.0)
        assert labels == tuple([1.0] * k + [0.0] * (len(labels) - k))
        assert list(steps[:k]) == list(p.steps[:k]) and steps[k] != p.steps[k]


def test_invalid_configs_are_refused():
    """If this fails, a nonsensical difficulty setting reaches the demo instead of an error."""
    for kw in ({"min_operands": 1}, {"min_operands": 3, "max_operands": 2}, {"min_value": -1},
               {"operators": "/"}, {"heldout_fraction": 0.0}, {"answer_prefix": "a\n"}):
        with pytest.raises(ValueError, match="demo task"):
            ArithmeticConfig(**kw)
    tiny = ArithmeticTask(ArithmeticConfig(max_operands=2, max_value=1, operators="+"))
    with pytest.raises(ValueError, match="distinct"):
        tiny.problems("train", 50)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_demo_data_files_load_with_the_real_loaders(tmp_path, fmt):
    """If this fails, the demo's data files do not pass the loaders the trainers use (so the
    demo would not exercise them), or the demo's texts overflow the tiny model's 64 tokens."""
    task = ArithmeticTask(ArithmeticConfig(max_value=99))
    files = write_demo_data(tmp_path, task, seed=0, n_train=200, n_heldout=40, n_pairs=60,
                            n_labelled=60, fmt=fmt)
    train, held = load_prompts(files["prompts_train"]), load_prompts(files["prompts_heldout"])
    assert len(train) == 200 and len(held) == 40
    assert not {r.prompt for r in train} & {r.prompt for r in held}
    assert all(int(r.answer) == eval(r.prompt[:-1]) for r in train + held)
    sft = load_sft(files["sft_train"])
    assert all(task.is_correct(r.response, eval(r.prompt[:-1])) for r in sft)
    pairs = load_preference_pairs(files["pairs_train"])
    assert all(task.is_correct(r.chosen, eval(r.prompt[:-1])) and
               not task.is_correct(r.rejected, eval(r.prompt[:-1])) for r in pairs)
    lab = load_labelled_responses(files["labelled_train"], step_delimiter="\n")
    assert {r.label for r in lab} == {0, 1}
    for r in lab:
        assert r.label == int(task.is_correct(r.response, eval(r.prompt[:-1])))
        assert r.step_labels[-1] == float(r.label)
    # Same seed, same files.
    again = write_demo_data(tmp_path / "again", task, seed=0, n_train=200, n_heldout=40,
                            n_pairs=60, n_labelled=60, fmt=fmt)
    assert all(again[k].read_bytes() == files[k].read_bytes() for k in files)
    # Short enough for a tiny model: prompt + solution + eos within 64 tokens.
    sp = train_sentencepiece([r.prompt + "\n" + r.response for r in sft], tmp_path / "t", 128)
    tok = SentencePieceTokenizer(sp.model_file, ChatTemplate.plain())
    longest = max(len(tok.apply_chat_template(r.messages())) + len(tok.encode(r.response)) + 1
                  for r in sft)
    assert longest <= 64
