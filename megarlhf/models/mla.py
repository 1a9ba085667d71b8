"""Multi-head latent attention (deepseek_v3) on megatron's local layers.

:class:`MLADotProductAttention` is the core attention of megarlhf's local MLA layer spec (a
spec-level class, not a patch) - megatron's ``DotProductAttention`` with two differences:

1. It accepts the ``k_channels`` / ``v_channels`` arguments megatron-core 0.16.1's
   ``MLASelfAttention`` passes (its ``DotProductAttention`` takes neither: TypeError). MLA passes
   its own ``softmax_scale``; the output is viewed as ``kv_channels * heads``, so the builder sets
   ``kv_channels = v_head_dim``.
2. With tensor parallelism it sums the shared RoPE key's gradient over the TP ranks. The rope
   key ``k_pe`` is one vector per token used by every head; each TP rank uses it for its own
   heads only and megatron never reduces its gradient (NVIDIA/Megatron-LM#1699, open in
   0.16.1): the kv down-projection's rope rows and every earlier layer would train on a partial
   gradient (measured: 0.41 relative error at TP2, with or without sequence parallelism). The
   key's rope part is rebuilt from head 0's copy through ``copy_to_tensor_model_parallel_region``
   (identity forward, TP all-reduce backward): one ``(s, b, rope)`` all-reduce per layer in
   backward. Transformer Engine's spec has its own attention class; there the builder requires
   sequence parallelism for training at TP > 1 (whose all-gather reduce-scatters this gradient).

The forward equals transformers' ``DeepseekV3Attention`` (interleaved RoPE, yarn) to ~3e-6 in
fp32 at TP1 and TP2 (+SP) and the TP2 gradients equal TP1's to ~2e-6 (tests/dist).
"""

from __future__ import annotations

import torch


def mla_core_attention_class():
    """megatron's ``DotProductAttention`` made usable by MLA (see the module docstring)."""
    from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class MLADotProductAttention(DotProductAttention):
        def __init__(self, *args, k_channels=None, v_channels=None, **kwargs):
            super().__init__(*args, **kwargs)
            if v_channels is not None and v_channels != self.config.kv_channels:
                raise ValueError(f"MLA core attention: v_channels={v_channels} but "
                                 f"kv_channels={self.config.kv_channels} (must be v_head_dim)")
            self._sum_rope_grad = self.tp_group.size() > 1

        def forward(self, query, key, value, attention_mask, *args, **kwargs):
            if self._sum_rope_grad:
                nope = self.config.qk_head_dim
                k_pe = copy_to_tensor_model_parallel_region(key[..., :1, nope:],
                                                            group=self.tp_group)
                key = torch.cat([key[..., :nope], k_pe.expand(*key.shape[:-1], -1)], dim=-1)
            return super().forward(query, key, value, attention_mask, *args, **kwargs)

    return MLADotProductAttention


_CLASS: list = []


def mla_core_attention():
    """The class, made once per process (its identity is stable across builds)."""
    if not _CLASS:
        _CLASS.append(mla_core_attention_class())
    return _CLASS[0]
