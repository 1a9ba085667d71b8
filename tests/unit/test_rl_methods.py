"""The policy-optimisation methods of docs/methods.md (GSPO, GSPO-token, CISPO, off-policy
weights, DAPO's length shaping and dynamic-sampling filter, k1+/k3+, the adaptive KL
controller) against hand-computed values and plain-Python-loop references, in value and in
gradient; packed rows against padded rows."""

import math

import pytest
import torch

from megarlhf.rl import (
    adaptive_kl_coef,
    aggregate,
    cispo_loss,
    gspo_loss,
    informative_groups,
    kl_estimate,
    kl_k2,
    kl_k3,
    off_policy_weights,
    overlong_penalty,
    policy_loss,
)

pytestmark = pytest.mark.unit


def _seqs(seed=0, lengths=(3, 5, 1, 4)):
    """Padded (B, T) log-probs of a current / old policy and advantages, with random lengths."""
    g = torch.Generator().manual_seed(seed)
    B, T = len(lengths), max(lengths) + 1
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, 1:1 + n] = True  # one prompt token first
    logp = -1.0 + 0.3 * torch.randn(B, T, generator=g)
    logp_old = logp + 0.05 * torch.randn(B, T, generator=g)
    adv_seq = torch.randn(B, generator=g)
    adv = adv_seq[:, None].expand(B, T).clone()
    return logp, logp_old, adv, mask, list(lengths)


def _loop_gspo(logp, logp_old, adv, lengths, eps_low, eps_high):
    """GSPO written per sequence with Python floats turned tensors (Zheng et al. 2025, eq. 5):
    1/G sum_i -min(s_i A_i, clip(s_i) A_i), s_i = exp(mean_t(logp - logp_old))."""
    total = 0.0
    for b, n in enumerate(lengths):
        lr = sum(logp[b, 1 + t] - logp_old[b, 1 + t] for t in range(n)) / n
        s = torch.exp(lr)
        a = float(adv[b, 1])
        total = total + -torch.minimum(s * a, s.clamp(1 - eps_low, 1 + eps_high) * a)
    return total / len(lengths)


# ------------------------------------------------------------------ GSPO
def test_gspo_hand_example():
    """If this fails, GSPO's sequence ratio is no longer the length-normalised (geometric
    mean) ratio, or its clipping is not per sequence."""
    mask = torch.tensor([[True, True], [True, False]])
    logp_old = torch.zeros(2, 2)
    logp = torch.tensor([[0.2, 0.0], [-0.5, 9.0]])  # 9.0 is padding: ignored
    adv = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    loss, m = gspo_loss(logp, logp_old, adv, mask, eps_low=0.2, eps_high=0.2)
    s1, s2 = math.exp(0.1), math.exp(-0.5)  # mean log ratio over 2 and 1 tokens
    # seq 1: A = 1, s1 = 1.105 in range -> -s1; seq 2: A = -1, s2 = 0.607 < 0.8 -> clipped:
    # -min(-s2, -0.8) = 0.8
    assert float(loss) == pytest.approx((-s1 + 0.8) / 2, abs=1e-6)
    assert float(m["clip_frac"]) == pytest.approx(1 / 3)  # the 1 token of seq 2 of 3 tokens
    assert float(m["ratio_mean"]) == pytest.approx((2 * s1 + s2) / 3, abs=1e-6)


@pytest.mark.parametrize("token_level", [False, True])
def test_gspo_and_gspo_token_match_the_sequence_loop_in_value_and_gradient(token_level):
    """If this fails, GSPO (or GSPO-token, which must equal it when advantages are per
    sequence) differs from the paper's per-sequence objective in value or gradient."""
    logp, logp_old, adv, mask, lengths = _seqs(1)
    x = logp.clone().requires_grad_()
    loss, _ = gspo_loss(x, logp_old, adv, mask, eps_low=0.02, eps_high=0.03,
                        token_level=token_level, agg_mode="seq_mean_token_mean")
    loss.backward()
    y = logp.clone().requires_grad_()
    ref = _loop_gspo(y, logp_old, adv, lengths, 0.02, 0.03)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(x.grad, y.grad)
    assert (x.grad[~mask] == 0).all()


def test_gspo_packed_rows_equal_padded_rows():
    """If this fails, GSPO's per-sequence ratio mixes the sequences packed into one row."""
    logp, logp_old, adv, mask, lengths = _seqs(2, lengths=(2, 3, 4))
    padded, _ = gspo_loss(logp, logp_old, adv, mask, agg_mode="seq_mean_token_mean",
                          eps_low=0.01, eps_high=0.01)
    # Pack the three responses into one row, in order, with segment ids 0, 1, 2.
    row_lp, row_old, row_adv, seg = [], [], [], []
    for b, n in enumerate(lengths):
        sel = mask[b]
        row_lp += logp[b, sel].tolist()
        row_old += logp_old[b, sel].tolist()
        row_adv += adv[b, sel].tolist()
        seg += [b] * n
    packed, _ = gspo_loss(torch.tensor([row_lp]), torch.tensor([row_old]),
                          torch.tensor([row_adv]), torch.ones(1, len(seg), dtype=torch.bool),
                          agg_mode="seq_mean_token_mean", segment_ids=torch.tensor([seg]),
                          eps_low=0.01, eps_high=0.01)
    torch.testing.assert_close(packed, padded)


def test_gspo_token_keeps_per_token_advantages():
    """If this fails, GSPO-token no longer weights each token by its own advantage (what lets
    per-token advantages such as a KL penalty in the reward through)."""
    mask = torch.ones(1, 3, dtype=torch.bool)
    logp = torch.zeros(1, 3, requires_grad=True)
    adv = torch.tensor([[1.0, 2.0, -1.0]])
    loss, _ = gspo_loss(logp, torch.zeros(1, 3), adv, mask, token_level=True,
                        agg_mode="token_mean")
    loss.backward()
    # s = 1 on every token: gradient of -s_{i,t} A_t / 3 w.r.t. logp_t is -A_t / 3.
    torch.testing.assert_close(logp.grad, -adv / 3)


def test_gspo_equals_ppo_with_one_token_responses():
    """If this fails, GSPO with single-token responses (where s_i is the token ratio) differs
    from PPO's clipped surrogate."""
    g = torch.Generator().manual_seed(3)
    logp, logp_old = torch.randn(6, 1, generator=g), torch.randn(6, 1, generator=g)
    adv, mask = torch.randn(6, 1, generator=g), torch.ones(6, 1, dtype=torch.bool)
    a, _ = gspo_loss(logp, logp_old, adv, mask, eps_low=0.2, eps_high=0.28,
                     agg_mode="seq_mean_token_mean")
    b, _ = policy_loss(logp, logp_old, adv, mask, eps_low=0.2, eps_high=0.28)
    torch.testing.assert_close(a, b)


# ------------------------------------------------------------------ CISPO
def test_cispo_gradient_is_the_clipped_weight_times_reinforce():
    """If this fails, CISPO's gradient is not sg(clip(rho)) * A * grad log pi on every token
    (MiniMax-M1 eq. 4), e.g. clipped tokens lose their gradient as in PPO."""
    logp, logp_old, adv, mask, lengths = _seqs(4)
    logp_old = logp_old.clone()
    logp_old[0, 1] = logp[0, 1] - 1.0  # rho = e: far above 1 + eps_high
    x = logp.clone().requires_grad_()
    loss, m = cispo_loss(x, logp_old, adv, mask, eps_low=0.2, eps_high=0.28)
    loss.backward()
    # The objective, looped: J = 1/sum|y| sum_t sg(w_t) A_t log pi_t (minimised as -J).
    y = logp.clone().requires_grad_()
    n = sum(lengths)
    ref = 0.0
    for b, L in enumerate(lengths):
        for t in range(1, 1 + L):
            rho = math.exp(float(logp[b, t] - logp_old[b, t]))
            w = min(max(rho, 0.8), 1.28)
            ref = ref - w * float(adv[b, t]) * y[b, t] / n
    ref.backward()
    torch.testing.assert_close(x.grad, y.grad)
    assert x.grad[0, 1] != 0  # clipped, and still a gradient
    # Its value is -w * A averaged (the surrogate at the current point).
    rho = torch.exp(logp - logp_old).clamp(0.8, 1.28)
    torch.testing.assert_close(loss, aggregate(-rho * adv, mask))
    assert float(m["clip_frac_high"]) >= 1 / n


def test_cispo_without_lower_bound():
    """If this fails, eps_low >= 1 (the paper's setting: no lower bound) still clips below."""
    mask = torch.ones(1, 2, dtype=torch.bool)
    logp = torch.log(torch.tensor([[0.1, 3.0]])).requires_grad_()
    loss, m = cispo_loss(logp, torch.zeros(1, 2), torch.ones(1, 2), mask, eps_low=1.0,
                         eps_high=1.0)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.1 / 2, -2.0 / 2]]))
    assert float(m["clip_frac_low"]) == 0 and float(m["clip_frac_high"]) == 0.5


# ------------------------------------------------------------------ off-policy weights
def _loop_weights(logp, logp_b, lengths, correction, upper, lower):
    out = torch.zeros_like(logp)
    for b, n in enumerate(lengths):
        toks = [math.exp(float(logp[b, 1 + t] - logp_b[b, 1 + t])) for t in range(n)]
        seq = math.prod(toks)
        for t in range(n):
            rho = seq if correction.startswith("seq") else toks[t]
            if correction.endswith("tis"):
                w = min(rho, upper)
            else:
                ok = rho <= upper and (lower is None or rho >= lower)
                w = rho if ok else 0.0
            out[b, 1 + t] = w
    return out


@pytest.mark.parametrize("correction,upper,lower", [
    ("token_tis", 1.05, None), ("seq_tis", 1.1, None), ("token_mis", 1.05, None),
    ("token_mis", 1.05, 0.95), ("seq_mis", 1.1, 0.9), ("icepop", 1.05, 0.95)])
def test_off_policy_weights_match_the_loop(correction, upper, lower):
    """If this fails, a correction truncates / rejects at the wrong level (token vs whole
    sequence) or bound, or its metrics (fraction masked, spread) are wrong."""
    logp, logp_b, _, mask, lengths = _seqs(5)
    logp_b = logp + 0.08 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(9))
    w, m = off_policy_weights(logp, logp_b, mask, correction, upper=upper, lower=lower)
    want = _loop_weights(logp, logp_b, lengths, correction, upper, lower)
    torch.testing.assert_close(w, want)
    valid = want[mask]
    assert float(m["weight_mean"]) == pytest.approx(float(valid.mean()), abs=1e-6)
    assert float(m["weight_std"]) == pytest.approx(float(valid.std(unbiased=False)), abs=1e-6)
    if correction.endswith("tis"):
        assert float(m["masked_frac"]) == 0 and 0 < float(m["truncated_frac"]) < 1
    else:
        assert float(m["masked_frac"]) == pytest.approx(float((valid == 0).float().mean()))
        assert 0 < float(m["masked_frac"]) < 1
    assert float(m["ratio_max"]) >= float(m["ratio_min"]) > 0
    assert float(m["mismatch_kl"]) > 0


def test_off_policy_weights_hand_values_and_errors():
    """If this fails, the documented formulas (min(rho, U); rho * 1[L <= rho <= U]) changed."""
    mask = torch.ones(1, 3, dtype=torch.bool)
    lp = torch.log(torch.tensor([[3.0, 1.0, 0.25]]))
    zero = torch.zeros(1, 3)
    w, _ = off_policy_weights(lp, zero, mask, "token_tis", upper=2.0)
    torch.testing.assert_close(w, torch.tensor([[2.0, 1.0, 0.25]]))
    w, m = off_policy_weights(lp, zero, mask, "icepop", upper=5.0, lower=0.5)
    torch.testing.assert_close(w, torch.tensor([[3.0, 1.0, 0.0]]))
    assert float(m["masked_frac"]) == pytest.approx(1 / 3)
    w, _ = off_policy_weights(lp, zero, mask, "seq_mis", upper=1.0)  # rho = 0.75: kept
    torch.testing.assert_close(w, torch.full((1, 3), 0.75))
    w, _ = off_policy_weights(lp, zero, mask, "seq_tis", upper=0.5)
    torch.testing.assert_close(w, torch.full((1, 3), 0.5))
    with pytest.raises(ValueError, match="token_tis"):
        off_policy_weights(lp, zero, mask, "tis", upper=2.0)
    with pytest.raises(ValueError, match="lower < upper"):
        off_policy_weights(lp, zero, mask, "icepop", upper=0.5, lower=2.0)


# ------------------------------------------------------------------ DAPO pieces
def test_overlong_penalty_hand_values():
    """If this fails, DAPO's soft overlong punishment (0, then a linear ramp to -1 over the
    buffer, -1 at the limit) changed."""
    lengths = torch.tensor([10, 16, 17, 18, 20, 25])
    got = overlong_penalty(lengths, max_len=20, buffer=4)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0, -1.0]))
    torch.testing.assert_close(overlong_penalty(lengths, 20, 4, factor=0.5), got * 0.5)
    with pytest.raises(ValueError, match="overlong buffer"):
        overlong_penalty(lengths, 20, 21)


def test_informative_groups_equal_and_unequal():
    """If this fails, dynamic sampling keeps prompts without a learning signal (all samples
    rewarded alike) or drops ones with it."""
    r = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    assert informative_groups(r, 2).tolist() == [False, False, True, True, False, False]
    ids = torch.tensor([7, 7, 7, 3, 3, 9])  # unequal groups; a group of one never informs
    assert informative_groups(r, group_ids=ids).tolist() == [True, True, True, True, True,
                                                             False]


# ------------------------------------------------------------------ KL
def test_straight_through_kl_values_and_gradients():
    """If this fails, k1+/k3+ no longer report k1/k3 while taking k2's gradient (the unbiased
    gradient of KL(pi || pi_ref) as a loss)."""
    ref = torch.tensor([-1.0, -2.0, -0.5])
    for name, base in (("k3+", "k3"), ("k1+", "k1")):
        x = torch.tensor([-1.2, -1.0, -0.5], requires_grad=True)
        v = kl_estimate(x, ref, name)
        torch.testing.assert_close(v, kl_estimate(x.detach(), ref, base))
        v.sum().backward()
        torch.testing.assert_close(x.grad, (x - ref).detach())  # d k2 / d logp = logp - ref
    # The clamp bounds the log ratio before the estimator (and kills its gradient outside).
    x = torch.tensor([5.0], requires_grad=True)
    v = kl_estimate(x, torch.zeros(1), "k3+", clamp=1.0)
    torch.testing.assert_close(v, kl_k3(torch.ones(1), torch.zeros(1)))
    v.backward()
    assert float(x.grad) == 0.0
    torch.testing.assert_close(kl_k2(x.detach(), torch.zeros(1), clamp=1.0), torch.tensor([0.5]))


def test_adaptive_kl_controller_hand_values():
    """If this fails, the adaptive KL controller (Ziegler et al. 2019) moves beta by other
    than clip(KL/target - 1, +-0.2) * n / horizon."""
    assert adaptive_kl_coef(0.1, 0.15, 0.1, 1000, 100) == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    assert adaptive_kl_coef(0.1, 0.095, 0.1, 1000, 100) == pytest.approx(0.1 * (1 - 0.05 * 0.1))
    assert adaptive_kl_coef(0.1, 0.0, 0.1, 10, 10) == pytest.approx(0.1 * 0.8)
    beta = 0.1
    for _ in range(50):  # KL stays above target: beta grows geometrically, never jumps
        beta = adaptive_kl_coef(beta, 1.0, 0.1, 100, 10)
    assert beta == pytest.approx(0.1 * 1.02 ** 50)
    with pytest.raises(ValueError, match="target > 0"):
        adaptive_kl_coef(0.1, 0.1, 0.0, 10, 1)
