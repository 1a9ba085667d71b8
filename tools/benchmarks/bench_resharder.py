#!/usr/bin/env python
"""Benchmark: the resharder (megatron TP/PP shards -> HF full tensors on one rank) vs memcpy.

A llama-shaped model (default: hidden 2048, 20 layers, GQA 16/4 heads, MLP 5632, vocab 32000:
1.03B parameters) is built at TP2/PP2 on 4 gloo ranks with bf16 parameters filled with random
values (no HF checkpoint needed). Measured in one run, on the same machine:

* reshard: ``iter_hf_weights(bucket_bytes=B, dtype=bf16)`` end to end, HF bytes delivered to
  rank 0 per second (median of ``--repeats``), with ``reuse_buffer`` on (weight sync, export)
  and off (fresh tensors per bucket);
* memcpy: rank 0 copying the same number of bytes, in bucket-sized ``copy_`` calls, into a warm
  preallocated buffer (the machine's copy bandwidth) and into freshly allocated buffers (what
  page faults cost);
* peak extra memory per rank: the kernel's resident-set high-water mark (``VmHWM``, reset
  through ``/proc/self/clear_refs`` before each pass) minus the RSS before the pass, with
  glibc set to serve every allocation >= 64 KiB by its own mmap (so freed memory leaves the
  resident set at once and this difference is the peak of live extra buffers).

    python tools/benchmarks/bench_resharder.py                 # the 1B model, TP2/PP2
    python tools/benchmarks/bench_resharder.py --layers 4 --hidden 512 --vocab 8000  # quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megarlhf.platform.launch import run_distributed  # noqa: E402


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> int:
    """Resets the RSS high-water mark; returns the current RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS") * 1024


def _peak_delta(rss_before: int) -> int:
    return _status_kib("VmHWM") * 1024 - rss_before


def _exact_rss_accounting() -> None:
    """Makes every allocation >= 64 KiB its own mmap, unmapped on free (glibc ``mallopt``).

    Then the resident set follows the live large buffers exactly: no reuse of freed heap pages
    hides an allocation, and no fragmentation inflates one, so VmHWM - RSS is the peak of the
    extra memory.
    """
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 64 * 1024)
    libc.mallopt(m_trim_threshold, 64 * 1024)


def rank_bench(arch, tp, pp, bucket_sizes, repeats):
    _exact_rss_accounting()
    from megarlhf.config.schema import ModelConfig
    from megarlhf.models.builder import build_model
    from megarlhf.parallel.layout import ParallelLayout, initialize_parallel
    from megarlhf.weights.resharder import iter_hf_weights, plan_hf_weights

    dist = torch.distributed
    rank = dist.get_rank()
    t0 = time.perf_counter()
    ctx = initialize_parallel(ParallelLayout.for_world(dist.get_world_size(), tp=tp, pp=pp))
    bundle = build_model(ModelConfig(arch=arch, dtype="bf16"), ctx, init_weights=False)
    g = torch.Generator().manual_seed(rank)
    n_local = 0
    with torch.no_grad():
        for chunk in bundle.unwrapped():
            for p in chunk.parameters():
                p.data = torch.empty(p.shape, dtype=torch.bfloat16).uniform_(-1, 1, generator=g)
                n_local += p.numel()
    build_s = time.perf_counter() - t0
    dist.barrier()
    t0 = time.perf_counter()
    plan = plan_hf_weights(bundle)
    plan_s = time.perf_counter() - t0
    dtype = torch.bfloat16
    total = plan.total_bytes(dtype)
    out = {"rank": rank, "local_params": n_local, "build_s": build_s, "plan_s": plan_s,
           "hf_bytes": total, "largest_bytes": plan.largest_bytes(dtype),
           "n_params": sum(e.numel for e in plan.entries), "reshard": {}}
    for bb in bucket_sizes:
        for reuse in (True, False):
            times, peaks = [], []
            for _ in range(repeats):
                dist.barrier()
                rss = _reset_peak()
                t = time.perf_counter()
                got = 0
                for bucket in iter_hf_weights(bundle, bucket_bytes=bb, dtype=dtype, plan=plan,
                                              reuse_buffer=reuse):
                    got += sum(x.numel() * x.element_size() for _, x in bucket)
                    del bucket
                times.append(time.perf_counter() - t)
                peaks.append(_peak_delta(rss))
                if rank == 0:
                    assert got == total, (got, total)
                dist.barrier()
            out["reshard"][(bb, reuse)] = {"times": times, "peaks": peaks}
    # The transport alone: each rank sends rank 0 a 1/world share of the same bytes as raw
    # bucket-sized messages into warm buffers (rank 0 copies its own share). "all": every rank
    # at once; "by stage": one pipeline stage after the other, as a stream in HF order (layers
    # ascending) is served.
    world = dist.get_world_size()
    out["gloo"] = {}
    for bb in bucket_sizes:
        share = total // world
        n = min(bb, share)
        if rank == 0:
            bufs = torch.empty(world, n, dtype=torch.uint8)
        src = torch.empty(n, dtype=torch.uint8).random_(generator=g)
        for mode in ("all", "by stage"):
            groups = [list(range(world))] if mode == "all" else \
                [[r for r in range(world) if r // tp == s] for s in range(pp)]  # ranks of stage s
            times = []
            for _ in range(repeats):
                dist.barrier()
                t = time.perf_counter()
                for senders in groups:
                    left = share
                    while left > 0:
                        k = min(n, left)
                        if rank == 0:
                            works = [dist.irecv(bufs[r, :k], r) for r in senders if r != 0]
                            if 0 in senders:
                                bufs[0, :k].copy_(src[:k])
                            for w in works:
                                w.wait()
                        elif rank in senders:
                            dist.send(src[:k], 0)
                        left -= k
                times.append(time.perf_counter() - t)
                dist.barrier()
            out["gloo"][(bb, mode)] = times
    if rank == 0:  # the same bytes copied by rank 0, alone, right after
        dist.barrier()
        out["memcpy"] = {}
        for bb in bucket_sizes:
            n = min(bb, total)
            src = torch.empty(n, dtype=torch.uint8).random_(generator=g)
            warm = torch.empty(n, dtype=torch.uint8)
            warm.copy_(src)
            for mode in ("warm", "fresh"):
                times = []
                for _ in range(repeats):
                    t = time.perf_counter()
                    left = total
                    while left > 0:
                        k = min(n, left)
                        dst = warm if mode == "warm" else torch.empty(n, dtype=torch.uint8)
                        dst[:k].copy_(src[:k])
                        del dst
                        left -= k
                    times.append(time.perf_counter() - t)
                out["memcpy"][(bb, mode)] = times
            del src, warm
    else:
        dist.barrier()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--bucket-mib", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--json", help="also write the raw results here")
    args = ap.parse_args(argv)

    from megarlhf.models.tiny import tiny_arch

    arch = tiny_arch("llama", vocab_size=args.vocab, hidden_size=args.hidden,
                     num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
                     ffn=args.ffn, max_pos=4096)
    buckets = [m * 2**20 for m in args.bucket_mib]
    t = time.perf_counter()
    res = run_distributed(rank_bench, args.tp * args.pp, arch, args.tp, args.pp, buckets,
                          args.repeats, timeout=args.timeout)
    wall = time.perf_counter() - t
    r0 = res[0]
    total, largest = r0["hf_bytes"], r0["largest_bytes"]
    gib = 2**30
    print(f"model: llama-shaped, {r0['n_params'] / 1e9:.3f}B parameters, hidden {args.hidden}, "
          f"{args.layers} layers, heads {args.heads}/{args.kv_heads}, MLP {args.ffn}, vocab "
          f"{args.vocab}; TP{args.tp}/PP{args.pp} on {args.tp * args.pp} gloo ranks, bf16 "
          f"parameters and output")
    print(f"HF bytes delivered to rank 0 per pass: {total / gib:.3f} GiB; largest tensor "
          f"{largest / 2**20:.0f} MiB; build {max(r['build_s'] for r in res):.1f} s, plan "
          f"{max(r['plan_s'] for r in res) * 1e3:.0f} ms; whole run {wall:.0f} s\n")
    print("| bucket | variant | median time (s) | GB/s (HF bytes to dst) | vs memcpy (warm) "
          "| peak extra memory per rank (MiB): r0 (dst), r1, r2, r3 | bound: bucket + largest "
          "(MiB) |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for bb in buckets:
        warm = statistics.median(r0["memcpy"][(bb, "warm")])
        fresh = statistics.median(r0["memcpy"][(bb, "fresh")])
        bound = (bb + largest) / 2**20
        for reuse in (True, False):
            tm = statistics.median(max(r["reshard"][(bb, reuse)]["times"][i] for r in res)
                                   for i in range(args.repeats))
            peaks = [max(r["reshard"][(bb, reuse)]["peaks"]) / 2**20 for r in res]
            name = "reshard, reuse_buffer" if reuse else "reshard, fresh tensors"
            print(f"| {bb // 2**20} MiB | {name} | {tm:.2f} | {total / tm / 1e9:.2f} | "
                  f"{warm / tm:.2f} | {', '.join(f'{p:.0f}' for p in peaks)} | {bound:.0f} |")
            rows.append(dict(bucket=bb, variant=name, time=tm, peaks=peaks))
        for mode in ("all", "by stage"):
            tg = statistics.median(max(r["gloo"][(bb, mode)][i] for r in res)
                                   for i in range(args.repeats))
            print(f"| {bb // 2**20} MiB | transport only: gloo send/recv of the same bytes, "
                  f"{'all ranks at once' if mode == 'all' else 'one stage at a time'} | "
                  f"{tg:.2f} | {total / tg / 1e9:.2f} | {warm / tg:.2f} | | |")
        print(f"| {bb // 2**20} MiB | memcpy into a warm buffer (rank 0) | {warm:.2f} | "
              f"{total / warm / 1e9:.2f} | 1 | | |")
        print(f"| {bb // 2**20} MiB | memcpy into fresh buffers (rank 0) | {fresh:.2f} | "
              f"{total / fresh / 1e9:.2f} | {warm / fresh:.2f} | | |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "hf_bytes": total,
                       "largest": largest}, f, indent=2)


if __name__ == "__main__":
    main()
