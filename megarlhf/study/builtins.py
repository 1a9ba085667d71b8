"""Study helpers that are not megarlhf commands: each a function of typed parameters and an
output directory, run by the study's job wrapper (:mod:`megarlhf.study.job`) like a command.

``demo-data``: the CPU demo's arithmetic task as data files (:mod:`megarlhf.data.demo_task`)
and, optionally, its sentencepiece tokenizer; the task's difficulty can be changed, which gives
the "other task" a reward model is tested on for generalisation (finding 6). Besides the demo's
files it writes reward-model data for held-out prompts (``pairs_heldout``,
``labelled_heldout``: reference vs corrupted solutions), so reward models can be evaluated on
prompts they never saw.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Any, Callable

from megarlhf.config.base import check
from megarlhf.data.datasets import write_jsonl
from megarlhf.data.demo_task import ArithmeticConfig, ArithmeticTask, write_demo_data
from megarlhf.data.tokenizer import ChatTemplate, train_sentencepiece
from megarlhf.demo import REQUIRED_CHARS


@dataclass
class DemoDataParams:
    """Parameters of the ``demo-data`` builtin."""

    n_train: int = 4000  # training prompts (SFT rows, RL prompts)
    n_heldout: int = 200  # held-out prompts (evaluation)
    n_pairs: int = 500  # preference pairs on training prompts (pair i: prompt i % n_train)
    n_labelled: int = 500  # labelled responses on training prompts (half right, half wrong)
    n_heldout_pairs: int = 200  # pairs / labelled responses on held-out prompts (RM eval)
    seed: int = 0
    tokenizer: bool = True  # train the sentencepiece tokenizer on this data
    # The task (megarlhf.data.demo_task.ArithmeticConfig).
    min_operands: int = 2
    max_operands: int = 3
    max_value: int = 9
    operators: str = "+-*"

    def __post_init__(self):
        for name in ("n_train", "n_heldout", "n_pairs", "n_labelled"):
            check(getattr(self, name) >= 1, f"{name} must be >= 1")
        check(self.n_heldout_pairs >= 0, "n_heldout_pairs must be >= 0")


def demo_data(params: DemoDataParams, out_dir: str) -> dict[str, Any]:
    """Writes the task files (and tokenizer) into ``out_dir``; returns name -> path."""
    task = ArithmeticTask(ArithmeticConfig(
        min_operands=params.min_operands, max_operands=params.max_operands,
        max_value=params.max_value, operators=params.operators))
    os.makedirs(out_dir, exist_ok=True)
    files: dict[str, Any] = {k: str(v) for k, v in write_demo_data(
        out_dir, task, seed=params.seed, n_train=params.n_train, n_heldout=params.n_heldout,
        n_pairs=params.n_pairs, n_labelled=params.n_labelled).items()}
    if params.n_heldout_pairs:
        heldout = task.problems("heldout", params.n_heldout, params.seed)
        rng = random.Random(f"megarlhf-study-heldout:{params.seed}")
        pairs, labelled = [], []
        for i in range(params.n_heldout_pairs):
            p = heldout[i % len(heldout)]
            wrong, labels, _ = task.corrupt(p, rng)
            pairs.append({"id": f"hpair-{i}", "prompt": p.prompt, "chosen": p.solution,
                          "rejected": wrong})
            if i % 2 == 0:
                labelled.append({"id": f"hlab-{i}", "prompt": p.prompt, "response": p.solution,
                                 "label": 1, "step_labels": [1.0] * len(p.steps)})
            else:
                labelled.append({"id": f"hlab-{i}", "prompt": p.prompt, "response": wrong,
                                 "label": 0, "step_labels": list(labels)})
        files["pairs_heldout"] = str(write_jsonl(os.path.join(out_dir, "pairs_heldout.jsonl"),
                                                 pairs))
        files["labelled_heldout"] = str(write_jsonl(
            os.path.join(out_dir, "labelled_heldout.jsonl"), labelled))
    if params.tokenizer:
        problems = task.problems("train", params.n_train, params.seed)
        tok = train_sentencepiece([p.prompt + p.solution for p in problems],
                                  os.path.join(out_dir, "tokenizer"), vocab_size=64,
                                  required_chars=REQUIRED_CHARS,
                                  chat_template=ChatTemplate.plain())
        files["tokenizer"] = os.path.join(out_dir, "tokenizer.model")
        files["vocab_size"] = tok.vocab_size
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(files, f, indent=1)
    return files


@dataclass(frozen=True)
class Builtin:
    params: type
    run: Callable[[Any, str], dict[str, Any]]
    outputs: tuple[str, ...]  # files that must exist for the job to count as complete


BUILTINS: dict[str, Builtin] = {
    "demo-data": Builtin(DemoDataParams, demo_data, ("summary.json",)),
}
