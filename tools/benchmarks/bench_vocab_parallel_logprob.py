"""Benchmark (not a test): vocab-parallel log-prob + entropy vs a naive full-vocab log_softmax.

Forward + backward of ``loss = sum(w1 * logp + w2 * H)`` w.r.t. the logits, for one large
vocabulary on CPU, comparing

* ``naive``:  ``log_softmax(logits.float() / T)`` over the full vocabulary, ``gather`` of the
  target, entropy ``-(exp(logprobs) * logprobs).sum(-1)``; autograd saves the full fp32 tensors;
* ``vp_tp1``: :func:`megarlhf.engine.vocab_parallel.vocab_parallel_logprobs_entropy` with no TP
  group (chunked fp32 work, only per-token statistics saved);
* ``vp_tp2`` (``--tp2``): the same function on 2 gloo ranks, each holding half the vocabulary
  (1 thread per rank, so the two ranks together use the same 2 cores).

Memory: each variant runs in a fresh process (a fresh rank process for ``vp_tp2``). The input
logits are created first; then ``peak = ru_maxrss after the first forward+backward - RSS just
before it`` (``ru_maxrss`` is the kernel's exact resident-set high-water mark, no sampling;
RSS from psutil). It therefore counts everything the step allocates on top of the input
logits: fp32 work buffers, tensors saved for backward, and the gradient of the logits. The
script checks that the high-water mark rose during the step (so the peak is the step's, not an
earlier one such as the imports'; a "(?)" marks a figure where it did not). Time: median of ``--repeats`` forward+backward passes after one warm-up.

Usage::

    python tools/benchmarks/bench_vocab_parallel_logprob.py --vocab 152064 --seq 4096 \\
        --dtypes fp32 bf16 --repeats 3 --tp2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

GiB = 1024 ** 3


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _make_inputs(seq, batch, vocab_cols, vocab_total, dtype_name, seed=0):
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    g = torch.Generator().manual_seed(seed)
    logits = torch.empty(batch, seq, vocab_cols, dtype=dtype)
    for s in range(0, seq, 256):  # fill in slices so no full-size fp32 temporary exists
        logits[:, s:s + 256] = torch.randn(batch, min(256, seq - s), vocab_cols, generator=g)
    target = torch.randint(0, vocab_total, (batch, seq), generator=g)
    w1, w2 = torch.rand(batch, seq, generator=g), torch.rand(batch, seq, generator=g)
    return logits, target, w1, w2


def _step(variant, logits, target, w1, w2, temperature, tp_group=None, vocab_size=None):
    import torch

    from megarlhf.engine.vocab_parallel import vocab_parallel_logprobs_entropy

    x = logits.requires_grad_()
    x.grad = None
    t0 = time.perf_counter()
    if variant == "naive":
        z = x.float()
        if temperature != 1.0:
            z = z / temperature
        logprobs = torch.log_softmax(z, dim=-1)  # (B, S, V) fp32
        logp = logprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        entropy = -(logprobs.exp() * logprobs).sum(-1)
    else:
        logp, entropy = vocab_parallel_logprobs_entropy(x, target, tp_group,
                                                        temperature=temperature,
                                                        vocab_size=vocab_size)
    t1 = time.perf_counter()
    (w1 * logp + w2 * entropy).sum().backward()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t0


def _measure(variant, logits, target, w1, w2, temperature, repeats, **kw):
    import gc

    gc.collect()
    rss0 = _rss()
    maxrss_before = _maxrss()
    _step(variant, logits, target, w1, w2, temperature, **kw)  # first pass: memory, warm-up
    maxrss_after = _maxrss()
    peak = maxrss_after - rss0
    fwd, total = [], []
    for _ in range(repeats):
        logits.grad = None
        f, t = _step(variant, logits, target, w1, w2, temperature, **kw)
        fwd.append(f)
        total.append(t)
    return {"peak_bytes": peak, "input_bytes": logits.numel() * logits.element_size(),
            "rss_before": rss0, "maxrss_before": maxrss_before,
            # the high-water mark moved during the step, so it is the step's own peak
            "peak_valid": maxrss_after > maxrss_before,
            "fwd_s": statistics.median(fwd), "fwd_bwd_s": statistics.median(total)}


def _worker(args):
    import torch

    torch.set_num_threads(args.threads)
    logits, target, w1, w2 = _make_inputs(args.seq, args.batch, args.vocab, args.vocab,
                                          args.dtype)
    res = _measure(args.variant, logits, target, w1, w2, args.temperature, args.repeats)
    print("RESULT " + json.dumps(res))


def _tp2_rank(seq, batch, vocab, dtype_name, temperature, repeats):
    import torch
    import torch.distributed as dist

    rank = dist.get_rank()
    vp = -(-vocab // 2)  # columns per rank; megatron pads the vocabulary to a multiple of tp
    logits, target, w1, w2 = _make_inputs(seq, batch, vp, vocab, dtype_name, seed=0)
    if rank == 1:  # different columns than rank 0; targets and weights are seeded identically
        logits.copy_(_make_inputs(seq, batch, vp, vocab, dtype_name, seed=1)[0])
    group = dist.new_group([0, 1])
    dist.barrier()
    torch.set_num_threads(1)
    return _measure("vp", logits, target, w1, w2, temperature, repeats, tp_group=group,
                    vocab_size=vocab)


def _worker_tp2(args):
    from megarlhf.platform.launch import run_distributed

    res = run_distributed(_tp2_rank, 2, args.seq, args.batch, args.vocab, args.dtype,
                          args.temperature, args.repeats, timeout=3600, threads_per_rank=1)
    out = dict(res[0])
    out["peak_bytes"] = max(r["peak_bytes"] for r in res)  # per rank
    out["peak_valid"] = all(r["peak_valid"] for r in res)
    out["fwd_s"] = max(r["fwd_s"] for r in res)
    out["fwd_bwd_s"] = max(r["fwd_bwd_s"] for r in res)
    print("RESULT " + json.dumps(out))


def _run_child(argv):
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv],
                          capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=152064)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--tp2", action="store_true", help="also run TP=2 on 2 gloo ranks")
    p.add_argument("--worker", choices=["naive", "vp_tp1", "vp_tp2"], help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        args.variant = "naive" if args.worker == "naive" else "vp"
        (_worker_tp2 if args.worker == "vp_tp2" else _worker)(args)
        return

    common = ["--vocab", str(args.vocab), "--seq", str(args.seq), "--batch", str(args.batch),
              "--temperature", str(args.temperature), "--repeats", str(args.repeats),
              "--threads", str(args.threads)]
    variants = ["naive", "vp_tp1"] + (["vp_tp2"] if args.tp2 else [])
    rows = []
    for dtype in args.dtypes:
        for variant in variants:
            res = _run_child(["--worker", variant, "--dtype", dtype, *common])
            rows.append((dtype, variant, res))
            print(f"# {dtype} {variant}: {res}", file=sys.stderr, flush=True)

    print(f"\nV={args.vocab}, seq={args.seq}, batch={args.batch}, T={args.temperature}, "
          f"threads={args.threads}, repeats={args.repeats} (median), forward+backward\n")
    print("| logits dtype | variant | peak extra memory (GiB) | vs naive | forward (s) "
          "| forward+backward (s) | vs naive |")
    print("|---|---|---|---|---|---|---|")
    for dtype in args.dtypes:
        base = next((r for d, v, r in rows if d == dtype and v == "naive" and "error" not in r),
                    None)
        for d, variant, r in rows:
            if d != dtype:
                continue
            if "error" in r:
                print(f"| {d} | {variant} | failed: {r['error']} | | | | |")
                continue
            mem = r["peak_bytes"] / GiB
            flag = "" if r["peak_valid"] else " (?)"
            mem_ratio = f"{base['peak_bytes'] / r['peak_bytes']:.1f}x less" if base else ""
            t_ratio = f"{base['fwd_bwd_s'] / r['fwd_bwd_s']:.2f}x faster" if base else ""
            if variant == "naive":
                mem_ratio = t_ratio = "1"
            per = " per rank" if variant == "vp_tp2" else ""
            print(f"| {d} | {variant} | {mem:.2f}{per}{flag} | {mem_ratio} | {r['fwd_s']:.2f} "
                  f"| {r['fwd_bwd_s']:.2f} | {t_ratio} |")
    print(f"\ninput logits: fp32 {args.batch * args.seq * args.vocab * 4 / GiB:.2f} GiB, "
          f"bf16 {args.batch * args.seq * args.vocab * 2 / GiB:.2f} GiB (not counted above)")


if __name__ == "__main__":
    main()
