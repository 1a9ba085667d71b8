#!/usr/bin/env python
"""Benchmark: mixture-of-experts on CPU (gloo) - training tokens/s at EP1 vs EP2, and the
resharder's GB/s for an MoE model vs a dense model of equal bytes.

Everything runs in one invocation, side by side on the same machine (medians of ``--repeats``):

* training: a tiny Qwen3-MoE (default: hidden 128, 4 layers, 8 experts of width 256, top-2,
  vocab 1024; fp32) - one SGD step on ``--seqs`` sequences of ``--seq-len`` tokens, micro-batches
  of 4 sequences, at 1 rank (EP1), 2 ranks DP2/EP1 (every rank holds every expert) and 2 ranks
  DP2/EP2 (each rank holds half the experts; tokens travel to them through the alltoall
  dispatcher). tokens/s = tokens of the global batch / step time (the slowest rank's). One
  intra-op thread per rank.
* resharder: ``iter_hf_weights`` (bf16 out, ``reuse_buffer``) delivering the whole model to
  rank 0 on 4 ranks: an MoE model at PP2/EP2 (DP2) and a dense llama-shaped model of the same
  bytes at PP2/DP2 (same hidden, layers, attention and vocabulary; its MLP width chosen so the
  parameter counts match). GB/s = HF bytes delivered / time (the first pass, which allocates
  the reused buffer, is not timed). Peak extra memory per rank as in ``bench_resharder.py``
  (VmHWM minus RSS, exact mmap accounting), max over all passes including the first.

    python tools/benchmarks/bench_moe.py
    python tools/benchmarks/bench_moe.py --repeats 3 --json out.json
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from megarlhf.platform.launch import run_distributed  # noqa: E402


def rank_train(arch, ep, seqs, seq_len, repeats):
    from megarlhf.config.schema import ModelConfig, OptimizerConfig
    from megarlhf.engine.batch import TokenBatch
    from megarlhf.engine.engine import MegatronEngine
    from megarlhf.models.builder import build_model
    from megarlhf.parallel.layout import ParallelLayout, initialize_parallel

    world = torch.distributed.get_world_size()
    ctx = initialize_parallel(ParallelLayout.for_world(world, ep=ep, etp=1))
    bundle = build_model(ModelConfig(arch=arch, dtype="fp32"), ctx, for_training=True,
                         use_distributed_optimizer=False)
    eng = MegatronEngine(bundle, OptimizerConfig(name="sgd", lr=1e-3, clip_grad=0.0,
                                                 use_distributed_optimizer=False),
                         micro_batch_size=4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, arch["vocab_size"], (seqs, seq_len), generator=g)
    batch = TokenBatch(ids, torch.ones_like(ids, dtype=torch.bool)).shard(ctx.dp_rank,
                                                                        ctx.layout.dp)
    n = seqs * seq_len

    def loss_fn(out, mb):
        loss = -out["logp"].sum() / n
        return loss, {"loss": loss.detach()}

    eng.train_step(batch, loss_fn)  # warm-up
    times = []
    for _ in range(repeats):
        torch.distributed.barrier()
        t = time.perf_counter()
        eng.train_step(batch, loss_fn)
        times.append(time.perf_counter() - t)
    return times


def rank_reshard(arch, pp, ep, bucket_bytes, repeats):
    from bench_resharder import _exact_rss_accounting, _peak_delta, _reset_peak

    _exact_rss_accounting()
    from megarlhf.config.schema import ModelConfig
    from megarlhf.models.builder import build_model
    from megarlhf.parallel.layout import ParallelLayout, initialize_parallel
    from megarlhf.weights.resharder import iter_hf_weights, plan_hf_weights

    dist = torch.distributed
    rank = dist.get_rank()
    ctx = initialize_parallel(ParallelLayout.for_world(dist.get_world_size(), pp=pp, ep=ep,
                                                       etp=1))
    bundle = build_model(ModelConfig(arch=arch, dtype="bf16"), ctx, init_weights=False)
    g = torch.Generator().manual_seed(rank)
    with torch.no_grad():
        for chunk in bundle.unwrapped():
            for p in chunk.parameters():
                p.data = torch.empty(p.shape, dtype=torch.bfloat16).uniform_(-1, 1, generator=g)
    plan = plan_hf_weights(bundle)
    total = plan.total_bytes(torch.bfloat16)
    times, peaks = [], []
    for _ in range(repeats + 1):  # the first pass (page faults of the reused buffer) dropped
        dist.barrier()
        rss = _reset_peak()
        t = time.perf_counter()
        got = 0
        for bucket in iter_hf_weights(bundle, bucket_bytes=bucket_bytes, dtype=torch.bfloat16,
                                      plan=plan, reuse_buffer=True):
            got += sum(x.numel() * x.element_size() for _, x in bucket)
            del bucket
        times.append(time.perf_counter() - t)
        peaks.append(_peak_delta(rss))
        if rank == 0:
            assert got == total
        dist.barrier()
    # Peaks over every pass: the first one allocates the reused bucket buffer.
    return {"times": times[1:], "peaks": peaks, "hf_bytes": total,
            "tensors": len(plan.entries), "largest": plan.largest_bytes(torch.bfloat16),
            "params": sum(e.numel for e in plan.entries)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--bucket-mib", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--json", help="also write the raw results here")
    args = ap.parse_args(argv)

    from megarlhf.models.tiny import tiny_arch

    out = {"train": {}, "reshard": {}}
    # ---- training tokens/s
    train_arch = tiny_arch("qwen3_moe", vocab_size=1024, hidden_size=128, num_layers=4,
                           max_pos=512, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=32, num_experts=8, moe_intermediate_size=256,
                           num_experts_per_tok=2)
    tokens = args.seqs * args.seq_len
    rows = []
    for name, world, ep in (("EP1, 1 rank", 1, 1), ("DP2/EP1, 2 ranks", 2, 1),
                            ("DP2/EP2, 2 ranks", 2, 2)):
        # One intra-op thread per rank everywhere: on a shared 2-core box two OpenMP threads
        # in one process stall each other (the 1-rank run measured 3-10 s a step with 2).
        res = run_distributed(rank_train, world, train_arch, ep, args.seqs, args.seq_len,
                              args.repeats, timeout=args.timeout, threads_per_rank=1)
        t = statistics.median(max(r[i] for r in res) for i in range(args.repeats))
        out["train"][name] = {"median_s": t, "tokens_per_s": tokens / t}
        rows.append((name, t, tokens / t))
    print(f"training: tiny Qwen3-MoE (hidden 128, 4 layers, 8 experts x 256, top-2, vocab "
          f"1024, fp32), one SGD step on {args.seqs} x {args.seq_len} tokens, micro-batches of "
          "4 sequences, alltoall dispatcher, gloo")
    print("| layout | median step (s) | tokens/s |")
    print("|---|---|---|")
    for name, t, tps in rows:
        print(f"| {name} | {t:.3f} | {tps:.0f} |")

    # ---- resharder: MoE vs dense of equal bytes
    h, L, E, F, V = 512, 8, 32, 384, 8000
    moe_arch = tiny_arch("qwen3_moe", vocab_size=V, hidden_size=h, num_layers=L, max_pos=512,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                         num_experts=E, moe_intermediate_size=F, num_experts_per_tok=2)
    # A dense layer matching an MoE layer's experts + router: 3*h*Fd = 3*h*F*E + E*h (and the
    # qk-norms, 2*64 per layer, via qwen3).
    Fd = round((3 * h * F * E + E * h) / (3 * h))
    dense_arch = tiny_arch("qwen3", vocab_size=V, hidden_size=h, num_layers=L, max_pos=512,
                           num_heads=8, num_kv_heads=4, ffn=Fd, head_dim=64)
    bb = args.bucket_mib * 2**20
    print()
    rrows = []
    for name, arch, ep in (("MoE, PP2/EP2 (DP2)", moe_arch, 2), ("dense, PP2/DP2", dense_arch, 1)):
        res = run_distributed(rank_reshard, 4, arch, 2, ep, bb, args.repeats,
                              timeout=args.timeout)
        t = statistics.median(max(r["times"][i] for r in res) for i in range(args.repeats))
        r0 = res[0]
        peaks = [max(r["peaks"]) / 2**20 for r in res]
        out["reshard"][name] = {"median_s": t, "gb_per_s": r0["hf_bytes"] / t / 1e9,
                                "hf_bytes": r0["hf_bytes"], "tensors": r0["tensors"],
                                "largest": r0["largest"], "params": r0["params"],
                                "peaks_mib": peaks}
        rrows.append((name, r0, t, peaks))
    print(f"resharder: iter_hf_weights to rank 0 on 4 gloo ranks, bf16, reuse_buffer, bucket "
          f"{args.bucket_mib} MiB")
    print("| model | parameters | HF tensors | largest (MiB) | median time (s) | GB/s | peak "
          "extra memory per rank (MiB): r0 (dst), r1, r2, r3 | bound: bucket + largest (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r0, t, peaks in rrows:
        print(f"| {name} | {r0['params'] / 1e6:.1f}M | {r0['tensors']} | "
              f"{r0['largest'] / 2**20:.1f} | {t:.3f} | {r0['hf_bytes'] / t / 1e9:.2f} | "
              f"{', '.join(f'{p:.0f}' for p in peaks)} | "
              f"{(bb + r0['largest']) / 2**20:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), **out}, f, indent=2)


if __name__ == "__main__":
    main()
