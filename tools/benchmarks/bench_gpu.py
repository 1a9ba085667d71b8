"""GPU benchmarks on one GPU (the lent H100/H200): MFU of an actor training step, scoring
tokens/s, weight-sync (resharder) GB/s, peak memory per phase.

    python tools/benchmarks/bench_gpu.py [--layers 16 --hidden 2048 --seq 4096 --mbs 2]

NOT YET RUN: written in a session without an accelerator. Needs CUDA, megatron-core 0.16.1
(carry its cp312 wheel to the device), and Transformer Engine for the fused layers (without TE
megatron's local spec runs, slower).

MFU = model FLOPs per step / step time / peak, with the model FLOPs of a dense decoder step
(Megatron's formula, forward + backward = 3x forward, no recompute):
``6 * N_params_non_embedding * tokens + 12 * L * s * h * tokens`` (the attention scores), plus
the LM head ``6 * h * V * tokens``; peak = 790e12 (the measured bf16 dense matmul rate of these
machines, see ../shared/docs/environment.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from megarlhf.platform.launch import run_distributed

PEAK_FLOPS = 790e12


def rank_bench(hf_dir, seq, mbs, n_mb, repeats):
    from megarlhf.config.schema import ModelConfig, OptimizerConfig
    from megarlhf.engine.batch import TokenBatch
    from megarlhf.engine.engine import MegatronEngine
    from megarlhf.engine.loss_fns import SFTLossSpec
    from megarlhf.models.builder import build_model
    from megarlhf.parallel.layout import ParallelLayout, initialize_parallel
    from megarlhf.weights.resharder import iter_hf_weights

    ctx = initialize_parallel(ParallelLayout())
    bundle = build_model(ModelConfig(hf_dir=hf_dir, dtype="bf16"), ctx, for_training=True)
    eng = MegatronEngine(bundle, OptimizerConfig(lr=1e-5), micro_batch_size=mbs)
    spec = bundle.spec
    g = torch.Generator().manual_seed(0)
    n_seq = mbs * n_mb
    seqs = [torch.randint(0, spec.vocab_size, (seq,), generator=g).tolist() for _ in range(n_seq)]
    batch = TokenBatch.from_sequences(seqs, fields={"loss_mask": [[1] * seq] * n_seq})
    tokens = n_seq * seq
    loss = SFTLossSpec(normalizer=float(tokens), num_tokens=float(tokens))
    out = {"device": torch.cuda.get_device_name(), "te": bundle.te}

    def timed(fn):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t

    torch.cuda.reset_peak_memory_stats()
    eng.forward(batch)
    score = [timed(lambda: eng.forward(batch)) for _ in range(repeats)]
    out["peak_gib_scoring"] = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    eng.train(batch, loss)
    train = [timed(lambda: eng.train(batch, loss)) for _ in range(repeats)]
    out["peak_gib_training"] = torch.cuda.max_memory_allocated() / 2**30
    nbytes = sum(p.numel() * p.element_size() for c in bundle.unwrapped() for p in c.parameters())

    def sync():
        for bucket in iter_hf_weights(bundle, bucket_bytes=512 << 20, dst_rank=0,
                                      reuse_buffer=True):
            pass

    sync()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    ws = [timed(sync) for _ in range(repeats)]
    out["peak_gib_weight_sync_extra"] = (torch.cuda.max_memory_allocated() - before) / 2**30
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    cp = [timed(lambda: y.copy_(x)) for _ in range(repeats)]

    n_params = sum(p.numel() for c in bundle.unwrapped() for p in c.parameters())
    emb = 2 * spec.vocab_size * spec.hidden_size
    L, h, V = spec.num_layers, spec.hidden_size, spec.vocab_size
    flops = (6 * (n_params - emb) * tokens + 12 * L * seq * h * tokens + 6 * h * V * tokens)
    t = statistics.median(train)
    out.update(params=n_params, tokens_per_step=tokens, train_step_s=t,
               mfu=flops / t / PEAK_FLOPS, train_tokens_per_s=tokens / t,
               scoring_tokens_per_s=tokens / statistics.median(score),
               weight_sync_gb_per_s=nbytes / statistics.median(ws) / 1e9,
               device_copy_gb_per_s=2 * nbytes / statistics.median(cp) / 1e9)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--mbs", type=int, default=2)
    ap.add_argument("--micro-batches", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA GPU")
    from megarlhf.models.tiny import tiny_arch

    import os

    d = tempfile.mkdtemp()
    arch = tiny_arch("llama", num_layers=args.layers, hidden_size=args.hidden, ffn=args.ffn,
                     num_heads=args.heads, num_kv_heads=args.kv_heads, vocab_size=args.vocab,
                     max_pos=args.seq)
    with open(os.path.join(d, "config.json"), "w") as f:  # architecture only; random weights
        json.dump(dict(arch, architectures=["LlamaForCausalLM"]), f)
    res = run_distributed(rank_bench, 1, d, args.seq, args.mbs, args.micro_batches,
                          args.repeats, timeout=3000)[0]
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
