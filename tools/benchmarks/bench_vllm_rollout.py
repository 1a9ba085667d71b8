#!/usr/bin/env python
"""Benchmark: the vLLM rollout engine (vLLM's CPU build here) against the transformers engine,
and weight sync into vLLM against memcpy. Everything is measured side by side in one run.

* generation: the same prompts, sampling parameters and weights through
  ``VLLMRolloutEngine`` and ``HFRolloutEngine``; generated tokens per second, median of
  ``--repeats`` calls after one warm-up call.
* weight sync: ``VLLMRolloutEngine.update_weights`` streaming the model's HF-named tensors
  (held by this process: the single-owner case of megarlhf's weight-transfer backend, a gloo
  group between this process and vLLM's worker) in buckets of ``--bucket-mib``; HF bytes per
  second (median), against a warm memcpy of the same bytes in bucket-sized copies; each bucket
  size in turn on the same engine, after one warm-up update. Peak extra memory: a separate
  process samples ``/proc/<pid>/status`` every 2 ms during each update, private (``RssAnon``)
  and shared-memory (``RssShmem``) pages apart, for this process (packing; vLLM's engine core
  runs in it on CPU) and for vLLM's worker process (receiving, loading). The Megatron trainer
  into several replicas is ``bench_weight_sync.py``.

    python tools/benchmarks/bench_vllm_rollout.py --model demo   # the demo's model and batch
    python tools/benchmarks/bench_vllm_rollout.py --model 1b     # a ~1B llama, bf16
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

MODELS = {
    # The demo's policy (megarlhf/demo/sft.yaml) and rollout batch: 64 prompts x 4 x 40 tokens.
    "demo": dict(arch=dict(vocab_size=64, hidden_size=64, num_layers=2, num_heads=2,
                           num_kv_heads=2, ffn=256, max_pos=128),
                 dtype="float32", prompts=64, n=4, prompt_len=24, new_tokens=40),
    # llama-shaped, 1.03B parameters (as the resharder benchmark), bf16.
    "1b": dict(arch=dict(vocab_size=32000, hidden_size=2048, num_layers=20, num_heads=16,
                         num_kv_heads=4, ffn=5632, max_pos=1024),
               dtype="bfloat16", prompts=8, n=2, prompt_len=64, new_tokens=32),
}


# A separate process samples the resident set of the caller and the vLLM worker every 2 ms
# (a thread of the caller would not run while it copies): private (RssAnon) and shared-memory
# (RssShmem) pages apart, since a shared-memory bucket is the same physical pages in both.
_SAMPLER = r"""
import signal, sys, time
pids = [int(p) for p in sys.argv[1:]]
keys = ("RssAnon", "RssShmem")
def read(pid):
    d = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k = line.split(":")[0]
            if k in keys:
                d[k] = int(line.split()[1]) * 1024
    return d
base = {p: read(p) for p in pids}
peak = {p: dict(v) for p, v in base.items()}
def done(*_):
    print({p: {k: peak[p][k] - base[p][k] for k in keys} for p in pids}, flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, done)
print("ready", flush=True)
while True:
    for p in pids:
        for k, v in read(p).items():
            if v > peak[p][k]:
                peak[p][k] = v
    time.sleep(0.002)
"""


def _sampled(pids, fn):
    """Runs ``fn()`` while sampling ``pids``; ``(result, {pid: {RssAnon, RssShmem}})`` with
    each the peak minus the value before."""
    import ast
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", _SAMPLER, *map(str, pids)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    try:
        result = fn()
    finally:
        time.sleep(0.05)
        proc.terminate()
    return result, ast.literal_eval(proc.communicate()[0].strip())


def _worker_pids() -> list[int]:
    import psutil

    return [p.pid for p in psutil.Process().children(recursive=True)
            if "Worker" in p.name() or "VLLM" in p.name()]


def _save_model(spec, seed=0):
    from megarlhf.models.tiny import build_hf_model, tiny_arch

    arch = tiny_arch("llama", **spec["arch"])
    model = build_hf_model(arch, seed=seed).to(getattr(torch, spec["dtype"]))
    d = tempfile.mkdtemp(prefix="bench-vllm-")
    model.save_pretrained(d)
    return d, model


def bench_generate(spec, model_dir, repeats):
    from megarlhf.rollout import SamplingParams
    from megarlhf.rollout.hf_engine import HFRolloutEngine
    from megarlhf.rollout.vllm_engine import VLLMRolloutEngine

    g = torch.Generator().manual_seed(0)
    vocab = spec["arch"]["vocab_size"]
    prompts = [torch.randint(3, vocab, (spec["prompt_len"],), generator=g).tolist()
               for _ in range(spec["prompts"])]
    params = [SamplingParams(n=spec["n"], temperature=1.0, max_new_tokens=spec["new_tokens"],
                             seed=s) for s in range(repeats + 1)]
    out = {}
    for kind in ("vllm", "hf"):
        t = time.perf_counter()
        if kind == "vllm":
            eng = VLLMRolloutEngine.create(model_dir, dtype=spec["dtype"],
                                           max_model_len=spec["prompt_len"] + spec["new_tokens"])
        else:
            eng = HFRolloutEngine(model=model_dir, device="cpu",
                                  dtype=getattr(torch, spec["dtype"]))
        start = time.perf_counter() - t
        rates = []
        for i, p in enumerate(params):
            t = time.perf_counter()
            res = eng.generate(prompts, p)
            dt = time.perf_counter() - t
            if i:  # the first call warms up
                rates.append(sum(len(s.token_ids) for o in res for s in o.samples) / dt)
        out[kind] = dict(start_s=start, tok_s=statistics.median(rates), rates=rates)
        eng.close()
        del eng
    return out


def bench_sync(spec, model_dir, model, bucket_mib, repeats):
    from megarlhf.rollout.vllm_engine import VLLMRolloutEngine

    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    total = sum(v.numel() * v.element_size() for v in sd.values())
    largest = max(v.numel() * v.element_size() for v in sd.values())
    eng = VLLMRolloutEngine.create(model_dir, dtype=spec["dtype"],
                                   max_model_len=spec["prompt_len"] + spec["new_tokens"])
    workers = _worker_pids()
    rows = []
    for mib in bucket_mib:
        eng.weight_bucket_bytes = mib * 2**20
        eng.update_weights(iter(sd.items()))  # warm-up: first-update costs, the rendezvous
        times, peaks = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            stats, peak = _sampled([os.getpid(), *workers],
                                   lambda: eng.update_weights(iter(sd.items())))
            times.append(time.perf_counter() - t)
            assert stats.bytes >= total and stats.missing == (), stats
            peaks.append(peak)
        me = os.getpid()

        def worst(key, caller, peaks=peaks, me=me):
            return max(p[me][key] if caller else max(p[w][key] for w in workers)
                       for p in peaks)

        # memcpy of the same bytes in bucket-sized copies into one warm buffer
        n = min(mib * 2**20, total)
        src = torch.empty(n, dtype=torch.uint8).random_()
        dst = torch.empty(n, dtype=torch.uint8)
        dst.copy_(src)
        mc = []
        for _ in range(repeats):
            t = time.perf_counter()
            left = total
            while left > 0:
                k = min(n, left)
                dst[:k].copy_(src[:k])
                left -= k
            mc.append(time.perf_counter() - t)
        del src, dst
        rows.append(dict(bucket_mib=mib, time=statistics.median(times),
                         memcpy=statistics.median(mc),
                         caller_anon=worst("RssAnon", True), caller_shm=worst("RssShmem", True),
                         worker_anon=worst("RssAnon", False),
                         worker_shm=worst("RssShmem", False)))
    eng.close()
    return dict(total=total, largest=largest, rows=rows, workers=len(workers))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="demo")
    ap.add_argument("--what", choices=["all", "generate", "sync"], default="all")
    ap.add_argument("--bucket-mib", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    spec = MODELS[args.model]
    t0 = time.perf_counter()
    model_dir, model = _save_model(spec)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {args.model}: llama, {n_params / 1e6:.1f}M parameters, {spec['dtype']}; "
          f"torch {torch.__version__}; {os.cpu_count()} cores; load "
          f"{os.getloadavg()[0]:.1f}")
    if args.what in ("all", "generate"):
        g = bench_generate(spec, model_dir, args.repeats)
        print(f"\ngeneration: {spec['prompts']} prompts x {spec['n']} samples x "
              f"{spec['new_tokens']} new tokens (prompt {spec['prompt_len']} tokens), T=1, "
              f"median of {args.repeats} calls after a warm-up\n")
        print("| engine | start (s) | tokens/s (median) | calls |")
        print("|---|---|---|---|")
        for kind in ("vllm", "hf"):
            r = g[kind]
            print(f"| {kind} | {r['start_s']:.1f} | {r['tok_s']:.0f} | "
                  f"{', '.join(f'{x:.0f}' for x in r['rates'])} |")
        print(f"\nvLLM / transformers: {g['vllm']['tok_s'] / g['hf']['tok_s']:.2f}x")
    if args.what in ("all", "sync"):
        s = bench_sync(spec, model_dir, model, args.bucket_mib, args.repeats)
        mib = 2**20
        print(f"\nweight sync into vLLM (TP1, {s['workers']} worker process): "
              f"{s['total'] / mib:.1f} MiB of HF tensors, largest {s['largest'] / mib:.1f} MiB\n")
        print("| bucket | median time (s) | GB/s | vs memcpy (warm) | peak extra "
              "MiB, caller: private + shared | vLLM worker: private + shared | bound: bucket + "
              "largest (MiB) |")
        print("|---|---|---|---|---|---|---|")
        for r in s["rows"]:
            b = min(r["bucket_mib"] * mib, s["total"])
            print(f"| {r['bucket_mib']} MiB | {r['time']:.3f} | {s['total'] / r['time'] / 1e9:.2f} "
                  f"| {r['memcpy'] / r['time']:.3f} | {r['caller_anon'] / mib:.0f} + "
                  f"{r['caller_shm'] / mib:.0f} | {r['worker_anon'] / mib:.0f} + "
                  f"{r['worker_shm'] / mib:.0f} | {(b + s['largest']) / mib:.0f} |")
    print(f"\nwhole run {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
