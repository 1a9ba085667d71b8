#!/usr/bin/env python
"""Benchmark: the policy-optimisation methods of docs/methods.md side by side on the demo task.

Every method trains from the demo's SFT model with the demo's GRPO config
(``megarlhf/demo/grpo.yaml``: 64 prompts x N = 4 per step, 2 optimizer steps per rollout,
lr 2e-4, clip 0.2 / 0.28, token-mean, the verifier's reward, seed 1, 100 steps) and only the
method's own ``algorithm`` keys changed, so data order and sampling seeds are the same in every
run. Measured per method:

* held-out accuracy (greedy, the demo's 200 held-out problems) at steps 0, 50 and 100;
* KL to the reference (``policy/kl_ref``, k3 per token): at step 100 and the mean of the last
  10 steps;
* the verifier reward of the samples (``reward/math_mean``, mean of the last 10 steps);
* the method's own metrics (off-policy masked fraction, prompts drawn by dynamic sampling,
  final adaptive KL coefficient) and the wall time of the run.

Results go to ``<work>/results.json`` after every method (a partial table survives an
interruption) and a markdown table is printed at the end.

    python tools/benchmarks/bench_methods.py --demo-dir /tmp/demo        # an existing demo run
    python tools/benchmarks/bench_methods.py --work /tmp/bench_methods   # runs the demo first
    python tools/benchmarks/bench_methods.py --demo-dir D --only gspo cispo --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megarlhf.config import load_config  # noqa: E402
from megarlhf.demo import config_path, run_demo  # noqa: E402

# name -> (algorithm overrides as dotted "key=value", what it is)
METHODS: dict[str, tuple[list[str], str]] = {
    "grpo": ([], "the demo's GRPO (baseline)"),
    "gspo": (["policy_loss=gspo", "loss_agg_mode=seq_mean_token_mean", "clip_eps_low=3.0e-4",
              "clip_eps_high=4.0e-4"], "GSPO, sequence ratio, clip 3e-4 / 4e-4"),
    "gspo_token": (["policy_loss=gspo_token", "loss_agg_mode=seq_mean_token_mean",
                    "clip_eps_low=3.0e-4", "clip_eps_high=4.0e-4"], "GSPO-token"),
    "cispo": (["policy_loss=cispo", "clip_eps_low=1.0", "clip_eps_high=0.28"],
              "CISPO, weight <= 1.28, no lower bound"),
    "dapo": (["dynamic_sampling=true", "dynamic_sampling_max_rounds=3", "overlong_buffer=8"],
             "DAPO: + dynamic sampling, overlong buffer 8 of 40 tokens"),
    "reinforce_pp_baseline": (["advantage_estimator=reinforce_pp_baseline"],
                              "REINFORCE++-baseline"),
    "seq_tis": (["off_policy_correction=seq_tis", "is_upper=2.0"], "GRPO + sequence TIS (2)"),
    "seq_mis": (["off_policy_correction=seq_mis", "is_upper=2.0", "is_lower=0.5"],
                "GRPO + sequence masked IS [0.5, 2]"),
    "icepop": (["off_policy_correction=icepop"], "GRPO + IcePop [0.5, 5]"),
    "adaptive_kl": (["kl_coef=0.05", "kl_target=0.02", "kl_horizon=2560", "kl_estimator=k3+",
                     "kl_clamp=10.0"], "GRPO + KL loss k3+, adaptive beta (target 0.02)"),
    "dr_grpo": (["advantage_estimator=dr_grpo", "loss_agg_mode=seq_mean_token_sum_norm"],
                "Dr.GRPO"),
}


def _job(demo: str, out: str, method: list[str], steps: int):
    files = os.path.join(demo, "data")
    over = [f"output_dir={out}", f"actor.model.hf_dir={os.path.join(demo, 'sft', 'hf')}",
            f"data.train_path={os.path.join(files, 'prompts_train.jsonl')}",
            f"data.eval_path={os.path.join(files, 'prompts_heldout.jsonl')}",
            f"train.steps={steps}", f"train.eval_every={max(1, steps // 2)}",
            "logging.progress_bar=false", "checkpoint.overwrite=true"]
    over += [f"algorithm.{kv}" for kv in method]
    return load_config(config_path("grpo"), over)


def _read(out: str) -> list[dict]:
    with open(os.path.join(out, "tensorboard", "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _summary(rows: list[dict], hist: dict, minutes: float) -> dict:
    steps = [r for r in rows if r["step"] > 0 and "reward/raw_mean" in r]
    last = steps[-10:]

    def mean(key):
        vals = [r[key] for r in last if key in r]
        return statistics.fmean(vals) if vals else None

    out = {"eval": hist["eval"], "acc_first": hist["eval"][0][1], "acc_last": hist["eval"][-1][1],
           "kl_last": steps[-1].get("policy/kl_ref"), "kl_last10": mean("policy/kl_ref"),
           "reward_last10": mean("reward/math_mean"),
           "response_length_last10": mean("policy/response_length"), "minutes": minutes}
    for key in ("offpolicy/masked_frac", "offpolicy/weight_std", "policy/clip_frac"):
        out[key] = mean(key)
    drawn = [r["rollout/ds_prompts_drawn"] for r in steps if "rollout/ds_prompts_drawn" in r]
    if drawn:
        out["ds_prompts_drawn_mean"] = statistics.fmean(drawn)
    if "policy/kl_coef" in steps[-1]:
        out["kl_coef_last"] = steps[-1]["policy/kl_coef"]
    return out


def table(results: dict, steps: int) -> str:
    def f(x, nd=3):
        return "-" if x is None else f"{x:.{nd}f}"

    lines = [f"| method | held-out acc. step 0 | step {steps // 2} | step {steps} "
             f"| KL step {steps} | KL mean last 10 | reward last 10 | method's metric | minutes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'].splitlines()[-1][:80]} |||||||| ")
            continue
        ev = dict((int(s), a) for s, a in r["eval"])
        extra = []
        if r.get("offpolicy/masked_frac") is not None:
            extra.append(f"masked {r['offpolicy/masked_frac']:.2e}")
        if r.get("offpolicy/weight_std") is not None:
            extra.append(f"w std {r['offpolicy/weight_std']:.1e}")
        if "ds_prompts_drawn_mean" in r:
            extra.append(f"{r['ds_prompts_drawn_mean']:.0f} prompts drawn/step")
        if "kl_coef_last" in r:
            extra.append(f"beta {r['kl_coef_last']:.3f}")
        if name.startswith("gspo") or name == "cispo":
            extra.append(f"clip frac {f(r.get('policy/clip_frac'))}")
        lines.append(f"| {name} | {f(ev.get(0))} | {f(ev.get(steps // 2))} | {f(ev.get(steps))} "
                     f"| {f(r['kl_last'], 4)} | {f(r['kl_last10'], 4)} | {f(r['reward_last10'])} "
                     f"| {', '.join(extra) or '-'} | {r['minutes']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo-dir", help="an existing demo output (sft/hf, data/)")
    p.add_argument("--work", default="/tmp/bench_methods", help="where the runs go")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--only", nargs="*", help=f"methods to run (default all: {list(METHODS)})")
    a = p.parse_args(argv)
    os.makedirs(a.work, exist_ok=True)
    demo = a.demo_dir
    if demo is None:
        demo = os.path.join(a.work, "demo")
        run_demo(demo, progress=False, overwrite=True)
    names = a.only or list(METHODS)
    path = os.path.join(a.work, "results.json")
    results = json.load(open(path)) if os.path.exists(path) else {}
    from megarlhf.controller.rl import train_rl

    for name in names:
        out = os.path.join(a.work, name)
        t0 = time.time()
        print(f"== {name}: {METHODS[name][1]}", flush=True)
        try:
            hist = train_rl(_job(demo, out, METHODS[name][0], a.steps))
            results[name] = _summary(_read(out), hist, (time.time() - t0) / 60)
        except Exception:  # keep the others going; the table says which failed
            results[name] = {"error": traceback.format_exc()}
        results[name]["overrides"] = METHODS[name][0]
        with open(path, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
        print(table({name: results[name]}, a.steps).splitlines()[-1], flush=True)
    print(table({n: results[n] for n in names if n in results}, a.steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
