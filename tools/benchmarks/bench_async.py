#!/usr/bin/env python
"""Benchmark: asynchronous (K = 1) vs synchronous GRPO on the demo task, wall-clock to reward.

Both runs, side by side in one invocation, train GRPO from the demo's SFT model with the same
config, seeds and data order, on CPU with generation and learning in separate processes:
``cluster.placement: split`` on two Ray CPU slots — the actor (TP1) in one Ray actor, one
transformers rollout replica in another (no reference model: kl_coef = 0 and KL tracking off).
The only difference is ``asynchronous.enabled`` (``max_staleness: 1``).

Measured (the clock starts when the training loop starts, after the cluster is up and the
rollout holds the initial weights, so process start-up is excluded from both):

* reward curve: ``reward/raw_mean`` (verifier accuracy of the step's samples) against the
  wall-clock time at which each step finished;
* target: the synchronous run's final reward = the mean of its last ``--window`` steps;
* time to target: the first time a run's trailing ``--window``-step mean reaches the target;
  speed-up = sync time / async time. Also the steady-state time per step and the learner's
  idle time.

Pinning (the default) mimics two accelerators on a 2-core machine: the actor's process (all
its threads) is pinned to core 0 with 1 torch thread, the rollout replica's to core 1 with 1
thread; the host side (the driver: rewards, advantages, Ray calls; Ray's raylet and GCS) shares
core 0 with the learner, so the rollout has core 1 to itself. The synchronous run then leaves
one core idle in each phase, exactly as it leaves the rollout GPUs idle while training on a
real split placement. ``--no-pin`` gives each process the default 2
threads on both cores (generation and learning then compete for the same two cores).

    python tools/benchmarks/bench_async.py --demo-dir /tmp/demo3        # an existing demo run
    python tools/benchmarks/bench_async.py --work /tmp/bench_async      # builds data + SFT first
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megarlhf.controller.cluster import init_ray  # noqa: E402
from megarlhf.controller.rl import RLTrainer  # noqa: E402


# ------------------------------------------------------------------------ pinning
def _pin(worker, cpus: list[int], threads: int) -> dict:
    """Runs inside a Ray actor: every thread of its process to ``cpus``, ``threads`` torch
    threads."""
    import torch

    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), set(cpus))
        except OSError:
            pass
    torch.set_num_threads(threads)
    return {"pid": os.getpid(), "cpus": sorted(os.sched_getaffinity(0)),
            "threads": torch.get_num_threads()}


def pin_host(cpus: set[int]) -> int:
    """This process and every process it started (Ray's raylet, GCS, idle workers) to ``cpus``;
    returns the number of threads pinned. Workers started later inherit it from the raylet
    (the actor and the rollout replica are re-pinned by :func:`_pin`)."""
    import psutil

    me = psutil.Process()
    n = 0
    for proc in [me] + me.children(recursive=True):
        try:
            for t in proc.threads():
                try:
                    os.sched_setaffinity(t.id, cpus)
                    n += 1
                except OSError:
                    pass
        except psutil.Error:
            pass
    return n


class Timed(RLTrainer):
    """Records (step, seconds since the loop started, metrics) as each step is logged; the
    loop is the synchronous or the asynchronous one by ``asynchronous.enabled``."""

    pin: bool = True

    def begin(self, cl, start):
        super().begin(cl, start)
        if self.pin:
            ncpu = os.cpu_count() or 1
            self.pinning = {"actor": cl["actor"].execute(_pin, [0], 1),
                            "rollout": cl.rollout.execute(_pin, [1 % ncpu], 1)}
        self.trace: list[tuple[int, float, dict]] = []
        self.t0 = time.perf_counter()

    def steps(self, cl, start):
        for last, metrics in super().steps(cl, start):
            self.trace.append((last, time.perf_counter() - self.t0, dict(metrics)))
            yield last, metrics


# ------------------------------------------------------------------------ runs
def build_demo(work: str, sft_steps: int) -> dict[str, str]:
    from megarlhf.controller.sft import train_sft
    from megarlhf.demo import _job, prepare_data

    files = prepare_data(work)
    sft = train_sft(_job("sft", [f"output_dir={work}/sft", f"data.train_path={files['sft_train']}",
                                 f"actor.model.tokenizer={files['tokenizer']}",
                                 f"actor.model.arch.vocab_size={files['vocab_size']}",
                                 f"train.steps={sft_steps}", "logging.progress_bar=false"]))
    return {"sft_hf": sft["hf_dir"], "prompts_train": files["prompts_train"]}


def make_job(demo: dict[str, str], out: str, steps: int, asynchronous: bool, extra: list[str]):
    from megarlhf.demo import _job

    return _job("grpo", [
        f"output_dir={out}", f"actor.model.hf_dir={demo['sft_hf']}",
        f"data.train_path={demo['prompts_train']}", "data.eval_path=null",
        "cluster.placement=split", "cluster.gpus_per_node=2", "actor.parallel.tp=1",
        "actor.num_gpus=1", "algorithm.track_kl=false", "algorithm.use_behaviour_logprobs=true",
        f"train.steps={steps}", "train.eval_every=0", "logging.progress_bar=false",
        f"asynchronous.enabled={'true' if asynchronous else 'false'}",
        "asynchronous.max_staleness=1"] + extra)


def run_one(kind: str, demo, out: str, steps: int, pin: bool, extra: list[str]) -> dict:
    trainer = Timed(make_job(demo, out, steps, kind == "async", extra))
    trainer.pin = pin
    load0 = os.getloadavg()[0]
    trainer.run()
    return {"kind": kind, "out": out, "pinning": getattr(trainer, "pinning", None),
            "loadavg_1min": [load0, os.getloadavg()[0]],
            "trace": [(s, t, {k: v for k, v in m.items() if isinstance(v, (int, float))})
                      for s, t, m in trainer.trace]}


# ------------------------------------------------------------------------ analysis
def curve(run: dict, window: int) -> tuple[list[float], list[float], list[float]]:
    """(times, rewards, trailing-window means)."""
    t = [x[1] for x in run["trace"]]
    r = [x[2]["reward/raw_mean"] for x in run["trace"]]
    sm = [statistics.fmean(r[max(0, i + 1 - window): i + 1]) for i in range(len(r))]
    return t, r, sm


def time_to(target: float, run: dict, window: int) -> tuple[float | None, int | None]:
    t, _, sm = curve(run, window)
    for i, (ti, v) in enumerate(zip(t, sm)):
        if i + 1 >= window and v >= target - 1e-12:
            return ti, i + 1
    return None, None


def summarize(sync: dict, asyn: dict, window: int) -> dict:
    _, rs, _ = curve(sync, window)
    target = statistics.fmean(rs[-window:])
    out = {"target": target}
    for name, run in (("sync", sync), ("async", asyn)):
        tt, step = time_to(target, run, window)
        ms = [m for _, _, m in run["trace"]]
        steady = [m["time/step"] for m in ms[2:]]
        out[name] = {
            "time_to_target_s": tt, "step_at_target": step,
            "total_s": run["trace"][-1][1], "steps": len(ms),
            "loadavg_1min": run["loadavg_1min"],
            "median_step_s": statistics.median(steady),
            "final_reward": statistics.fmean([m["reward/raw_mean"] for m in ms[-window:]]),
            "gen_s": statistics.median(m["time/generate"] for m in ms[2:]),
            "learn_s": statistics.median(m.get("time/reward", 0) + m.get("time/logprob", 0)
                                         + m.get("time/train", 0) for m in ms[2:]),
            "sync_s": statistics.median(m.get("time/weight_sync", 0) for m in ms[2:]),
            "learner_wait_s": (statistics.median(m["time/learner_wait"] for m in ms[2:])
                               if "time/learner_wait" in ms[-1] else None),
        }
    s, a = out["sync"], out["async"]
    out["speedup_time_to_target"] = (s["time_to_target_s"] / a["time_to_target_s"]
                                     if a["time_to_target_s"] else None)
    out["speedup_step_time"] = s["median_step_s"] / a["median_step_s"]
    # What perfect overlap would give with the synchronous run's phase times (the pure
    # schedule on a simulated clock).
    from megarlhf.controller.async_schedule import simulate

    n = s["steps"]
    k0 = simulate(n, 0, lambda b: s["gen_s"], lambda b: s["learn_s"], s["sync_s"]).makespan
    k1 = simulate(n, 1, lambda b: s["gen_s"], lambda b: s["learn_s"], s["sync_s"]).makespan
    out["predicted_step_speedup"] = k0 / k1
    return out


def plot(pairs: list[tuple[dict, dict]], window: int, target: float, path: str, title: str
         ) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (sync, asyn) in enumerate(pairs):
        for run, color, label in ((sync, "tab:blue", "sync"), (asyn, "tab:orange",
                                                                 "async K=1")):
            t, r, sm = curve(run, window)
            suffix = f" (pair {i + 1})" if len(pairs) > 1 else ""
            ax.plot(t, sm, color=color, lw=2 if i == 0 else 1, alpha=1 if i == 0 else 0.6,
                    label=f"{label}{suffix}, {window}-step mean")
            if i == 0:
                ax.scatter(t, r, color=color, s=6, alpha=0.35)
    ax.axhline(target, color="gray", ls="--", lw=1, label="sync final reward (target)")
    ax.set_xlabel("wall-clock seconds since the training loop started")
    ax.set_ylabel("reward/raw_mean (verifier accuracy of samples)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--demo-dir", help="an existing `megarlhf demo` output (sft/hf, data/)")
    p.add_argument("--work", default="/tmp/bench_async")
    p.add_argument("--sft-steps", type=int, default=400)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--window", type=int, default=10)
    p.add_argument("--pairs", type=int, default=1, help="sync/async pairs (order alternates)")
    p.add_argument("--no-pin", dest="pin", action="store_false")
    p.add_argument("--png", default=None, help="curve output (default docs/async_*.png)")
    p.add_argument("overrides", nargs="*", help="extra dotted config overrides for both runs")
    a = p.parse_args()

    os.makedirs(a.work, exist_ok=True)
    if a.demo_dir:
        demo = {"sft_hf": os.path.join(a.demo_dir, "sft", "hf"),
                "prompts_train": os.path.join(a.demo_dir, "data", "prompts_train.jsonl")}
    else:
        demo = build_demo(a.work, a.sft_steps)
    init_ray(make_job(demo, os.path.join(a.work, "probe"), 1, False, a.overrides),
             include_dashboard=False, log_to_driver=False)
    if a.pin:
        print(f"pinned {pin_host({0})} driver/Ray threads to core 0", flush=True)
    tag = "pinned" if a.pin else "unpinned"
    pairs = []
    for i in range(a.pairs):
        order = ("sync", "async") if i % 2 == 0 else ("async", "sync")
        got = {}
        for kind in order:
            out = os.path.join(a.work, f"{tag}-{kind}-{i}")
            print(f"== {kind} run {i + 1}/{a.pairs} ({tag}) -> {out}", flush=True)
            got[kind] = run_one(kind, demo, out, a.steps, a.pin, a.overrides)
        pairs.append((got["sync"], got["async"]))
    results = [summarize(s, x, a.window) for s, x in pairs]
    with open(os.path.join(a.work, f"results-{tag}.json"), "w") as f:
        json.dump({"args": vars(a), "results": results,
                   "runs": [[s, x] for s, x in pairs]}, f, indent=1)
    png = a.png or os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), "docs", f"async_reward_vs_time_{tag}.png")
    plot(pairs, a.window, results[0]["target"], png,
         f"GRPO on the demo task, split placement on 2 CPU cores ({tag}): async K=1 vs sync")
    print(f"\ncurve: {png}\n")
    print("| pair | run | time to target (s) | step at target | total (s) | steps | median "
          "step (s) | gen (s) | learn (s) | sync (s) | learner wait (s) | final reward | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(results):
        for name in ("sync", "async"):
            x = r[name]
            tt = f"{x['time_to_target_s']:.1f}" if x["time_to_target_s"] else "not reached"
            lw = f"{x['learner_wait_s']:.2f}" if x["learner_wait_s"] is not None else "-"
            print(f"| {i + 1} | {name} | {tt} | {x['step_at_target']} | {x['total_s']:.1f} | "
                  f"{x['steps']} | {x['median_step_s']:.2f} | {x['gen_s']:.2f} | "
                  f"{x['learn_s']:.2f} | {x['sync_s']:.3f} | {lw} | {x['final_reward']:.3f} | "
                  f"{x['loadavg_1min'][0]:.1f}-{x['loadavg_1min'][1]:.1f} |")
    for i, r in enumerate(results):
        sp = r["speedup_time_to_target"]
        head = (f"speed-up to target {sp:.2f}x" if sp else "async did not reach the target")
        print(f"pair {i + 1}: target {r['target']:.3f}; {head}; step-time speed-up "
              f"{r['speedup_step_time']:.2f}x (perfect overlap of the sync run's phases would "
              f"give {r['predicted_step_speedup']:.2f}x)")

if __name__ == "__main__":
    main()
