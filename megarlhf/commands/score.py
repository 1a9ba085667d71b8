"""``megarlhf score``: per-token log-probs of given token sequences at a chosen TP/PP.

A user's tool for chasing log-prob mismatches (trainer vs rollout engine, one layout vs
another): it runs megarlhf's own scoring path (megatron GPTModel, pipeline schedule,
vocabulary-parallel log-probs) on ``pp`` stages of ``lcm(tp, ep)`` local ranks (mixture-of-experts models: ``--ep`` splits the
experts over expert-parallel ranks, expert TP 1, with sequence parallelism at ``--tp`` > 1 as
megatron routes MoE layers).

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
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output written by `megarlhf score`")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1,
                   help="expert-parallel ranks (mixture-of-experts models)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--entropy", action="store_true", help="also write per-token entropy")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--compare-hf", action="store_true",
                   help="also score with transformers (fp32, CPU) and print the difference")
    p.set_defaults(func=run)


def _read_sequences(path: str, tokenizer_dir: str | None) -> list[list[int]]:
    from megarlhf.commands import UsageError

    if os.path.isdir(path):
        raise UsageError(f"--input {path} is a directory; give a .jsonl file")
    if not os.path.isfile(path):
        raise UsageError(f"--input {path}: no such file")
    tok = None
    seqs = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UsageError(f"--input {path}, line {n}: not valid UTF-8 ({e.reason}); save "
                                 "the file as UTF-8 jsonl") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as e:
                raise UsageError(f"--input {path}, line {n}: not valid JSON ({e}); each line "
                                 "must hold one JSON object") from None
            if not isinstance(row, dict):
                raise UsageError(f"--input {path}, line {n}: a JSON {type(row).__name__}; each "
                                 'line must hold an object {"input_ids": [...]} or '
                                 '{"text": "..."}')
            if "input_ids" in row:
                ids = row["input_ids"]
                if not (isinstance(ids, list) and ids and all(
                        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)):
                    raise UsageError(f"--input {path}, line {n}: field 'input_ids' must be a "
                                     "non-empty list of non-negative integers")
            elif "text" in row:
                if not isinstance(row["text"], str) or not row["text"]:
                    raise UsageError(f"--input {path}, line {n}: field 'text' must be a "
                                     "non-empty string")
                if tok is None:
                    if tokenizer_dir is None:
                        raise UsageError(f"--input {path}, line {n}: text rows need a tokenizer; "
                                         "give input_ids, or --hf-dir with tokenizer files")
                    from megarlhf.data.tokenizer import load_tokenizer

                    try:
                        tok = load_tokenizer(tokenizer_dir)
                    except Exception as e:  # noqa: BLE001 - sentencepiece/transformers errors
                        raise UsageError(f"--input {path}, line {n}: text rows need a tokenizer, "
                                         f"and {tokenizer_dir} has none usable ({e}); give "
                                         "input_ids instead") from None
                ids = tok.encode(row["text"], add_bos=True)
            else:
                raise UsageError(f"--input {path}, line {n}: each row needs 'input_ids' or "
                                 "'text'")
            seqs.append(ids)
    if not seqs:
        raise UsageError(f"--input {path} holds no sequences")
    return seqs


def _is_score_output(path: str) -> bool:
    """``path`` is a file `megarlhf score` wrote (its first row has input_ids and logprobs)."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    return isinstance(row, dict) and {"input_ids", "logprobs"} <= set(row)
    except (OSError, ValueError):
        return False
    return False


def _check_request(args):
    """Everything checkable before any rank starts; returns the model's ArchSpec."""
    import math

    from megarlhf.checkpoint.outputs import file_target_errors
    from megarlhf.commands import UsageError
    from megarlhf.models.arch import hf_config_from_dict
    from megarlhf.models.families import arch_spec
    from megarlhf.checkpoint.convert import ConversionError, check_layout

    if args.tp < 1 or args.pp < 1 or args.ep < 1:
        raise UsageError("--tp, --pp and --ep must be >= 1")
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        raise UsageError(f"--temperature {args.temperature}: must be a finite number > 0")
    if args.micro_batch_size < 1:
        raise UsageError("--micro-batch-size must be >= 1")
    if args.compare_hf and not args.hf_dir:
        raise UsageError("--compare-hf compares with transformers' forward of an HF directory: "
                         "use it with --hf-dir")
    if args.hf_dir:
        from megarlhf.weights.validate import inspect_hf_dir

        if not os.path.isdir(args.hf_dir):
            raise UsageError(f"--hf-dir {args.hf_dir}: no such directory")
        info = inspect_hf_dir(args.hf_dir)  # config + safetensors headers (truncated files)
        if info.head != "lm":
            raise UsageError(f"--hf-dir {args.hf_dir} holds a scalar-head model (critic / reward "
                             "model); `megarlhf score` scores language models")
        spec = info.spec
    else:
        from megarlhf.checkpoint.model import read_checkpoint_meta

        meta = read_checkpoint_meta(args.ckpt)
        if meta.head != "lm":
            raise UsageError(f"--ckpt {args.ckpt} holds a scalar-head model (critic / reward "
                             "model); `megarlhf score` scores language models")
        spec = arch_spec(hf_config_from_dict(meta.hf_config))
    try:
        check_layout(spec, args.tp, args.pp, 1, args.ep, 1 if spec.moe is not None else None)
    except ConversionError as e:
        raise UsageError(str(e)) from None
    if args.output != "-":
        inputs = {"--input": args.input}
        inputs.update({"--hf-dir": args.hf_dir} if args.hf_dir else {"--ckpt": args.ckpt})
        errors = file_target_errors(args.output, what="--output", inputs=inputs,
                                    overwrite=args.overwrite, ours=_is_score_output)
        if errors:
            raise UsageError("; ".join(errors))
    return spec


def _rank_score(source: dict, seqs, tp, pp, temperature, entropy, mbs, ep=1):
    import torch

    from megarlhf.config.schema import ModelConfig
    from megarlhf.engine.batch import TokenBatch
    from megarlhf.engine.engine import MegatronEngine
    from megarlhf.models.builder import build_model
    from megarlhf.parallel.layout import ParallelLayout, initialize_parallel

    world = torch.distributed.get_world_size()
    if source.get("moe"):  # megatron routes MoE layers per TP rank's share of the sequence
        lay = ParallelLayout.for_world(world, tp=tp, pp=pp, ep=ep, etp=1,
                                       sequence_parallel=tp > 1)
    else:
        lay = ParallelLayout.for_world(world, tp=tp, pp=pp)
    ctx = initialize_parallel(lay)
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
    eng = MegatronEngine(bundle, micro_batch_size=mbs)
    out = eng.forward(TokenBatch.from_sequences(seqs), temperature=temperature, entropy=entropy)
    return out if ctx.rank == 0 else None


def run(args) -> int:
    import torch

    from megarlhf.platform.launch import run_distributed

    from megarlhf.commands import UsageError

    spec = _check_request(args)  # nothing starts (or is written) before this passes
    tok_dir = args.hf_dir
    if args.ckpt and os.path.isdir(os.path.join(args.ckpt, "hf")):
        tok_dir = os.path.join(args.ckpt, "hf")  # tokenizer files kept with the checkpoint
    seqs = _read_sequences(args.input, tok_dir)
    bad = [i for i, s in enumerate(seqs) if max(s) >= spec.vocab_size]
    if bad:
        raise UsageError(f"--input {args.input}: sequence {bad[0] + 1} holds token id "
                         f"{max(seqs[bad[0]])} >= the model's vocab_size {spec.vocab_size}; "
                         "give ids of this model's tokenizer")
    long = [i for i, s in enumerate(seqs) if len(s) > spec.max_position_embeddings]
    if long:
        raise UsageError(f"--input {args.input}: sequence {long[0] + 1} is {len(seqs[long[0]])} "
                         f"tokens long ({len(long)} of {len(seqs)} sequences are longer than "
                         f"the model's {spec.max_position_embeddings} positions, "
                         "max_position_embeddings): log-probs past the context are not the "
                         "model's; shorten or drop them")
    from megarlhf.checkpoint.convert import conversion_world

    source = {"hf_dir": args.hf_dir} if args.hf_dir else {"ckpt": args.ckpt}
    source["moe"] = spec.moe is not None
    world = conversion_world(args.tp, args.pp, args.ep, 1 if spec.moe is not None else None)
    res = run_distributed(_rank_score, world, source, seqs, args.tp, args.pp,
                          args.temperature, args.entropy, args.micro_batch_size, args.ep,
                          timeout=3600)[0]
    tmp = None if args.output == "-" else f"{args.output}.tmp-{os.getpid()}"
    f = sys.stdout if tmp is None else open(tmp, "w", encoding="utf-8")
    try:
        for i, s in enumerate(seqs):
            row = {"input_ids": s, "logprobs": res["logp"][i, : len(s)].tolist()}
            if args.entropy:
                row["entropy"] = res["entropy"][i, : len(s)].tolist()
            f.write(json.dumps(row) + "\n")
    except BaseException:
        if tmp is not None:
            f.close()
            os.remove(tmp)  # only our own incomplete output
        raise
    if tmp is not None:
        f.close()
        os.replace(tmp, args.output)  # complete, then in place
    if args.compare_hf:
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
              f"over {d.numel()} tokens (TP{args.tp}/PP{args.pp}/EP{args.ep})", file=sys.stderr)
    return 0
