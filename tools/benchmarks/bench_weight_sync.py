#!/usr/bin/env python
"""Benchmark: weight sync from a Megatron actor (TP2/PP2, 4 ranks) into 2 vLLM replicas (split
placement), on CPU: this tree's path against a baseline tree's, in one run.

Each implementation runs in a child process of its own (a fresh local Ray cluster declaring 8
GPUs that do not exist, as the ray tests do; the actor's ranks and the replicas are Ray actors,
vLLM's CPU build generates): the actor loads a llama-shaped HF model (fp32 on the trainer,
bf16 on the wire and in vLLM), one warm-up sync, then ``--repeats`` timed syncs. Per sync:

* seconds (median), and as a fraction of a warm memcpy of the same bytes;
* bytes each trainer process wrote to sockets and pipes (``/proc/<pid>/io`` ``wchar``: the
  gloo traffic; Ray's object store is shared memory and does not count) and, for this tree, the
  bytes each rank put on its transfer group (its own share);
* peak extra private memory (``RssAnon``, sampled every 2 ms by a separate process) of every
  trainer rank and every vLLM worker process, against the bound (one bucket + the largest
  tensor);
* for this tree, where the time goes: the slowest owner's gather (TP, inside its stage) and
  wire time, the slowest vLLM worker's wait for the wire, load and finish (vLLM's reload).

    python tools/benchmarks/bench_weight_sync.py --baseline eb03ddb          # the 1.03B model
    python tools/benchmarks/bench_weight_sync.py --model small --baseline eb03ddb --repeats 2

``--baseline`` is a commit (checked out into a temporary git worktree) or a directory holding
an older megarlhf tree; without it only this tree is measured.

    python tools/benchmarks/bench_weight_sync.py --delta --model medium

delta sync (``rollout.weight_sync_delta``) against a full sync, side by side in one run: one
trainer rank (the only owner) into vLLM's CPU build (TP1, bf16) in the same process, gloo wire
on loopback; the actor's weights are changed between syncs so that about 1% and about 45% of
their bf16 elements differ (each a new random draw of the elements), and each update is synced
by the full path and by the delta path: seconds (median of ``--repeats``), bytes the owner put
on the wire, and the delta path's phases (encode on the owner; apply + checksum + load on the
receiver) and its host copies.

    python tools/benchmarks/bench_weight_sync.py --cost-model

prints ``megarlhf plan``'s weight-sync cost model (bytes per link, seconds at the stated
NVLink / InfiniBand bandwidths) for every shipped config and a DeepSeek-V3-sized MoE, beside
the peers' published figures; nothing runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODELS = {
    # llama-shaped, 1.03B parameters (the resharder and vLLM benchmarks' model).
    "1b": dict(vocab_size=32000, hidden_size=2048, num_layers=20, num_heads=16, num_kv_heads=4,
               ffn=5632, max_pos=1024),
    # ~0.2B parameters (the delta benchmark's default: a few minutes on 2 cores)
    "medium": dict(vocab_size=32000, hidden_size=1024, num_layers=12, num_heads=16,
                   num_kv_heads=4, ffn=2816, max_pos=512),
    # a quick check of the script (~40M parameters)
    "small": dict(vocab_size=8000, hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=4,
                  ffn=1408, max_pos=512),
}

_SAMPLER = r"""
import signal, sys, time
pids = [int(p) for p in sys.argv[1:]]
def read(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0
base = {p: read(p) for p in pids}
peak = dict(base)
def done(*_):
    print({p: peak[p] - base[p] for p in pids}, flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, done)
print("ready", flush=True)
while True:
    for p in pids:
        v = read(p)
        if v > peak[p]:
            peak[p] = v
    time.sleep(0.002)
"""


def _wchar(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    return 0


def _sampled(pids, fn):
    import ast

    proc = subprocess.Popen([sys.executable, "-c", _SAMPLER, *map(str, pids)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    try:
        result = fn()
    finally:
        time.sleep(0.05)
        proc.terminate()
    return result, ast.literal_eval(proc.communicate()[0].strip())


def _child(args) -> dict:
    """One implementation (whichever megarlhf this interpreter imports)."""
    import dataclasses
    import inspect

    import psutil
    import ray
    import torch

    import megarlhf
    from megarlhf.config.base import from_dict
    from megarlhf.config.schema import JobConfig, ModelConfig
    from megarlhf.controller.cluster import ClusterPlacement
    from megarlhf.parallel.layout import ParallelLayout
    from megarlhf.planning import validate
    from megarlhf.planning.placement import plan_placement
    from megarlhf.workers import RolloutGroup, RolloutSpec, WorkerGroup
    from megarlhf.workers.role_worker import RoleSpec

    job = validate(from_dict(JobConfig, {
        "kind": "grpo",
        "cluster": {"num_nodes": 1, "gpus_per_node": 8, "placement": "split"},
        "actor": {"model": {"hf_dir": args.model_dir, "dtype": "fp32"},
                  "parallel": {"tp": 2, "pp": 2}, "num_gpus": 4,
                  "optimizer": {"name": "sgd", "lr": 0.1, "use_distributed_optimizer": False}},
        "rollout": {"engine": "vllm", "num_gpus": 2, "kv_cache_gib": 0.25,
                    "max_new_tokens": 8, "weight_sync_bucket_mib": args.bucket_mib},
        "batch": {"rollout_prompts_global": 2, "train_prompts_global": 2,
                  "n_samples_per_prompt": 2},
        "data": {"max_prompt_len": 16}, "algorithm": {"track_kl": False},
    }))
    ray.init(num_cpus=2, num_gpus=8, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    pl = ClusterPlacement(plan_placement(job), "GPU", timeout_s=120)
    spec = RoleSpec(role="actor", model=ModelConfig(hf_dir=args.model_dir, dtype="fp32"),
                    layout=ParallelLayout(tp=2, pp=2), head="lm", optimizer=None, weights="hf")
    actor = WorkerGroup.create(pl, spec, call_timeout_s=3600, pg_timeout_s=1800)
    # The trainer computes in fp32 (megatron on CPU); vLLM holds bf16 and the wire carries it.
    rspec = dataclasses.replace(RolloutSpec.from_job(job), dtype="bfloat16")
    rollout = RolloutGroup.create(pl, rspec, call_timeout_s=3600)
    new_api = "version" in inspect.signature(WorkerGroup.sync_weights_to).parameters
    trainer = [r.pid for r in actor.ranks]
    workers = [c.pid for r in rollout.ranks for c in psutil.Process(r.pid).children(recursive=True)
               if "python" in c.name().lower() or "VLLM" in c.name() or "Worker" in c.name()]

    def sync(k):
        if new_api:
            return actor.sync_weights_to(rollout, version=k)
        return actor.sync_weights_to(rollout)

    sync(1)  # warm-up: the rendezvous (new), first-update costs
    rows = []
    for k in range(args.repeats):
        w0 = {p: _wchar(p) for p in trainer}
        t = time.perf_counter()
        res, peak = _sampled(trainer + workers, lambda k=k: sync(k + 2))
        dt = time.perf_counter() - t
        w1 = {p: _wchar(p) for p in trainer}
        row = dict(seconds=dt, wchar=[w1[p] - w0[p] for p in trainer],
                   trainer_peak=[peak[p] for p in trainer],
                   worker_peak=[peak[p] for p in workers])
        if new_api:
            row["phases"] = res.phases()
            row["sent"] = [r["bytes"] for r in res.ranks]
            row["buffers"] = res.receive_buffer_bytes
            row["bytes"] = res.bytes
        else:
            row["bytes"] = res[0].bytes
        rows.append(row)
    total = rows[0]["bytes"]
    # memcpy of the same bytes in bucket-sized copies (warm buffers)
    n = min(args.bucket_mib * 2**20, total)
    src = torch.empty(n, dtype=torch.uint8).random_()
    dst = torch.empty(n, dtype=torch.uint8)
    dst.copy_(src)
    mc = []
    for _ in range(3):
        t = time.perf_counter()
        left = total
        while left > 0:
            c = min(n, left)
            dst[:c].copy_(src[:c])
            left -= c
        mc.append(time.perf_counter() - t)
    out = dict(tree=os.path.dirname(os.path.dirname(megarlhf.__file__)), new_api=new_api,
               rows=rows, memcpy=statistics.median(mc), total=total, workers=len(workers))
    for g in (rollout, actor):
        g.shutdown()
    pl.release()
    ray.shutdown()
    return out


def _perturb(bundle, fraction: float, seed: int) -> None:
    """Changes about ``fraction`` of every parameter's elements by 3% (enough to change their
    bf16 value; zeros become 1e-3)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for chunk in bundle.chunks:
            for p in chunk.parameters():
                mask = torch.rand(p.shape, generator=g) < fraction
                p.copy_(torch.where(mask, torch.where(p == 0, 1e-3, p * 1.03), p))


def _delta_rank(model_dir: str, repeats: int, bucket_mib: int) -> dict:
    """One trainer rank + vLLM (TP1) in this process: full and delta syncs of the same kind of
    update (run_distributed rank)."""
    import statistics

    import torch

    from megarlhf.config.schema import ModelConfig
    from megarlhf.models.builder import build_model
    from megarlhf.parallel.layout import ParallelLayout, initialize_parallel
    from megarlhf.rollout.base import LocalSyncClient
    from megarlhf.rollout.vllm_engine import VLLMRolloutEngine
    from megarlhf.weights.loader import load_hf_dir
    from megarlhf.weights.transfer import OwnersTrainerEngine, TrainerInitInfo

    ctx = initialize_parallel(ParallelLayout())
    bundle = build_model(ModelConfig(hf_dir=model_dir, dtype="fp32"), ctx, init_weights=False)
    load_hf_dir(bundle, model_dir)
    engine = VLLMRolloutEngine.create(model_dir, load_format="dummy", dtype="bfloat16",
                                      max_model_len=64, kv_cache_bytes=1 << 28)
    client = LocalSyncClient([engine])
    out: dict = {"rows": []}
    version = 0
    for mode in ("full", "delta"):
        info = TrainerInitInfo(rank=0, host="127.0.0.1", num_receivers=1,
                               workers_per_replica=1, bucket_bytes=bucket_mib << 20,
                               dtype=torch.bfloat16, wire="gloo", timeout_s=600,
                               delta=mode == "delta")
        transfer = OwnersTrainerEngine.trainer_init(info, bundle, client=client)
        version += 1
        transfer.send_weights(version)  # warm-up (delta: the first sync is full)
        for fraction in (0.01, 0.45):
            runs = []
            for k in range(repeats):
                _perturb(bundle, fraction, seed=1000 * version + k)
                version += 1
                t = time.perf_counter()
                s = transfer.send_weights(version)
                dt = time.perf_counter() - t
                runs.append(dict(seconds=dt, bytes=s.bytes, dense=s.dense_bytes,
                                 changed=s.changed / s.elements if s.elements else None,
                                 wire_s=s.wire_s, gather_s=s.gather_s,
                                 phases=s.replicas[0].phases, kind=s.delta))
            out["rows"].append(dict(mode=mode, fraction=fraction, runs=runs,
                                    seconds=statistics.median(r["seconds"] for r in runs)))
        if mode == "delta":
            out["base_bytes"] = transfer._delta.nbytes
            out["mirror_bytes"] = engine._llm.collective_rpc(
                "megarlhf_weight_report")[0]["mirror_bytes"]
        transfer.shutdown()
    engine.close()
    return out


def delta_bench(args) -> None:
    sys.path.insert(0, ROOT)
    from megarlhf.platform.launch import run_distributed

    model_dir, _ = _make_model(args.model)
    r = run_distributed(_delta_rank, 1, model_dir, args.repeats, args.bucket_mib,
                        timeout=3600, daemon=False)[0]
    mib = 2**20
    print(f"\ndelta vs full sync, model {args.model}, one owner -> vLLM TP1 (CPU, bf16, gloo "
          f"loopback), median of {args.repeats}")
    print("| update | path | bf16 elements changed | bytes sent (MiB) | of a full sync | "
          "seconds | owner wire+encode s | vLLM wait / load / finish s |")
    print("|---|---|---|---|---|---|---|---|")
    for row in r["rows"]:
        runs = row["runs"]
        sent = statistics.median(x["bytes"] for x in runs)
        dense = runs[0]["dense"]
        ch = [x["changed"] for x in runs if x["changed"] is not None]
        ph = {k: statistics.median(x["phases"][k] for x in runs) for k in runs[0]["phases"]}
        print(f"| ~{row['fraction']:.0%} | {row['mode']} | "
              f"{(100 * statistics.median(ch)):.2f}% | " if ch else
              f"| ~{row['fraction']:.0%} | {row['mode']} | (not compared) | ", end="")
        print(f"{sent / mib:.1f} | {sent / dense:.3f} | {row['seconds']:.2f} | "
              f"{statistics.median(x['wire_s'] for x in runs):.2f} | "
              f"{ph.get('wait_s', 0):.2f} / {ph.get('load_s', 0):.2f} / "
              f"{ph.get('finish_s', 0):.2f} |")
    print(f"host copies: owner base {r['base_bytes'] / mib:.0f} MiB, vLLM worker mirror "
          f"{r['mirror_bytes'] / mib:.0f} MiB (the model in bf16: {runs[0]['dense'] / mib:.0f} "
          "MiB)")


def _make_model(name: str) -> tuple[str, int]:
    import torch

    sys.path.insert(0, ROOT)
    from megarlhf.models.tiny import build_hf_model, tiny_arch

    arch = tiny_arch("llama", **MODELS[name])
    model = build_hf_model(arch, seed=0).to(torch.bfloat16)
    d = tempfile.mkdtemp(prefix="bench-sync-")
    model.save_pretrained(d)
    largest = max(v.numel() * v.element_size() for v in model.state_dict().values())
    return d, largest


def _baseline_tree(ref: str) -> str:
    if os.path.isdir(ref):
        return os.path.abspath(ref)
    d = tempfile.mkdtemp(prefix="bench-sync-baseline-")
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", d, ref], check=True,
                   capture_output=True)
    return d


def _run(tree: str, args, model_dir: str) -> dict:
    env = dict(os.environ, PYTHONPATH=tree)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--model-dir", model_dir,
           "--repeats", str(args.repeats), "--bucket-mib", str(args.bucket_mib)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tree)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stderr[-6000:])
        raise SystemExit(f"the benchmark child in {tree} failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


def _report(name: str, r: dict, bound: int) -> None:
    med = statistics.median(x["seconds"] for x in r["rows"])
    mib = 2**20
    print(f"\n{name}: {r['tree']}")
    print(f"  sync {med:.2f} s median of {[round(x['seconds'], 2) for x in r['rows']]} "
          f"({r['total'] / mib:.0f} MiB; memcpy {r['memcpy']:.3f} s = "
          f"{100 * r['memcpy'] / med:.1f}% of the sync)")
    wc = [max(x["wchar"][i] for x in r["rows"]) for i in range(len(r["rows"][0]["wchar"]))]
    print("  bytes written per trainer rank (MiB): " + ", ".join(f"{w / mib:.0f}" for w in wc))
    if "sent" in r["rows"][0]:
        print("  own share put on its transfer group (MiB): "
              + ", ".join(f"{s / mib:.0f}" for s in r["rows"][0]["sent"]))
        ph = {k: statistics.median(x["phases"][k] for x in r["rows"])
              for k in r["rows"][0]["phases"]}
        print("  phases (s, median): " + ", ".join(f"{k} {v:.2f}" for k, v in ph.items()))
        print(f"  receive buffers per vLLM worker (MiB): "
              f"{max(x['buffers'] for x in r['rows']) / mib:.0f}")
    tp = [max(x["trainer_peak"][i] for x in r["rows"]) for i in range(len(wc))]
    wp = [max(x["worker_peak"][i] for x in r["rows"])
          for i in range(len(r["rows"][0]["worker_peak"]))]
    print("  peak extra private memory (MiB), trainer ranks: "
          + ", ".join(f"{p / mib:.0f}" for p in tp)
          + "; vLLM workers: " + ", ".join(f"{p / mib:.0f}" for p in wp)
          + f" (bound: bucket + largest tensor = {bound / mib:.0f})")


# A DeepSeek-V3-sized MoE in a family megarlhf loads (qwen3_moe: 60 layers, hidden 7168, 256
# routed experts of width 2048, top-8; ~680B parameters): the byte count and owner layout of a
# 671B-class sync, on 32 nodes of 8 H100 (PP4 x EP64 owners), rollout split on 16 more nodes.
DEEPSEEK_V3_SIZED = {
    "model_type": "qwen3_moe", "vocab_size": 129280, "hidden_size": 7168,
    "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_experts": 256,
    "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1,
    "mlp_only_layers": [], "num_hidden_layers": 60, "num_attention_heads": 128,
    "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 4096,
    "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "hidden_act": "silu", "attention_bias": False,
}


def cost_model() -> None:
    import glob

    sys.path.insert(0, ROOT)
    from megarlhf.config.base import from_dict
    from megarlhf.config.loader import load_config
    from megarlhf.config.schema import JobConfig
    from megarlhf.planning.plan import format_sync, make_plan

    jobs = [(os.path.relpath(p, ROOT), load_config(p))
            for p in sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))]
    jobs.append(("DeepSeek-V3-sized MoE (680B, PP4 x EP64 owners, 16 vLLM TP8 replicas, split)",
                 from_dict(JobConfig, {
                     "kind": "grpo",
                     "cluster": {"num_nodes": 48, "gpus_per_node": 8, "placement": "split"},
                     "actor": {"model": {"arch": DEEPSEEK_V3_SIZED, "dtype": "bf16"},
                               "parallel": {"tp": 8, "pp": 4, "ep": 64, "etp": 1,
                                            "sequence_parallel": True},
                               "num_gpus": 256},
                     "rollout": {"engine": "vllm", "tp": 8, "num_gpus": 128},
                     "batch": {"rollout_prompts_global": 256, "train_prompts_global": 256,
                               "n_samples_per_prompt": 8},
                     "algorithm": {"kl_coef": 0.0, "track_kl": False}})))  # no reference role
    for name, job in jobs:
        print(f"\n{name}")
        for line in format_sync(make_plan(job).sync):
            print("  " + line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="1b")
    ap.add_argument("--baseline", default=None, help="a commit or a directory of an older tree")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bucket-mib", type=int, default=512)
    ap.add_argument("--cost-model", action="store_true", help="print plan's cost model only")
    ap.add_argument("--delta", action="store_true",
                    help="delta sync against full sync at ~1%% and ~45%% changed elements")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(_child(args)), flush=True)
        return
    if args.cost_model:
        cost_model()
        return
    if args.delta:
        delta_bench(args)
        return
    model_dir, largest = _make_model(args.model)
    trees = [("this tree", ROOT)]
    if args.baseline:
        trees.insert(0, (f"baseline {args.baseline}", _baseline_tree(args.baseline)))
    results = {}
    for name, tree in trees:
        results[name] = _run(tree, args, model_dir)
        _report(name, results[name], args.bucket_mib * 2**20 + largest)
    if len(results) == 2:
        old, new = (statistics.median(x["seconds"] for x in r["rows"])
                    for r in results.values())
        print(f"\nspeed-up of this tree over the baseline: {old / new:.2f}x")


if __name__ == "__main__":
    main()
