"""``megarlhf convert``: HF safetensors <-> megarlhf checkpoints (megatron dist checkpoints).

    megarlhf convert hf-to-megatron --hf-dir D --out C --tp T --pp P [--vpp V] [--ep E --etp X]
    megarlhf convert megatron-to-hf --ckpt C --out D [--dtype bf16|fp16|fp32] [--shard-size 5GB]
    megarlhf convert upcycle --hf-dir D --out M [--experts 8] [--topk 2] [--seed 0]

Runs on T*P local ranks (gloo on CPU); P * lcm(T, E*X) for MoE models with expert parallelism.
The library is :mod:`megarlhf.checkpoint.convert`.
"""

from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert HF safetensors <-> megarlhf (megatron dist) "
                                       "checkpoints")
    conv = p.add_subparsers(dest="direction", metavar="DIRECTION")
    conv.required = True

    a = conv.add_parser("hf-to-megatron", help="HF model directory -> megarlhf checkpoint")
    a.add_argument("--hf-dir", required=True, help="HF model directory (config.json, "
                                                   "*.safetensors, tokenizer files)")
    a.add_argument("--out", required=True, help="checkpoint directory to create")
    a.add_argument("--tp", type=int, default=1, help="tensor parallel size to save at")
    a.add_argument("--pp", type=int, default=1, help="pipeline parallel size to save at")
    a.add_argument("--vpp", type=int, default=1, help="virtual pipeline chunks per stage")
    a.add_argument("--ep", type=int, default=1, help="expert parallel size to save at (MoE)")
    a.add_argument("--etp", type=int, default=None,
                   help="expert tensor parallel size (MoE; default: = tp)")
    a.add_argument("--head", choices=("auto", "lm", "scalar"), default="auto",
                   help="lm (causal LM), scalar (reward model / critic), or auto: scalar when "
                        "the weights have score.weight")
    a.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="parameter dtype of the checkpoint (default: the HF weights')")
    a.add_argument("--vocab-multiple", type=int, default=128,
                   help="pad the vocabulary to a multiple of this times tp")
    _common(a)
    a.set_defaults(func=_hf_to_megatron)

    b = conv.add_parser("megatron-to-hf", help="megarlhf checkpoint -> HF safetensors directory")
    b.add_argument("--ckpt", required=True, help="megarlhf checkpoint directory")
    b.add_argument("--out", required=True, help="HF directory to create")
    b.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="dtype of the HF weights (default: the checkpoint's)")
    b.add_argument("--shard-size", default="5GB",
                   help="largest safetensors file, e.g. 5GB (10^9 bytes), 2GiB, 500MB")
    b.add_argument("--tp", type=int, default=None, help="load at this TP (default: as saved)")
    b.add_argument("--pp", type=int, default=None, help="load at this PP (default: as saved)")
    b.add_argument("--vpp", type=int, default=None, help="load at this VPP (default: as saved)")
    b.add_argument("--ep", type=int, default=None, help="load at this EP (default: as saved)")
    b.add_argument("--etp", type=int, default=None, help="load at this ETP (default: as saved)")
    _common(b)
    b.set_defaults(func=_megatron_to_hf)

    u = conv.add_parser("upcycle", help="dense llama/mistral HF model -> Mixtral HF model whose "
                                        "experts are copies of its MLP (sparse upcycling)")
    u.add_argument("--hf-dir", required=True, help="the dense HF model directory")
    u.add_argument("--out", required=True, help="HF directory to create (new or empty)")
    u.add_argument("--experts", type=int, default=8, help="experts per layer")
    u.add_argument("--topk", type=int, default=2, help="experts per token")
    u.add_argument("--router-std", type=float, default=0.02, help="router init std")
    u.add_argument("--aux-loss-coef", type=float, default=0.01,
                   help="router_aux_loss_coef written into the config")
    u.add_argument("--seed", type=int, default=0, help="router init seed")
    u.add_argument("--overwrite", action="store_true",
                   help="replace an earlier upcycle output at --out (megarlhf's files only)")
    u.set_defaults(func=_upcycle)


def _common(p) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out (only once the new one is complete)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--timeout", type=float, default=24 * 3600.0,
                   help="seconds before the conversion is stopped")


def _upcycle(args) -> int:
    from megarlhf.checkpoint.upcycle import upcycle_to_mixtral

    try:
        out = upcycle_to_mixtral(args.hf_dir, args.out, num_experts=args.experts,
                                 topk=args.topk, router_std=args.router_std,
                                 router_aux_loss_coef=args.aux_loss_coef, seed=args.seed,
                                 overwrite=args.overwrite)
    except (ValueError, OSError) as e:
        return _fail(e)
    print(f"megarlhf convert: wrote the upcycled Mixtral ({args.experts} experts, top-"
          f"{args.topk}) to {out}")
    return 0


def _fail(e: Exception) -> int:
    print(f"megarlhf convert: error: {e}", file=sys.stderr)
    return 2


def _hf_to_megatron(args) -> int:
    from megarlhf.checkpoint.model import CheckpointError
    from megarlhf.checkpoint.convert import ConversionError, convert_hf_to_megatron
    from megarlhf.weights.validate import HFValidationError

    try:
        meta = convert_hf_to_megatron(
            args.hf_dir, args.out, tp=args.tp, pp=args.pp, vpp=args.vpp, head=args.head,
            dtype=args.dtype, vocab_multiple=args.vocab_multiple, overwrite=args.overwrite,
            progress=not args.quiet, timeout=args.timeout, ep=args.ep, etp=args.etp)
    except (HFValidationError, ConversionError, CheckpointError) as e:
        return _fail(e)
    if not args.quiet:
        lay = meta.layout
        print(f"wrote {args.out}: {meta.hf_config.get('model_type')} ({meta.head} head, "
              f"{meta.dtype}) at TP{lay['tp']}/PP{lay['pp']}"
              + (f"/VPP{lay['vpp']}" if lay["vpp"] > 1 else "")
              + (f"/EP{lay['ep']}" if lay.get("ep", 1) > 1 else ""))
    return 0


def _megatron_to_hf(args) -> int:
    from megarlhf.checkpoint.model import CheckpointError
    from megarlhf.checkpoint.convert import ConversionError, convert_megatron_to_hf

    try:
        summary = convert_megatron_to_hf(
            args.ckpt, args.out, dtype=args.dtype, shard_size=args.shard_size, tp=args.tp,
            pp=args.pp, vpp=args.vpp, overwrite=args.overwrite, progress=not args.quiet,
            timeout=args.timeout, ep=args.ep, etp=args.etp)
    except (ConversionError, CheckpointError) as e:
        return _fail(e)
    if not args.quiet:
        print(f"wrote {args.out}: {summary['tensors']} tensors, "
              f"{summary['bytes'] / 2**20:.1f} MiB in {summary['files']} safetensors file(s)")
    return 0
