"""Advantage estimators (methods.md 2.3) against the textbook recursions written as naive
Python loops, hand-computed examples, and the edge cases (N=1, equal rewards, empty rows)."""

import pytest
import torch

from megarlhf.rl import (
    discounted_returns,
    dr_grpo_advantages,
    gae_advantages,
    grpo_advantages,
    process_rewards,
    reinforce_pp_advantages,
    rloo_advantages,
    whiten,
)


def _textbook_gae(rewards, values, gamma, lam):
    """GAE on one contiguous response given as Python lists (Schulman et al. 2016)."""
    n = len(rewards)
    adv = [0.0] * n
    last = 0.0
    for t in reversed(range(n)):
        next_v = values[t + 1] if t + 1 < n else 0.0
        delta = rewards[t] + gamma * next_v - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv, [a + v for a, v in zip(adv, values)]


def _random_batch(seed, B=5, T=9):
    g = torch.Generator().manual_seed(seed)
    lengths = [9, 4, 1, 6, 0][:B]  # includes a 1-token and an empty response
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, :n] = True
    return (torch.randn(B, T, generator=g), torch.randn(B, T, generator=g), mask, lengths)


def test_gae_hand_example():
    """If this fails, the GAE recursion (bootstrap from V_{t+1}, zero past the end) is wrong."""
    r = torch.tensor([[0.0, 0.0, 1.0]])
    v = torch.ones(1, 3)
    adv, ret = gae_advantages(r, v, torch.ones(1, 3, dtype=torch.bool), gamma=0.9, lam=0.8)
    # t=2: delta = 1 + 0 - 1 = 0; t=1: delta = 0 + 0.9 - 1 = -0.1, A = -0.1;
    # t=0: delta = -0.1, A = -0.1 + 0.72 * -0.1 = -0.172
    torch.testing.assert_close(adv, torch.tensor([[-0.172, -0.1, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.828, 0.9, 1.0]]))


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (1.0, 0.95), (0.99, 0.9)])
def test_gae_matches_textbook_loop(gamma, lam):
    """If this fails, PPO advantages/returns differ from the textbook backward recursion."""
    r, v, mask, lengths = _random_batch(1)
    adv, ret = gae_advantages(r, v, mask, gamma=gamma, lam=lam)
    for b, n in enumerate(lengths):
        ea, er = _textbook_gae(r[b, :n].tolist(), v[b, :n].tolist(), gamma, lam)
        torch.testing.assert_close(adv[b, :n], torch.tensor(ea))
        torch.testing.assert_close(ret[b, :n], torch.tensor(er))
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


def test_gae_skips_holes_and_left_padding():
    """If this fails, masked tokens inside or before a response (prompt, tool output) break
    the bootstrap chain."""
    r, v, _, _ = _random_batch(2, B=1, T=8)
    mask = torch.tensor([[0, 1, 1, 0, 0, 1, 1, 0]]).bool()
    adv, ret = gae_advantages(r, v, mask, gamma=0.97, lam=0.9)
    idx = mask[0].nonzero().squeeze(1)
    ea, er = _textbook_gae(r[0, idx].tolist(), v[0, idx].tolist(), 0.97, 0.9)
    torch.testing.assert_close(adv[0, idx], torch.tensor(ea))
    torch.testing.assert_close(ret[0, idx], torch.tensor(er))


def test_gae_packed_equals_padded():
    """If this fails, GAE leaks across sequence boundaries in packed rows."""
    r, v, mask, lengths = _random_batch(3)
    adv, ret = gae_advantages(r, v, mask, gamma=0.99, lam=0.95)
    # pack all 5 sequences into two rows: [seq0 | pad], [seq1 seq2 seq3 seq4(empty)]
    T = 12
    pr, pv = torch.zeros(2, T), torch.zeros(2, T)
    pm = torch.zeros(2, T, dtype=torch.bool)
    seg = torch.full((2, T), -1)
    places = {0: (0, 0), 1: (1, 0), 2: (1, 4), 3: (1, 5)}
    for b, (row, start) in places.items():
        n = lengths[b]
        pr[row, start:start + n], pv[row, start:start + n] = r[b, :n], v[b, :n]
        pm[row, start:start + n] = True
        seg[row, start:start + n] = b
    padv, pret = gae_advantages(pr, pv, pm, gamma=0.99, lam=0.95, segment_ids=seg)
    for b, (row, start) in places.items():
        n = lengths[b]
        torch.testing.assert_close(padv[row, start:start + n], adv[b, :n])
        torch.testing.assert_close(pret[row, start:start + n], ret[b, :n])


def test_whitening():
    """If this fails, advantage whitening uses masked positions or the wrong variance."""
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]]).bool()
    out = whiten(x, mask)
    vals = torch.tensor([1.0, 2.0, 3.0, 4.0])  # mean 2.5, population var 1.25
    torch.testing.assert_close(out[mask], (vals - 2.5) / torch.sqrt(torch.tensor(1.25 + 1e-8)))
    assert (out[~mask] == 0).all()
    torch.testing.assert_close(whiten(x, mask, shift_mean=False)[mask],
                               (vals - 2.5) / 1.25 ** 0.5 + 2.5)
    adv, _ = gae_advantages(x, torch.zeros_like(x), mask, whiten_advantages=True)
    torch.testing.assert_close(adv[mask].mean(), torch.tensor(0.0), atol=1e-6, rtol=0)
    assert (whiten(torch.full((2, 3), 3.0), torch.ones(2, 3)) == 0).all()


def test_whitening_without_shift_keeps_the_mean_of_constant_input():
    """If this fails, whiten(shift_mean=False) turns constant advantages into 0 instead of
    keeping their mean (scaling without shifting must not move the mean)."""
    const = torch.full((2, 3), 3.0)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]]).bool()
    out = whiten(const, mask, shift_mean=False)
    assert (out[mask] == 3.0).all() and (out[~mask] == 0).all()
    assert (whiten(const, mask)[mask] == 0).all()  # shifted: 0, as before


def test_grpo_broadcast_and_equal_rewards():
    """If this fails, GRPO advantages are not the processed reward on every response token, or
    a group with equal rewards gets a nonzero/NaN advantage."""
    raw = torch.tensor([1.0, 0.0, 1.0, 1.0])  # 2 prompts x N=2; prompt 2 all equal
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]]).bool()
    adv = grpo_advantages(process_rewards(raw, 2), mask)
    a = 0.5 / (0.5 + 1e-6)
    torch.testing.assert_close(adv, torch.tensor([[a, a, 0], [-a, 0, 0], [0, 0, 0],
                                                  [0, 0, 0]]))
    assert torch.isfinite(adv).all()


def test_dr_grpo_centers_without_std():
    """If this fails, Dr.GRPO divides by the std (the bias it exists to remove)."""
    raw = torch.tensor([4.0, 0.0, 1.0, 1.0, 1.0, 5.0])  # N=3
    mask = torch.ones(6, 2, dtype=torch.bool)
    adv = dr_grpo_advantages(raw, mask, 3)
    expected = torch.tensor([4 - 5 / 3, -5 / 3, 1 - 5 / 3, -4 / 3, -4 / 3, 8 / 3])
    torch.testing.assert_close(adv[:, 0], expected)
    torch.testing.assert_close(adv, grpo_advantages(
        process_rewards(raw, 3, scale_by_std=False), mask))


def test_rloo_hand_and_loop():
    """If this fails, the leave-one-out baseline includes the sample itself or the wrong
    group."""
    r = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 0.0, 0.0])
    mask = torch.tensor([[1, 1]] * 8).bool()
    mask[1, 1] = False
    adv = rloo_advantages(r, mask, 4)
    torch.testing.assert_close(adv[:4, 0], torch.tensor([1 - 11 / 3, 2 - 10 / 3, 3 - 9 / 3,
                                                         6 - 6 / 3]))
    assert adv[1, 1] == 0 and (adv[4:] == 0).all()
    g = torch.Generator().manual_seed(4)
    r = torch.randn(12, generator=g)
    adv = rloo_advantages(r, torch.ones(12, 1, dtype=torch.bool), 3)[:, 0]
    for i in range(12):
        grp = range(3 * (i // 3), 3 * (i // 3) + 3)
        base = sum(r[j].item() for j in grp if j != i) / 2
        assert abs(adv[i].item() - (r[i].item() - base)) < 1e-6
    with pytest.raises(ValueError, match="group_size >= 2"):
        rloo_advantages(r, torch.ones(12, 1, dtype=torch.bool), 1)


def test_reinforce_pp_returns_and_global_norm():
    """If this fails, REINFORCE++ returns are not the discounted sums or are normalized per
    sequence instead of over the whole batch."""
    r, _, mask, lengths = _random_batch(5)
    adv, ret = reinforce_pp_advantages(r, mask, gamma=0.9)
    for b, n in enumerate(lengths):
        g, expect = 0.0, [0.0] * n
        for t in reversed(range(n)):
            g = r[b, t].item() + 0.9 * g
            expect[t] = g
        torch.testing.assert_close(ret[b, :n], torch.tensor(expect))
    vals = ret[mask]
    torch.testing.assert_close(adv[mask], (vals - vals.mean()) / vals.var(unbiased=False).add(
        1e-8).sqrt())
    torch.testing.assert_close(discounted_returns(r, mask, gamma=0.9), ret)


def test_all_masked_and_bf16_inputs():
    """If this fails, an empty batch yields NaN advantages, or bf16 inputs are accumulated in
    bf16."""
    r, v, mask, _ = _random_batch(6)
    empty = torch.zeros_like(mask)
    for out in (*gae_advantages(r, v, empty, whiten_advantages=True),
                *reinforce_pp_advantages(r, empty), grpo_advantages(torch.ones(5), empty),
                rloo_advantages(torch.arange(6.0), torch.zeros(6, 3, dtype=torch.bool), 2)):
        assert torch.isfinite(out).all() and (out == 0).all()
    adv16, ret16 = gae_advantages(r.bfloat16(), v.bfloat16(), mask, gamma=0.99, lam=0.95)
    adv32, ret32 = gae_advantages(r.bfloat16().float(), v.bfloat16().float(), mask, gamma=0.99,
                                  lam=0.95)
    assert adv16.dtype == torch.float32
    torch.testing.assert_close(adv16, adv32)
    torch.testing.assert_close(ret16, ret32)
