"""The CPU demo: a whole RLHF run on a tiny model, on any machine. ``megarlhf demo``.

Stages (each a real megarlhf job, with its config next to this file):

1. data: a synthetic arithmetic task generated deterministically (train and held-out problems,
   chain-of-thought solutions) and a sentencepiece tokenizer trained on it offline;
2. SFT (``sft.yaml``): a tiny Megatron Llama (2 layers, hidden 64) from scratch, tensor parallel
   over 2 gloo ranks, to partial accuracy;
3. reward model (``rm.yaml``): samples of the SFT model labelled by the verifier train an
   outcome reward model, evaluated by pairwise accuracy and best-of-N;
4. GRPO (``grpo.yaml``): N = 4 samples per prompt from a vLLM rollout engine (its CPU build)
   fed with the actor's weights after every update, rewarded by the verifier (or the ORM);
5. held-out accuracy of the SFT model (GRPO's step-0 evaluation) and of the RL policy.

Everything runs through Ray placement groups on CPU slots, the same code paths a GPU cluster
uses. TensorBoard logs go to ``<output_dir>/<stage>/tensorboard``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REQUIRED_CHARS = "0123456789+-*=answr: "


def config_path(name: str) -> str:
    return os.path.join(HERE, f"{name}.yaml")


def prepare_data(out_dir: str, *, n_train: int = 4000, n_heldout: int = 200,
                 seed: int = 0) -> dict[str, str]:
    """Task files and the tokenizer (deterministic)."""
    from megarlhf.data.demo_task import ArithmeticTask, write_demo_data
    from megarlhf.data.tokenizer import ChatTemplate, train_sentencepiece

    task = ArithmeticTask()
    data_dir = os.path.join(out_dir, "data")
    files = {k: str(v) for k, v in write_demo_data(data_dir, task, seed=seed, n_train=n_train,
                                                    n_heldout=n_heldout).items()}
    problems = task.problems("train", n_train, seed)
    tok = train_sentencepiece([p.prompt + p.solution for p in problems],
                              os.path.join(data_dir, "tokenizer"), vocab_size=64,
                              required_chars=REQUIRED_CHARS, chat_template=ChatTemplate.plain())
    files["tokenizer"] = os.path.join(data_dir, "tokenizer.model")
    files["vocab_size"] = str(tok.vocab_size)
    return files


def _job(name: str, overrides: list[str]):
    from megarlhf.config import load_config

    return load_config(config_path(name), overrides)


def check_stages(out_dir: str, *, sft_steps: int | None = None, rl_steps: int | None = None,
                 reward: str = "verifier") -> None:
    """Builds and validates every stage's config before the first stage starts (a bad
    ``rl_steps`` used to be found after SFT and the reward model had run). The paths the
    stages produce do not exist yet: the SFT architecture stands in for the models.

    Raises:
        ConfigError: naming the stage and the field.
    """
    from megarlhf.config import ConfigError

    if reward not in ("verifier", "rm", "mix"):
        raise ConfigError(f"demo: reward={reward!r}: choose verifier, rm or mix")
    for name, steps in (("sft_steps", sft_steps), ("rl_steps", rl_steps)):
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)
                                  or steps < 1):
            raise ConfigError(f"demo: {name}={steps!r}: give a number of steps >= 1")
    arch = _job("sft", []).actor.model.arch
    model = ["actor.model.hf_dir=null", f"actor.model.arch={_yaml_flow(arch)}",
             f"actor.model.tokenizer={out_dir}/data/tokenizer.model"]
    stages = {"sft": [f"output_dir={out_dir}/sft"]
              + ([f"train.steps={sft_steps}"] if sft_steps is not None else []),
              "rm": [f"output_dir={out_dir}/rm", f"data.labelled_path={out_dir}/rm_data/l.jsonl",
                     f"data.preference_path={out_dir}/rm_data/p.jsonl",
                     f"data.eval_labelled_path={out_dir}/rm_data/el.jsonl"] + model,
              "grpo": [f"output_dir={out_dir}/grpo"] + model + _rl_settings(rl_steps, reward,
                                                                            "rm-placeholder")}
    if reward != "verifier":
        stages["grpo"] = [o if not o.startswith("reward_model.model.hf_dir=") else
                          "reward_model.model={arch: " + _yaml_flow(arch) + "}"
                          for o in stages["grpo"]]
    for name, over in stages.items():
        try:
            _job(name, over)
        except ConfigError as e:
            raise ConfigError(f"demo stage {name} ({config_path(name)}): {e}") from None


def _yaml_flow(d: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in d.items()) + "}"


def _rl_settings(rl_steps: int | None, reward: str, rm_hf: str) -> list[str]:
    over = []
    if rl_steps is not None:
        over.append(f"train.steps={rl_steps}")
        over.append(f"train.eval_every={rl_steps}")
    if reward != "verifier":
        over += ["reward_model.model.hf_dir=" + rm_hf, "reward_model.num_gpus=2",
                 "reward_model.parallel.tp=2",
                 "reward.sources={rm: 1.0}" if reward == "rm" else
                 "reward.sources={math: 1.0, rm: 0.5}"]
    return over


def _is_demo_dir(path: str) -> bool:
    """An output directory of a demo run from before output markers existed."""
    return os.path.isfile(os.path.join(path, "summary.json")) and \
        os.path.isdir(os.path.join(path, "sft"))


def run_demo(out_dir: str = "outputs/demo", *, sft_steps: int | None = None,
             rl_steps: int | None = None, reward: str = "verifier",
             progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Runs the whole demo; returns (and writes ``summary.json``) the headline numbers.

    ``out_dir`` must be new, empty or an earlier demo's (replaced with ``overwrite``: the
    demo's own entries only). Every stage's config is checked before the first one starts.
    """
    from megarlhf.checkpoint.outputs import DEMO_FILES, DEMO_OUTPUTS, claim_dir
    from megarlhf.controller.rl import train_rl
    from megarlhf.controller.sft import train_sft

    out_dir = os.path.abspath(out_dir)
    check_stages(out_dir, sft_steps=sft_steps, rl_steps=rl_steps, reward=reward)
    claim_dir(out_dir, writer="demo", what="--output-dir", own=DEMO_OUTPUTS,
              overwrite=overwrite, resume_flag=None, legacy=_is_demo_dir, files=DEMO_FILES)
    t0 = time.time()
    summary: dict[str, Any] = {"output_dir": out_dir}
    bar = [f"logging.progress_bar={'true' if progress else 'false'}"]

    print("== megarlhf demo: 1/4 data and tokenizer", flush=True)
    files = prepare_data(out_dir)

    print("== megarlhf demo: 2/4 SFT of a tiny Megatron model from scratch (TP2 on gloo)",
          flush=True)
    sft_over = [f"output_dir={out_dir}/sft", f"data.train_path={files['sft_train']}",
                f"actor.model.tokenizer={files['tokenizer']}",
                f"actor.model.arch.vocab_size={files['vocab_size']}"] + bar
    if sft_steps is not None:
        sft_over.append(f"train.steps={sft_steps}")
    sft = train_sft(_job("sft", sft_over))
    summary["sft_final_loss"] = sft["sft/loss"]

    print("== megarlhf demo: 3/4 outcome reward model on the SFT model's samples "
          "(labelled by the verifier)", flush=True)
    rm_hf, rm_summary = _reward_model_stage(out_dir, files, sft["hf_dir"], bar)
    summary.update(rm_summary)

    print(f"== megarlhf demo: 4/4 GRPO (N=4) against the "
          f"{'verifier' if reward == 'verifier' else 'ORM' if reward == 'rm' else 'verifier+ORM'}",
          flush=True)
    rl_over = [f"output_dir={out_dir}/grpo", f"actor.model.hf_dir={sft['hf_dir']}",
               f"data.train_path={files['prompts_train']}",
               f"data.eval_path={files['prompts_heldout']}"] + bar
    rl_over += _rl_settings(rl_steps, reward, rm_hf)
    hist = train_rl(_job("grpo", rl_over))
    evals = hist["eval"]
    summary["sft_accuracy"] = evals[0][1]
    summary["rl_accuracy"] = evals[-1][1]
    summary["eval_curve"] = evals
    summary["minutes"] = (time.time() - t0) / 60
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    print("")
    print("== megarlhf demo: held-out accuracy (greedy, "
          f"{len(_heldout(files))} problems)")
    print(f"   SFT model : {summary['sft_accuracy']:.3f}")
    print(f"   RL policy : {summary['rl_accuracy']:.3f}   "
          f"({100 * (summary['rl_accuracy'] - summary['sft_accuracy']):+.1f} points)")
    if "rm_pair_accuracy" in summary:
        print(f"   ORM (held-out prompts): pairwise accuracy {summary['rm_pair_accuracy']:.3f}, "
              f"AUC {summary['rm_auc']:.3f} (chance 0.5)")
    print(f"   wall time : {summary['minutes']:.1f} min; TensorBoard: tensorboard --logdir "
          f"{out_dir}")
    return summary


def _heldout(files) -> list[str]:
    with open(files["prompts_heldout"], encoding="utf-8") as f:
        return [line for line in f if line.strip()]


def _reward_model_stage(out_dir: str, files: dict[str, str], sft_hf: str,
                        bar: list[str]) -> tuple[str, dict[str, Any]]:
    """Samples of the SFT model, labelled by the verifier, train an ORM (see rm.yaml)."""
    from megarlhf.controller.rm import train_rm
    from megarlhf.controller.rm_data import sample_and_label

    rm_data = os.path.join(out_dir, "rm_data")
    base = [f"output_dir={out_dir}/rm", f"actor.model.hf_dir={sft_hf}"] + bar
    # The sampling job only lends its cluster, rollout and data settings.
    data = sample_and_label(_job("rm", base + [f"data.labelled_path={rm_data}/labelled.jsonl",
                                               "train.eval_every=0"]),
                            sft_hf, files["prompts_train"], rm_data, n_per_prompt=8,
                            eval_fraction=0.1, all_pairs=True,
                            max_pairs_per_prompt=4)
    print(f"   {data['num_responses']} samples of {data['num_prompts']} prompts "
          f"(sample accuracy {data['accuracy']:.3f}): {data['num_pairs']} training pairs",
          flush=True)
    res = train_rm(_job("rm", base + [f"data.labelled_path={data['labelled']}",
                                      f"data.preference_path={data['pairs']}",
                                      f"data.eval_labelled_path={data['eval_labelled']}",
                                      f"data.eval_preference_path={data['eval_pairs']}"]))
    return res["hf_dir"], {"rm_hf": res["hf_dir"], "rm_data": data,
                           "rm_pair_accuracy": res.get("rm/eval_pair_accuracy"),
                           "rm_auc": res.get("rm/eval_binary_auc"),
                           "rm_eval": {k: v for k, v in res.items() if k.startswith("rm/eval")},
                           "rm_eval_history": res.get("eval")}
