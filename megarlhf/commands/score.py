"""``megarlhf score``: per-token log-probs of given token sequences at a chosen TP/PP.

A user's tool for chasing log-prob mismatches (trainer vs rollout engine, one layout vs
another): it runs megarlhf's own scoring path (megatron GPTModel, pipeline schedule,
vocabulary-parallel log-probs) on ``tp * pp`` local ranks.

Input: a jsonl file, one sequence per line, ``{"input_ids": [...]}`` or ``{"text": "..."}``
(tokenized with the model's tokenizer). Output: jsonl with ``input_ids`` and ``logprobs``
(``logprobs[t] = log p(x_t | x_<t)`` under ``logits / temperature``; ``logprobs[0] = 0``), and
``entropy`` with ``--entropy``. ``--compare-hf`` also scores with transformers' own forward (fp32,
CPU) and prints the max / mean absolute difference.
"""

from __future__ import annotations

import json
import os
import sys


def register(sub) -> None:
    p = sub.add_parser("score", help="per-token log-probs of token sequences from an HF directory "
                                     "or a megarlhf checkpoint, at a chosen TP/PP")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf-dir", help="Hugging Face model directory")
    src.add_argument("--ckpt", help="megarlhf checkpoint directory (megatron distributed format)")
    p.add_argument("--input", required=True, help="jsonl with input_ids or text per line")
    p.add_argument("--output", default="-", help="jsonl output path (default: stdout)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--entropy", action="store_true", help="also write per-token entropy")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--compare-hf", action="store_true",
                   help="also score with transformers (fp32, CPU) and print the difference")
    p.set_defaults(func=run)


def _read_sequences(path: str, tokenizer_dir: str | None) -> list[list[int]]:
    if not os.path.isfile(path):
        raise SystemExit(f"megarlhf score: --input {path!r} does not exist")
    tok = None
    seqs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"megarlhf score: {path}:{n}: not valid JSON ({e})") from None
            if "input_ids" in row:
                ids = row["input_ids"]
                if not (isinstance(ids, list) and ids and all(isinstance(i, int) and i >= 0
                                                              for i in ids)):
                    raise SystemExit(f"megarlhf score: {path}:{n}: input_ids must be a non-empty "
                                     "list of non-negative integers")
            elif "text" in row:
                if tok is None:
                    if tokenizer_dir is None:
                        raise SystemExit("megarlhf score: text rows need a tokenizer; give "
                                         "input_ids or use --hf-dir with tokenizer files")
                    from megarlhf.data.tokenizer import load_tokenizer

                    tok = load_tokenizer(tokenizer_dir)
                ids = tok.encode(row["text"], add_bos=True)
            else:
                raise SystemExit(f"megarlhf score: {path}:{n}: each row needs 'input_ids' or "
                                 "'text'")
            seqs.append(ids)
    if not seqs:
        raise SystemExit(f"megarlhf score: {path} holds no sequences")
    return seqs


def _rank_score(source: dict, seqs, tp, pp, temperature, entropy, mbs):
    import torch

    from megarlhf.config.schema import ModelConfig
    from megarlhf.engine.batch import TokenBatch
    from megarlhf.engine.engine import MegatronEngine
    from megarlhf.models.builder import build_model
    from megarlhf.parallel.layout import ParallelLayout, initialize_parallel

    ctx = initialize_parallel(ParallelLayout.for_world(torch.distributed.get_world_size(),
                                                       tp=tp, pp=pp))
    if "hf_dir" in source:
        from megarlhf.weights.loader import load_hf_dir

        bundle = build_model(ModelConfig(hf_dir=source["hf_dir"], dtype="fp32"), ctx,
                             init_weights=False)
        load_hf_dir(bundle, source["hf_dir"])
    else:
        from megarlhf.checkpoint.model import load_model_checkpoint, read_checkpoint_meta

        meta = read_checkpoint_meta(source["ckpt"])
        bundle = build_model(ModelConfig(arch=dict(meta.hf_config), dtype="fp32"), ctx,
                             head=meta.head, init_weights=False)
        load_model_checkpoint(bundle, source["ckpt"])
        if meta.head != "lm":
            raise ValueError(f"{source['ckpt']} holds a scalar-head model (critic / reward "
                             "model); `megarlhf score` scores language models")
    vocab = bundle.spec.vocab_size
    bad = [i for i, s in enumerate(seqs) if max(s) >= vocab]
    if bad:
        raise ValueError(f"sequence {bad[0]} holds token id {max(seqs[bad[0]])} >= the model's "
                         f"vocab_size {vocab}")
    eng = MegatronEngine(bundle, micro_batch_size=mbs)
    out = eng.forward(TokenBatch.from_sequences(seqs), temperature=temperature, entropy=entropy)
    return out if ctx.rank == 0 else None


def run(args) -> int:
    import torch

    from megarlhf.platform.launch import run_distributed

    if args.hf_dir and not os.path.isfile(os.path.join(args.hf_dir, "config.json")):
        raise SystemExit(f"megarlhf score: --hf-dir {args.hf_dir!r} has no config.json")
    if args.ckpt:
        from megarlhf.checkpoint.model import CheckpointError, read_checkpoint_meta

        try:
            read_checkpoint_meta(args.ckpt)
        except (CheckpointError, FileNotFoundError) as e:
            raise SystemExit(f"megarlhf score: --ckpt {args.ckpt!r}: {e}") from None
    if args.tp < 1 or args.pp < 1:
        raise SystemExit("megarlhf score: --tp and --pp must be >= 1")
    tok_dir = args.hf_dir
    if args.ckpt and os.path.isdir(os.path.join(args.ckpt, "hf")):
        tok_dir = os.path.join(args.ckpt, "hf")  # tokenizer files kept with the checkpoint
    seqs = _read_sequences(args.input, tok_dir)
    source = {"hf_dir": args.hf_dir} if args.hf_dir else {"ckpt": args.ckpt}
    res = run_distributed(_rank_score, args.tp * args.pp, source, seqs, args.tp, args.pp,
                          args.temperature, args.entropy, args.micro_batch_size,
                          timeout=3600)[0]
    f = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")
    try:
        for i, s in enumerate(seqs):
            row = {"input_ids": s, "logprobs": res["logp"][i, : len(s)].tolist()}
            if args.entropy:
                row["entropy"] = res["entropy"][i, : len(s)].tolist()
            f.write(json.dumps(row) + "\n")
    finally:
        if f is not sys.stdout:
            f.close()
    if args.compare_hf:
        if not args.hf_dir:
            raise SystemExit("megarlhf score: --compare-hf needs --hf-dir")
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32).eval()
        diffs = []
        with torch.no_grad():
            for i, s in enumerate(seqs):
                ids = torch.tensor([s])
                logits = model(ids).logits.float() / args.temperature
                lp = torch.log_softmax(logits, -1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
                diffs.append((lp - res["logp"][i, 1: len(s)]).abs())
        d = torch.cat(diffs)
        print(f"megarlhf vs transformers: max |dlogp| = {d.max():.3e}, mean = {d.mean():.3e} "
              f"over {d.numel()} tokens (TP{args.tp}/PP{args.pp})", file=sys.stderr)
    return 0
