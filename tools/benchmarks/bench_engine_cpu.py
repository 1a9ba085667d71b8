"""CPU throughput of the engine: scoring and training tokens/s, TP1 vs TP2/PP2 (and PP2/VPP2).

    .venv/bin/python tools/benchmarks/bench_engine_cpu.py [--repeats 5] [--layers 4]

Each layout runs in its own set of gloo ranks on this machine; every rank does the same work a
GPU rank would (megatron's schedules, TP all-reduces, PP send/recv). On a 2-core box, 4 ranks
oversubscribe the cores, so the ratio mostly measures parallelism overhead plus contention — read
it as an upper bound on the overhead. Timings are medians over ``--repeats`` after one warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from megarlhf.platform.launch import run_distributed


def _batch(vocab, n, length, seed=0):
    from megarlhf.engine.batch import TokenBatch

    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, vocab, (length,), generator=g).tolist() for _ in range(n)]
    return TokenBatch.from_sequences(seqs, fields={"loss_mask": [[1] * length] * n})


def rank_bench(hf_dir, tp, pp, vpp, n_seqs, length, mbs, repeats):
    from megarlhf.config.schema import ModelConfig, OptimizerConfig
    from megarlhf.engine.engine import MegatronEngine
    from megarlhf.engine.loss_fns import SFTLossSpec
    from megarlhf.models.builder import build_model
    from megarlhf.parallel.layout import ParallelLayout, initialize_parallel
    from megarlhf.weights.loader import load_hf_dir

    ctx = initialize_parallel(ParallelLayout.for_world(torch.distributed.get_world_size(),
                                                       tp=tp, pp=pp, vpp=vpp))
    bundle = build_model(ModelConfig(hf_dir=hf_dir, dtype="fp32"), ctx, for_training=True,
                         init_weights=False)
    load_hf_dir(bundle, hf_dir)
    eng = MegatronEngine(bundle, OptimizerConfig(lr=1e-5), micro_batch_size=mbs)
    batch = _batch(bundle.spec.vocab_size, n_seqs, length)
    shard = batch.shard(ctx.dp_rank, ctx.layout.dp)
    n = float(batch.num_tokens)
    spec = SFTLossSpec(normalizer=n, num_tokens=n)
    score_t, train_t = [], []
    for i in range(repeats + 1):
        torch.distributed.barrier()
        t0 = time.perf_counter()
        eng.forward(shard)
        torch.distributed.barrier()
        t1 = time.perf_counter()
        eng.train(shard, spec)
        torch.distributed.barrier()
        t2 = time.perf_counter()
        if i:  # first round is the warm-up
            score_t.append(t1 - t0)
            train_t.append(t2 - t1)
    return {"score_s": statistics.median(score_t), "train_s": statistics.median(train_t),
            "tokens": batch.num_tokens}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--length", type=int, default=128)
    args = ap.parse_args()
    from megarlhf.models.tiny import save_tiny_hf_model, tiny_arch

    d = tempfile.mkdtemp()
    save_tiny_hf_model(d, tiny_arch("llama", num_layers=args.layers, hidden_size=args.hidden,
                                    ffn=4 * args.hidden, num_heads=8, num_kv_heads=4,
                                    vocab_size=32000, max_pos=1024))
    rows = []
    for name, tp, pp, vpp in (("TP1/PP1", 1, 1, 1), ("TP2/PP2", 2, 2, 1),
                              ("PP2/VPP2", 1, 2, 2)):
        world = tp * pp
        r = run_distributed(rank_bench, world, d, tp, pp, vpp, args.seqs, args.length, 2,
                            args.repeats, timeout=1800)[0]
        rows.append((name, world, r))
    base = rows[0][2]
    print(f"model: llama {args.layers} layers, hidden {args.hidden}, vocab 32000, fp32; batch "
          f"{args.seqs} x {args.length} tokens, micro-batch 2; medians of {args.repeats}")
    print("| layout | ranks | scoring tokens/s | training tokens/s | scoring time vs TP1 | "
          "training time vs TP1 |")
    print("|---|---|---|---|---|---|")
    for name, world, r in rows:
        print(f"| {name} | {world} | {r['tokens'] / r['score_s']:.0f} | "
              f"{r['tokens'] / r['train_s']:.0f} | {r['score_s'] / base['score_s']:.2f}x | "
              f"{r['train_s'] / base['train_s']:.2f}x |")


if __name__ == "__main__":
    main()
