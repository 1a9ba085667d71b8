"""Study helpers that are not megarlhf commands: each a function of typed parameters and an
output directory, run by the study's job wrapper (:mod:`megarlhf.study.job`) like a command.

``demo-data``: the CPU demo's arithmetic task as data files (:mod:`megarlhf.data.demo_task`)
and, optionally, its sentencepiece tokenizer; the task's difficulty can be changed, which gives
the "other task" a reward model is tested on for generalisation (finding 6). Besides the demo's
files it writes reward-model data for held-out prompts (``pairs_heldout``,
``labelled_heldout``: reference vs corrupted solutions), so reward models can be evaluated on
prompts they never saw.

``policy-samples``: reward-model data from a policy's own samples, labelled by the answer
verifier (:func:`megarlhf.controller.rm_data.sample_and_label`, as the demo's ORM stage does):
labelled responses, (right, wrong) pairs and, with ``step_label_rollouts``, Math-Shepherd step
labels; a held-out share of the prompts in ``*_eval`` files. Reward models trained on it learn
to rank the mistakes the policy really makes (reference-vs-corrupted pairs do not: studies 2
and 6 found such RMs pick worse answers of the policy as N grows).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Any, Callable

from megarlhf.config import load_config
from megarlhf.config.base import check
from megarlhf.controller import rm_data
from megarlhf.data.datasets import write_jsonl
from megarlhf.data.demo_task import ArithmeticConfig, ArithmeticTask, write_demo_data
from megarlhf.data.tokenizer import ChatTemplate, train_sentencepiece
from megarlhf.demo import REQUIRED_CHARS, config_path


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


@dataclass
class PolicySamplesParams:
    """Parameters of the ``policy-samples`` builtin."""

    policy: str = ""  # the policy: an HF model directory (e.g. ${sft}/hf)
    prompts: str = ""  # prompts with ground-truth answers (jsonl / parquet)
    tokenizer: str | None = None  # the policy's tokenizer, if its directory has none
    # A job YAML lending cluster, rollout and data settings; null: the CPU demo's rm.yaml.
    config: str | None = None
    n_per_prompt: int = 8  # responses sampled per prompt
    num_prompts: int | None = None  # the first this many prompts (null: all)
    temperature: float | None = None  # null: the config's rollout.temperature
    eval_fraction: float = 0.1  # share of the prompts written to the held-out files
    max_pairs_per_prompt: int | None = 4
    all_pairs: bool = True  # every (right, wrong) combination, capped as above
    step_label_rollouts: int = 0  # K > 0: Math-Shepherd step labels from K rollouts per step
    seed: int = 0

    def __post_init__(self):
        check(bool(self.policy), "policy: give the policy's HF model directory (e.g. ${sft}/hf)")
        check(bool(self.prompts), "prompts: give a prompts file with answers (e.g. "
                                  "${data}/prompts_train.jsonl)")
        check(self.n_per_prompt >= 2, "n_per_prompt must be >= 2 (pairs need a right and a "
                                      "wrong response of the same prompt)")
        check(self.num_prompts is None or self.num_prompts >= 1, "num_prompts must be >= 1 "
                                                                 "(or null: every prompt)")
        check(0.0 <= self.eval_fraction < 1.0, "eval_fraction must be in [0, 1)")
        check(self.max_pairs_per_prompt is None or self.max_pairs_per_prompt >= 1,
              "max_pairs_per_prompt must be >= 1 (or null: no cap)")
        check(self.step_label_rollouts >= 0, "step_label_rollouts must be >= 0 (0: off)")
        check(self.temperature is None or self.temperature > 0,
              "temperature must be > 0 (greedy decoding gives N identical samples)")


def policy_samples(params: PolicySamplesParams, out_dir: str) -> dict[str, Any]:
    """Samples, labels and writes RM data into ``out_dir``; returns paths and counts."""
    overrides = [f"actor.model.hf_dir={params.policy}", f"output_dir={out_dir}",
                 f"seed={params.seed}", f"data.labelled_path={out_dir}/labelled.jsonl",
                 "train.eval_every=0", "logging.progress_bar=false"]
    if params.tokenizer:
        overrides.append(f"actor.model.tokenizer={params.tokenizer}")
    job = load_config(params.config or config_path("rm"), overrides)
    result = rm_data.sample_and_label(
        job, params.policy, params.prompts, out_dir, n_per_prompt=params.n_per_prompt,
        num_prompts=params.num_prompts, temperature=params.temperature,
        eval_fraction=params.eval_fraction, max_pairs_per_prompt=params.max_pairs_per_prompt,
        all_pairs=params.all_pairs, step_label_rollouts=params.step_label_rollouts)
    print(f"policy-samples: {result['num_responses']} samples of {result['num_prompts']} "
          f"prompts (accuracy {result['accuracy']:.3f}): {result['num_pairs']} training pairs",
          flush=True)
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    return result


@dataclass(frozen=True)
class Builtin:
    params: type
    run: Callable[[Any, str], dict[str, Any]]
    outputs: tuple[str, ...]  # files that must exist for the job to count as complete


BUILTINS: dict[str, Builtin] = {
    "demo-data": Builtin(DemoDataParams, demo_data, ("summary.json",)),
    "policy-samples": Builtin(PolicySamplesParams, policy_samples,
                              ("summary.json", "labelled.jsonl", "pairs.jsonl")),
}
