"""The agent demo: a tiny model learns to use a calculator tool with GRPO. ``megarlhf demo
--agent``.

Stages (real megarlhf jobs, configs next to this file):

1. data: arithmetic with two-digit operands (``37*48+19=``), beyond what a two-layer model
   computes in its head; SFT conversations where 40% of the answers come from the
   calculator (``<tool>calc: 37*48+19</tool>`` -> ``<result>1795</result>`` -> ``answer:
   1795``) and the rest are stated directly; a sentencepiece tokenizer trained on them;
2. SFT (``agent_sft.yaml``): multi-turn conversations laid out exactly as the trajectories the
   policy will generate (:mod:`megarlhf.data.conversation`);
3. GRPO (``agent_grpo.yaml``): each sample a trajectory with the ``calculator`` environment on
   vLLM's CPU build, rewarded by the environment;
4. held-out accuracy and tool-call rate of the SFT model (GRPO's step-0 evaluation) and of the
   RL policy.
"""

from __future__ import annotations

import json
import os
import random
import time
from typing import Any

from megarlhf.demo import config_path

AGENT_REQUIRED_CHARS = "0123456789+-*=answr: <>/toolcesu"
TOOL_SYMBOLS = ("<tool>", "</tool>", "<result>", "</result>", "calc: ", "answer: ")


def _task():
    from megarlhf.data.demo_task import ArithmeticConfig, ArithmeticTask

    return ArithmeticTask(ArithmeticConfig(min_operands=2, max_operands=3, min_value=2,
                                           max_value=99, operators="+-*"))


def conversation(prompt: str, answer: int, tool: bool) -> list[dict[str, str]]:
    """One SFT conversation: with the calculator, or answered directly."""
    expr = prompt.rstrip("=")
    if not tool:
        return [{"role": "user", "content": prompt},
                {"role": "assistant", "content": f"answer: {answer}"}]
    return [{"role": "user", "content": prompt},
            {"role": "assistant", "content": f"<tool>calc: {expr}</tool>"},
            {"role": "tool", "content": f"<result>{answer}</result>"},
            {"role": "assistant", "content": f"answer: {answer}"}]


def prepare_agent_data(out_dir: str, *, n_train: int = 4000, n_heldout: int = 200,
                       tool_fraction: float = 0.4, seed: int = 0) -> dict[str, str]:
    """Prompts, SFT conversations and the tokenizer (deterministic)."""
    from megarlhf.data.datasets import write_jsonl
    from megarlhf.data.tokenizer import ChatTemplate, train_sentencepiece

    task = _task()
    data = os.path.join(out_dir, "data")
    train = task.problems("train", n_train, seed)
    held = task.problems("heldout", n_heldout, seed)
    rng = random.Random(f"megarlhf-agent-demo:{seed}")
    convs = [conversation(p.prompt, p.answer, rng.random() < tool_fraction) for p in train]
    files = {
        "sft_train": str(write_jsonl(os.path.join(data, "sft_train.jsonl"),
                                     [{"id": f"sft-{i}", "messages": c}
                                      for i, c in enumerate(convs)])),
        "prompts_train": str(write_jsonl(os.path.join(data, "prompts_train.jsonl"),
                                         [{"id": f"train-{i}", "prompt": p.prompt,
                                           "answer": str(p.answer)}
                                          for i, p in enumerate(train)])),
        "prompts_heldout": str(write_jsonl(os.path.join(data, "prompts_heldout.jsonl"),
                                           [{"id": f"heldout-{i}", "prompt": p.prompt,
                                             "answer": str(p.answer)}
                                            for i, p in enumerate(held)])),
    }
    texts = ["".join(m["content"] for m in conversation(p.prompt, p.answer, True))
             for p in train[:2000]]
    tok = train_sentencepiece(texts, os.path.join(data, "tokenizer"), vocab_size=64,
                              user_defined_symbols=("\n",) + TOOL_SYMBOLS,
                              required_chars=AGENT_REQUIRED_CHARS,
                              chat_template=ChatTemplate.plain())
    # Saved as a directory: its plain chat template (no role tags: short sequences) travels
    # with it (a bare .model file would be read with the default role-tag template).
    files["tokenizer"] = str(tok.save(os.path.join(data, "tokenizer_dir")))
    files["vocab_size"] = str(tok.vocab_size)
    return files


def _job(name: str, overrides: list[str]):
    from megarlhf.config import load_config

    return load_config(config_path(name), overrides)


def run_agent_demo(out_dir: str = "outputs/demo-agent", *, sft_steps: int | None = None,
                   rl_steps: int | None = None, progress: bool = True,
                   overwrite: bool = False) -> dict[str, Any]:
    """Runs the agent demo; returns (and writes ``summary.json``) the headline numbers."""
    from megarlhf.checkpoint.outputs import DEMO_FILES, DEMO_OUTPUTS, claim_dir
    from megarlhf.controller.rl import train_rl
    from megarlhf.controller.sft import train_sft
    from megarlhf.demo import _is_demo_dir

    out_dir = os.path.abspath(out_dir)
    sft_extra = [f"train.steps={sft_steps}"] if sft_steps is not None else []
    rl_extra = ([f"train.steps={rl_steps}", f"train.eval_every={rl_steps}"]
                if rl_steps is not None else [])
    # Both stages' configs are checked before the first runs (the SFT architecture stands in
    # for the model GRPO will start from).
    arch = _job("agent_sft", [f"output_dir={out_dir}/sft"] + sft_extra).actor.model.arch
    _job("agent_grpo", [f"output_dir={out_dir}/grpo", "actor.model.hf_dir=null",
                        "actor.model.arch={" + ", ".join(f"{k}: {json.dumps(v)}"
                                                         for k, v in arch.items()) + "}",
                        f"actor.model.tokenizer={out_dir}/data/tokenizer_dir"] + rl_extra)
    claim_dir(out_dir, writer="demo", what="--output-dir", own=DEMO_OUTPUTS,
              overwrite=overwrite, resume_flag=None, legacy=_is_demo_dir, files=DEMO_FILES)
    t0 = time.time()
    bar = [f"logging.progress_bar={'true' if progress else 'false'}"]
    print("== megarlhf agent demo: 1/3 data and tokenizer", flush=True)
    files = prepare_agent_data(out_dir)
    print("== megarlhf agent demo: 2/3 SFT on calculator conversations (40% use the tool; "
          "TP2 on gloo)", flush=True)
    sft = train_sft(_job("agent_sft", [
        f"output_dir={out_dir}/sft", f"data.train_path={files['sft_train']}",
        f"actor.model.tokenizer={files['tokenizer']}",
        f"actor.model.arch.vocab_size={files['vocab_size']}"] + sft_extra + bar))
    print("== megarlhf agent demo: 3/3 GRPO (N=4) with the calculator environment",
          flush=True)
    hist = train_rl(_job("agent_grpo", [
        f"output_dir={out_dir}/grpo", f"actor.model.hf_dir={sft['hf_dir']}",
        f"data.train_path={files['prompts_train']}",
        f"data.eval_path={files['prompts_heldout']}"] + rl_extra + bar))
    rows = _eval_rows(os.path.join(out_dir, "grpo"))
    first, last = rows[0], rows[-1]
    summary = {"output_dir": out_dir, "sft_accuracy": first["eval/accuracy"],
               "rl_accuracy": last["eval/accuracy"],
               "sft_tool_call_rate": first["eval/tool_call_rate"],
               "rl_tool_call_rate": last["eval/tool_call_rate"],
               "eval_curve": hist["eval"], "minutes": (time.time() - t0) / 60}
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    print("")
    print(f"== megarlhf agent demo: held-out problems ({int(first['eval/num_prompts'])}, greedy)")
    print(f"   SFT model : accuracy {summary['sft_accuracy']:.3f}, calls the calculator in "
          f"{summary['sft_tool_call_rate']:.0%} of the problems")
    print(f"   RL policy : accuracy {summary['rl_accuracy']:.3f} "
          f"({100 * (summary['rl_accuracy'] - summary['sft_accuracy']):+.1f} points), calls it "
          f"in {summary['rl_tool_call_rate']:.0%}")
    print(f"   wall time : {summary['minutes']:.1f} min; TensorBoard: tensorboard --logdir "
          f"{out_dir}")
    return summary


def _eval_rows(run_dir: str) -> list[dict[str, float]]:
    rows = []
    with open(os.path.join(run_dir, "tensorboard", "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if "eval/accuracy" in r:
                rows.append(r)
    return rows
