"""Vocab-parallel log-prob/entropy on an unsharded vocabulary (tp_group=None, the TP=1 path):
values and gradients equal the log_softmax reference; the sharded cases are in
tests/dist/test_vocab_parallel.py."""

import pytest
import torch

from megarlhf.engine.vocab_parallel import (
    logprobs_entropy_reference,
    vocab_parallel_logprobs_entropy,
)


@pytest.mark.parametrize("dtype,temperature,vocab_size,chunk", [
    (torch.float32, 1.0, None, None),
    (torch.float32, 0.7, 50, 3),
    (torch.bfloat16, 1.3, 61, None),
])
def test_tp1_matches_reference(dtype, temperature, vocab_size, chunk):
    """If this fails, TP=1 training (or the no-gather path at any TP) computes wrong log-probs,
    entropies or gradients."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 64, generator=g).to(dtype)
    v = vocab_size or 64
    target = torch.randint(0, v, (2, 5), generator=g)
    w1, w2 = torch.rand(2, 5, generator=g), torch.rand(2, 5, generator=g)
    a = logits.clone().requires_grad_()
    lp, h = vocab_parallel_logprobs_entropy(a, target, None, temperature=temperature,
                                            vocab_size=vocab_size, chunk_tokens=chunk)
    (w1 * lp + w2 * h).sum().backward()
    b = logits.clone().requires_grad_()
    lp_ref, h_ref = logprobs_entropy_reference(b, target, temperature, vocab_size)
    (w1 * lp_ref + w2 * h_ref).sum().backward()
    assert lp.dtype == torch.float32 and h.dtype == torch.float32
    torch.testing.assert_close(lp, lp_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(h, h_ref, atol=1e-6, rtol=1e-6)
    assert a.grad.dtype == dtype
    torch.testing.assert_close(a.grad.float(), b.grad.float(),
                               atol=1e-6 if dtype == torch.float32 else 1e-2, rtol=1e-2)
    assert (a.grad[..., v:] == 0).all()


def test_input_logits_are_not_modified():
    """If this fails, computing log-probs corrupts the caller's fp32 logits in place (megatron's
    vocab_parallel_cross_entropy does this to save memory)."""
    logits = torch.randn(3, 16)
    before = logits.clone()
    vocab_parallel_logprobs_entropy(logits, torch.tensor([1, 2, 3]), temperature=0.5)
    assert torch.equal(logits, before)


def test_compute_entropy_false_and_bad_arguments():
    """If this fails, skipping the entropy changes log-probs, or bad arguments pass silently."""
    logits = torch.randn(4, 10)
    t = torch.tensor([0, 3, 9, 5])
    lp, h = vocab_parallel_logprobs_entropy(logits, t, compute_entropy=False)
    assert h is None
    torch.testing.assert_close(lp, logprobs_entropy_reference(logits, t)[0])
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_logprobs_entropy(logits, t, temperature=0.0)
    with pytest.raises(ValueError, match="vocab_size"):
        vocab_parallel_logprobs_entropy(logits, t, vocab_size=11)
    with pytest.raises(ValueError, match="target_ids"):
        vocab_parallel_logprobs_entropy(logits, t[:3])
