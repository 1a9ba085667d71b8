"""Token losses and their aggregation (methods.md 2.4, 3) on hand-computed values, the
aggregate() micro-batch contract, and the masking / bf16 edge cases."""

import math

import pytest
import torch
import torch.nn.functional as F

from megarlhf.rl import (
    AGG_MODES,
    aggregate,
    aggregate_normalizer,
    dpo_loss,
    entropy_loss,
    explained_variance,
    kl_k3,
    kl_loss,
    policy_loss,
    select_dpo_pairs,
    sequence_logprobs,
    truncated_is_weights,
    value_loss,
)

VALUES = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]]).bool()


def test_aggregate_modes_hand_values():
    """If this fails, the aggregation modes (whose choice changes results) compute something
    other than their names."""
    assert aggregate(VALUES, MASK, "token_mean").item() == pytest.approx(10 / 4)
    assert aggregate(VALUES, MASK, "seq_mean_token_mean").item() == pytest.approx((2 + 4) / 2)
    assert aggregate(VALUES, MASK, "seq_mean_token_sum").item() == pytest.approx((6 + 4) / 2)
    assert aggregate(VALUES, MASK, "seq_mean_token_sum_norm", length_constant=4).item() == \
        pytest.approx((6 / 4 + 4 / 4) / 2)
    assert aggregate(VALUES, MASK, "token_sum").item() == pytest.approx(10)
    assert aggregate(VALUES, MASK, "token_sum", normalizer=7).item() == pytest.approx(10)
    with pytest.raises(ValueError, match="length_constant"):
        aggregate(VALUES, MASK, "seq_mean_token_sum_norm")
    with pytest.raises(ValueError, match="token_mean"):
        aggregate(VALUES, MASK, "mean")


def _global_batch(seed):
    """9 sequences of lengths 0..8 (one empty) with random per-token values."""
    g = torch.Generator().manual_seed(seed)
    lengths = [5, 0, 8, 1, 3, 7, 2, 6, 4]
    T = max(lengths)
    mask = torch.zeros(len(lengths), T, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, :n] = True
    return torch.randn(len(lengths), T, generator=g), mask


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_contract_microbatches_sum_to_global(mode):
    """If this fails, gradient accumulation over micro-batches and data-parallel ranks no longer
    reproduces the global-batch loss (the training engine relies on this contract)."""
    values, mask = _global_batch(0)
    x = values.clone().requires_grad_()
    kw = {"length_constant": 8.0} if mode == "seq_mean_token_sum_norm" else {}
    full = aggregate(x, mask, mode, **kw)
    full.backward()
    grad_full = x.grad.clone()
    x.grad = None
    # micro-batches of uneven sizes in any order, each trimmed to its own padded length as the
    # engine does; row 1 is the empty sequence, alone in an all-masked micro-batch
    micro = [[0, 2], [3], [4, 5, 6], [1], [7, 8]]
    pieces = []
    for rows in micro:
        t = max(int(mask[rows].sum(1).max()), 1)
        pieces.append((x[rows, :t], mask[rows, :t]))
    normalizer = sum(aggregate_normalizer(m, mode) for _, m in pieces)
    total = sum(aggregate(v, m, mode, normalizer, **kw) for v, m in pieces)
    total.backward()
    torch.testing.assert_close(total, full)
    torch.testing.assert_close(x.grad, grad_full)
    if mode == "token_sum":  # no denominator: the normalizer (one per piece) is ignored
        assert int(normalizer) == len(pieces)
        return
    expected_norm = mask.sum() if mode == "token_mean" else (mask.sum(1) > 0).sum()
    assert int(normalizer) == int(expected_norm)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_packed_equals_padded(mode):
    """If this fails, sequence-level modes treat a packed row as one sequence."""
    values, mask = _global_batch(1)
    kw = {"length_constant": 8.0} if mode == "seq_mean_token_sum_norm" else {}
    rows = [values[b, :int(mask[b].sum())] for b in range(len(mask))]
    flat = torch.cat(rows)
    seg = torch.cat([torch.full((len(r),), b) for b, r in enumerate(rows)])
    half = len(flat) // 2  # pack into two rows, cut at the sequence boundary nearest the middle
    cut = int((torch.cumsum(torch.tensor([len(r) for r in rows]), 0) <= half).sum())
    cut_at = sum(len(r) for r in rows[:cut])
    T = max(cut_at, len(flat) - cut_at)
    pv, pm = torch.zeros(2, T), torch.zeros(2, T, dtype=torch.bool)
    ps = torch.full((2, T), -1)
    for row, (a, b) in enumerate([(0, cut_at), (cut_at, len(flat))]):
        pv[row, :b - a], pm[row, :b - a], ps[row, :b - a] = flat[a:b], True, seg[a:b]
    torch.testing.assert_close(aggregate(pv, pm, mode, segment_ids=ps, **kw),
                               aggregate(values, mask, mode, **kw))
    assert int(aggregate_normalizer(pm, mode, segment_ids=ps)) == \
        int(aggregate_normalizer(mask, mode))


@pytest.mark.parametrize("mode", AGG_MODES)
def test_all_masked_gives_zero_loss_and_zero_grad(mode):
    """If this fails, an empty micro-batch (or responses of length 0) injects NaN into the
    gradients, even when the masked positions hold garbage (inf/NaN log-probs)."""
    mask = torch.zeros(3, 4, dtype=torch.bool)
    kw = {"length_constant": 4.0} if mode == "seq_mean_token_sum_norm" else {}
    logp = torch.full((3, 4), float("nan")).requires_grad_()
    old = torch.full((3, 4), -float("inf"))
    adv = torch.full((3, 4), float("inf"))
    loss, metrics = policy_loss(logp, old, adv, mask, dual_clip=3.0, agg_mode=mode, **kw)
    values = torch.full((3, 4), float("nan")).requires_grad_()
    vloss, _ = value_loss(values, old, adv, mask, agg_mode=mode, **kw)
    ent = entropy_loss(logp, mask, agg_mode=mode, **kw)
    kl = kl_loss(logp, old, mask, agg_mode=mode, **kw)
    total = loss + vloss + ent + kl
    total.backward()
    assert total.item() == 0.0
    assert (logp.grad == 0).all() and (values.grad == 0).all()
    assert all(torch.isfinite(v).all() for v in metrics.values())


# One token per case; eps_low = eps_high = 0.2; token_mean over the 4 tokens.
#            A     rho   loss      clipped  d loss / d logp (per token, before the 1/4)
PPO_CASES = [(1.0, 1.5, -1.2, True, 0.0),     # A>0 above 1+eps: clipped, no gradient
             (1.0, 0.5, -0.5, False, -0.5),   # A>0 below 1-eps: unclipped (pessimistic min)
             (-1.0, 1.5, 1.5, False, 1.5),    # A<0 above 1+eps: unclipped
             (-1.0, 0.5, 0.8, True, 0.0)]     # A<0 below 1-eps: clipped, no gradient


def _ppo_inputs(cases):
    adv = torch.tensor([[c[0] for c in cases]])
    old = torch.full_like(adv, -1.0)
    logp = (old + torch.log(torch.tensor([[c[1] for c in cases]]))).requires_grad_()
    return logp, old, adv, torch.ones_like(adv, dtype=torch.bool)


def test_policy_loss_both_sides_of_the_clip():
    """If this fails, the PPO surrogate clips the wrong side, or passes gradient through a
    clipped token."""
    logp, old, adv, mask = _ppo_inputs(PPO_CASES)
    loss, m = policy_loss(logp, old, adv, mask, eps_low=0.2)
    loss.backward()
    n = len(PPO_CASES)
    assert loss.item() == pytest.approx(sum(c[2] for c in PPO_CASES) / n)
    # d(-A rho)/d logp = -A rho
    torch.testing.assert_close(logp.grad, torch.tensor([[c[4] / n for c in PPO_CASES]]))
    assert m["clip_frac"].item() == pytest.approx(2 / 4)
    assert m["clip_frac_high"].item() == pytest.approx(1 / 4)
    assert m["clip_frac_low"].item() == pytest.approx(1 / 4)
    rho = torch.tensor([c[1] for c in PPO_CASES])
    assert m["approx_kl"].item() == pytest.approx(((rho - 1) - rho.log()).mean().item())
    assert m["ratio_max"].item() == pytest.approx(1.5)


def test_policy_loss_asymmetric_clip():
    """If this fails, eps_high (clip-higher) is ignored or applied to the lower bound."""
    logp, old, adv, mask = _ppo_inputs([(1.0, 1.25, 0, 0, 0), (-1.0, 0.75, 0, 0, 0)])
    sym, _ = policy_loss(logp, old, adv, mask, eps_low=0.2)
    asym, m = policy_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.28)
    assert sym.item() == pytest.approx((-1.2 + 0.8) / 2)
    assert asym.item() == pytest.approx((-1.25 + 0.8) / 2)
    assert m["clip_frac_high"].item() == 0.0 and m["clip_frac_low"].item() == 0.5


def test_policy_loss_dual_clip():
    """If this fails, a negative-advantage token with a huge ratio can blow up the loss (dual
    clip caps it at c * |A| and stops its gradient)."""
    logp, old, adv, mask = _ppo_inputs([(-1.0, 5.0, 0, 0, 0), (-1.0, 2.0, 0, 0, 0),
                                        (2.0, 5.0, 0, 0, 0)])
    loss, m = policy_loss(logp, old, adv, mask, eps_low=0.2, dual_clip=3.0)
    loss.backward()
    # token 0: max(5, 1.2) = 5 > 3 -> 3; token 1: 2 < 3 stays; token 2 (A>0): -2*1.2 clipped
    assert loss.item() == pytest.approx((3.0 + 2.0 - 2.4) / 3)
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 2.0 / 3, 0.0]]))
    assert m["dual_clip_frac"].item() == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(logp, old, adv, mask, dual_clip=0.9)


def test_policy_loss_importance_weights_and_bf16():
    """If this fails, truncated IS weights are not applied per token, get a gradient, or bf16
    log-probs are differenced in bf16."""
    g = torch.Generator().manual_seed(0)
    logp = (torch.randn(4, 6, generator=g) - 2).bfloat16()
    old = (logp.float() + 0.1 * torch.randn(4, 6, generator=g)).bfloat16()
    adv = torch.randn(4, 6, generator=g)
    mask = torch.rand(4, 6, generator=g) > 0.3
    loss16, _ = policy_loss(logp, old, adv, mask)
    loss32, _ = policy_loss(logp.float(), old.float(), adv, mask)
    assert loss16.dtype == torch.float32
    torch.testing.assert_close(loss16, loss32)
    w = torch.rand(4, 6, generator=g).requires_grad_()
    lp = logp.float().requires_grad_()
    weighted, _ = policy_loss(lp, old.float(), adv, mask, is_weights=w)
    log_ratio = logp.float() - old.float()
    per_tok = torch.maximum(-adv * log_ratio.exp(),
                            -adv * log_ratio.exp().clamp(0.8, 1.2)) * w.detach()
    torch.testing.assert_close(weighted, per_tok[mask].mean())
    weighted.backward()
    assert w.grad is None and lp.grad is not None


def test_truncated_is_weights():
    """If this fails, the off-policy correction is untruncated, carries gradient, or weights
    masked tokens."""
    behaviour = torch.tensor([[-1.0, -1.0, -1.0, -1.0]])
    learner = (behaviour + torch.log(torch.tensor([[0.5, 3.0, 1.0, 9.0]]))).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 0]]).bool()
    w, m = truncated_is_weights(learner, behaviour, mask, cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[0.5, 2.0, 1.0, 0.0]]))
    assert not w.requires_grad
    assert m["is_truncated_frac"].item() == pytest.approx(1 / 3)
    assert m["is_weight_mean"].item() == pytest.approx(3.5 / 3)


def test_value_loss_clip_hand_values():
    """If this fails, the critic's clipped loss takes the min instead of the max, or clips
    around the wrong centre."""
    v_old = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    ret = torch.tensor([[2.0, 2.0, 0.0, 1.0]])
    v = torch.tensor([[1.5, 0.9, 0.5, 1.1]]).requires_grad_()
    loss, m = value_loss(v, v_old, ret, torch.ones(1, 4, dtype=torch.bool), clip_eps=0.2)
    loss.backward()
    # token 0: (1.5-2)^2=0.25 vs (1.2-2)^2=0.64 -> 0.64, no grad
    # token 1: 1.21 both (inside the clip range), grad 2(0.9-2) = -2.2
    # token 2: (0.5)^2=0.25 vs (0.8)^2=0.64 -> 0.64, no grad
    # token 3: 0.01 both, grad 2(0.1) = 0.2
    assert loss.item() == pytest.approx((0.64 + 1.21 + 0.64 + 0.01) / 4)
    torch.testing.assert_close(v.grad, torch.tensor([[0.0, -2.2, 0.0, 0.2]]) / 4)
    assert m["value_clip_frac"].item() == pytest.approx(0.5)
    unclipped, _ = value_loss(v, v_old, ret, torch.ones(1, 4, dtype=torch.bool), clip_eps=None)
    assert unclipped.item() == pytest.approx((0.25 + 1.21 + 0.25 + 0.01) / 4)


def test_explained_variance():
    """If this fails, the PPO critic's explained-variance metric is wrong or NaN."""
    ret = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    v = torch.tensor([[1.0, 2.0, 3.0, 5.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    # Var(R) = 1.25; R - V = [0, 0, 0, -1], Var = 0.1875
    assert explained_variance(v, ret, mask).item() == pytest.approx(1 - 0.1875 / 1.25)
    assert explained_variance(v, torch.ones(1, 4), mask).item() == 0.0
    assert explained_variance(v, ret, ~mask).item() == 0.0


def test_entropy_and_kl_loss():
    """If this fails, the entropy bonus has the wrong sign or the KL loss the wrong estimator."""
    ent = torch.tensor([[1.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 0]]).bool()
    assert entropy_loss(ent, mask).item() == pytest.approx(-2.0)
    logp = torch.tensor([[-1.0, -2.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -50.0]])
    assert kl_loss(logp, ref, mask).item() == pytest.approx(kl_k3(logp, ref)[0, :2].mean().item())
    assert kl_loss(logp, ref, mask, estimator="k1").item() == pytest.approx((0.5 - 1.0) / 2)


def test_dpo_loss_hand_values_and_gradient():
    """If this fails, online DPO optimizes the wrong margin (sign, beta, or missing reference)."""
    pc = torch.tensor([-10.0]).requires_grad_()
    pr = torch.tensor([-12.0]).requires_grad_()
    rc, rr = torch.tensor([-11.0]), torch.tensor([-11.0])
    loss, m = dpo_loss(pc, pr, rc, rr, beta=0.1)
    loss.backward()
    z = 0.1 * ((-10 + 11) - (-12 + 11))  # 0.2
    assert loss.item() == pytest.approx(math.log1p(math.exp(-z)))
    sig = 1 / (1 + math.exp(z))
    assert pc.grad.item() == pytest.approx(-0.1 * sig)
    assert pr.grad.item() == pytest.approx(0.1 * sig)
    assert m["reward_accuracy"].item() == 1.0
    assert m["reward_margin"].item() == pytest.approx(0.2)
    assert m["chosen_reward"].item() == pytest.approx(0.1)
    assert m["rejected_reward"].item() == pytest.approx(-0.1)
    g = torch.Generator().manual_seed(0)
    a, b, c, d = (torch.randn(6, generator=g) for _ in range(4))
    loss, _ = dpo_loss(a, b, c, d, beta=0.5)
    torch.testing.assert_close(loss, -F.logsigmoid(0.5 * ((a - c) - (b - d))).mean())
    half1, _ = dpo_loss(a[:2], b[:2], c[:2], d[:2], beta=0.5, normalizer=6)
    half2, _ = dpo_loss(a[2:], b[2:], c[2:], d[2:], beta=0.5, normalizer=6)
    torch.testing.assert_close(half1 + half2, loss)
    empty, _ = dpo_loss(*(torch.zeros(0) for _ in range(4)))
    assert empty.item() == 0.0


def test_sequence_logprobs_and_pair_selection():
    """If this fails, DPO sums log-probs over prompt/padding tokens or pairs the wrong
    responses."""
    tok = torch.tensor([[-1.0, -2.0, -5.0], [-0.5, -9.0, -9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]]).bool()
    torch.testing.assert_close(sequence_logprobs(tok, mask), torch.tensor([-3.0, -0.5]))
    seg = torch.tensor([[0, 0, 1, 1, 1]])
    packed = sequence_logprobs(torch.tensor([[-1.0, -2.0, -0.5, -1.0, -1.0]]),
                               torch.tensor([[1, 1, 1, 0, 0]]).bool(), segment_ids=seg)
    torch.testing.assert_close(packed, torch.tensor([-3.0, -0.5]))
    best, worst, valid = select_dpo_pairs(torch.tensor([0.1, 0.9, 0.5, 2.0, 2.0, 2.0]), 3)
    assert best.tolist() == [1, 3] and worst.tolist() == [0, 3]
    assert valid.tolist() == [True, False]
