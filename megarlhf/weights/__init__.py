"""Weights: every path model weights take between HF and megatron, through one set of transforms.

* :mod:`~megarlhf.weights.transforms` - the only place that knows how an HF tensor becomes
  megatron TP shards and back (fused q/k/v per query group, fused gate/up, vocabulary padding),
  including :func:`~megarlhf.weights.transforms.shard_pieces`: which HF rows/columns a shard
  holds.
* :mod:`~megarlhf.weights.mapping` - which HF tensors each parameter of this rank maps to
  (global layer numbers across PP and VPP).
* :mod:`~megarlhf.weights.loader` - HF -> this rank's shards, reading only its share.
* :mod:`~megarlhf.weights.resharder` - megatron shards -> HF full tensors on one rank, streamed
  in bounded buckets (weight sync, HF export, test oracles).
* :mod:`~megarlhf.weights.validate` - refusing HF directories whose config and weights
  disagree, before any work.
* :mod:`~megarlhf.weights.hf_io` - lazy safetensors reading; writing as transformers does.
"""
