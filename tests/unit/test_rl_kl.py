"""KL estimators k1, k2, k3 (methods.md 2.2 step 5) against hand values and exact expectations."""

import math

import pytest
import torch

from megarlhf.rl import kl_estimate, kl_k1, kl_k2, kl_k3

LOGP = torch.tensor([[-1.0, -2.0, -0.3]])
LOGP_REF = torch.tensor([[-1.5, -1.0, -0.3]])  # log ratio d = [0.5, -1.0, 0.0]


def test_k1_k2_k3_hand_values():
    """If this fails, the per-token KL penalty in rewards/loss has the wrong formula or sign."""
    torch.testing.assert_close(kl_k1(LOGP, LOGP_REF), torch.tensor([[0.5, -1.0, 0.0]]))
    torch.testing.assert_close(kl_k2(LOGP, LOGP_REF), torch.tensor([[0.125, 0.5, 0.0]]))
    k3 = [math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0, 0.0]
    torch.testing.assert_close(kl_k3(LOGP, LOGP_REF), torch.tensor([k3]))
    for name, fn in (("k1", kl_k1), ("k2", kl_k2), ("k3", kl_k3)):
        torch.testing.assert_close(kl_estimate(LOGP, LOGP_REF, name), fn(LOGP, LOGP_REF))


def test_k1_and_k3_are_unbiased_exactly():
    """If this fails, k1/k3 do not estimate KL(pi || pi_ref) (their expectation under pi must
    equal the exact KL, computed here by enumerating a small vocabulary)."""
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(7, generator=g, dtype=torch.float64), 0)
    q = torch.softmax(torch.randn(7, generator=g, dtype=torch.float64), 0)
    exact = (p * (p.log() - q.log())).sum()
    for fn in (kl_k1, kl_k3):
        expectation = (p * fn(p.log(), q.log()).double()).sum()
        torch.testing.assert_close(expectation, exact, atol=1e-6, rtol=1e-5)
    assert (kl_k3(p.log(), q.log()) >= 0).all() and (kl_k2(p.log(), q.log()) >= 0).all()


def test_bf16_inputs_give_fp32_and_clamp_bounds_ratio():
    """If this fails, bf16 log-probs are subtracted in bf16 (losing the small log ratio) or a
    huge ratio overflows k3 to inf."""
    lp = torch.tensor([-1.0, -2.5]).bfloat16()
    ref = torch.tensor([-1.25, -2.0]).bfloat16()
    out = kl_k3(lp, ref)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, kl_k3(lp.float(), ref.float()))
    extreme = kl_k3(torch.tensor([-200.0]), torch.tensor([0.0]), clamp=20.0)
    assert torch.isfinite(extreme).all()
    torch.testing.assert_close(extreme, torch.tensor([math.exp(20.0) - 1 - 20.0]))


def test_unknown_estimator_is_rejected():
    """If this fails, a typo in the config silently picks some estimator."""
    with pytest.raises(ValueError, match="k1"):
        kl_estimate(LOGP, LOGP_REF, "k4")
