"""Reward processing of methods.md 2.2 on worked examples: clip, group/batch normalization,
asymmetric shrinking, KL folded into per-token rewards."""

import math

import pytest
import torch

from megarlhf.rl import (
    clip_rewards,
    normalize_rewards,
    process_rewards,
    rewards_with_kl,
    shrink_negative_rewards,
    token_level_rewards,
)

EPS = 1e-6


def test_worked_example_clip_normalize_shrink():
    """If this fails, the 2.2 pipeline (order clip -> group norm -> shrink, population std,
    eps on the std) no longer matches the spec's worked numbers."""
    raw = torch.tensor([3.0, 1.0, -2.0, 0.0, 5.0, 5.0, 5.0, 5.0])  # 2 prompts x N=4
    out = process_rewards(raw, 4, clip=2.5, normalization="group", shrink_alpha=0.5)
    # group 1 after clipping: [2.5, 1, -2, 0]; mean 0.375; deviations 2.125, 0.625, -2.375,
    # -0.375; squares sum to 10.6875; population std sqrt(10.6875 / 4)
    std = math.sqrt(10.6875 / 4)
    expected = [2.125 / (std + EPS), 0.625 / (std + EPS), 0.5 * -2.375 / (std + EPS),
                0.5 * -0.375 / (std + EPS),
                0.0, 0.0, 0.0, 0.0]  # group 2: all rewards equal -> exactly 0
    torch.testing.assert_close(out, torch.tensor(expected))
    assert (out[4:] == 0).all()


def test_unbiased_std_option():
    """If this fails, the unbiased-std option divides by the wrong count."""
    r = torch.tensor([2.5, 1.0, -2.0, 0.0])
    std = math.sqrt(10.6875 / 3)
    out = normalize_rewards(r, 4, "group", unbiased_std=True)
    torch.testing.assert_close(out, (r - 0.375) / (std + EPS))


def test_group_of_one_normalizes_over_the_batch():
    """If this fails, N=1 with group normalization zeroes every reward (a group of one has
    std 0) instead of normalizing over the batch as the spec says."""
    r = torch.tensor([1.0, 2.0, 3.0])
    std = math.sqrt(2.0 / 3.0)
    expected = torch.tensor([-1.0, 0.0, 1.0]) / (std + EPS)
    torch.testing.assert_close(normalize_rewards(r, 1, "group"), expected)
    torch.testing.assert_close(normalize_rewards(r, 1, "batch"), expected)
    assert normalize_rewards(torch.tensor([7.0]), 1, "group").item() == 0.0


def test_batch_and_none_modes():
    """If this fails, "batch" does not pool all groups or "none" alters the rewards."""
    r = torch.tensor([0.0, 2.0, 4.0, 6.0])
    std = math.sqrt(20.0 / 4)
    torch.testing.assert_close(normalize_rewards(r, 2, "batch"),
                               torch.tensor([-3.0, -1.0, 1.0, 3.0]) / (std + EPS))
    torch.testing.assert_close(normalize_rewards(r, 2, "none"), r)
    torch.testing.assert_close(normalize_rewards(r, 2, "group", scale_by_std=False),
                               torch.tensor([-1.0, 1.0, -1.0, 1.0]))


def test_equal_rewards_give_exact_zero_never_nan():
    """If this fails, a prompt whose N responses all got the same reward (common with 0/1
    verifiers) produces NaN or round-off noise amplified by 1/eps."""
    r = torch.tensor([0.1, 0.1, 0.1, 1.0, 1.0, 1.0]).bfloat16()
    for mode in ("group", "batch"):
        for unbiased in (False, True):
            out = normalize_rewards(r[:3] if mode == "batch" else r, 3, mode,
                                    unbiased_std=unbiased)
            assert out.dtype == torch.float32
            assert torch.isfinite(out).all() and (out == 0).all()


def test_clip_and_shrink():
    """If this fails, clipping is not symmetric or shrinking touches non-negative rewards."""
    torch.testing.assert_close(clip_rewards(torch.tensor([-5.0, 0.5, 9.0]), 2.0),
                               torch.tensor([-2.0, 0.5, 2.0]))
    torch.testing.assert_close(shrink_negative_rewards(torch.tensor([-2.0, 0.0, 3.0]), 0.25),
                               torch.tensor([-0.5, 0.0, 3.0]))
    with pytest.raises(ValueError):
        shrink_negative_rewards(torch.tensor([1.0]), 1.5)
    with pytest.raises(ValueError):
        normalize_rewards(torch.tensor([1.0, 2.0, 3.0]), 2)


def test_token_rewards_last_valid_token_and_kl_fold():
    """If this fails, the sequence reward lands on the wrong token (left padding, holes) or the
    KL penalty is not subtracted per token."""
    mask = torch.tensor([[0, 1, 1, 0, 1, 0],     # left pad, a hole, right pad: last valid t=4
                         [1, 1, 1, 1, 1, 1],
                         [0, 0, 0, 0, 0, 0]]).bool()  # empty response
    seq = torch.tensor([1.0, -2.0, 5.0])
    kl = torch.full((3, 6), 0.5)
    out = token_level_rewards(seq, mask, kl=kl, kl_coef=0.1)
    expected = torch.tensor([[0, -0.05, -0.05, 0, 1 - 0.05, 0],
                             [-0.05] * 5 + [-2 - 0.05],
                             [0.0] * 6])
    torch.testing.assert_close(out, expected)


def test_rewards_with_kl_modes():
    """If this fails, kl_mode="loss" leaks the KL into the reward (double penalty) or "reward"
    forgets it."""
    mask = torch.tensor([[1, 1, 1]]).bool()
    logp = torch.tensor([[-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -0.5, -1.0]])
    tr, kl = rewards_with_kl(torch.tensor([2.0]), mask, logp, ref, kl_mode="reward",
                             kl_coef=0.2, estimator="k1")
    torch.testing.assert_close(kl, torch.tensor([[0.5, -0.5, 0.0]]))
    torch.testing.assert_close(tr, torch.tensor([[-0.1, 0.1, 2.0]]))
    for mode in ("loss", "none"):
        tr, kl = rewards_with_kl(torch.tensor([2.0]), mask, logp, ref, kl_mode=mode,
                                 kl_coef=0.2)
        torch.testing.assert_close(tr, torch.tensor([[0.0, 0.0, 2.0]]))
        torch.testing.assert_close(kl, torch.tensor([[0.5, -0.5, 0.0]]))


def test_token_rewards_packed_equal_padded():
    """If this fails, packed rows (several responses per row + segment ids) get rewards on the
    wrong tokens."""
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]).bool()
    seq = torch.tensor([1.0, 2.0, 3.0])
    kl = torch.arange(12.0).view(3, 4) / 10
    padded = token_level_rewards(seq, mask, kl=kl, kl_coef=0.5)
    # pack: row 0 = seq 0 (3 tokens) + seq 1 (2 tokens); row 1 = seq 2 (4 tokens) + padding
    pmask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]).bool()
    seg = torch.tensor([[0, 0, 0, 1, 1], [2, 2, 2, 2, -1]])
    pkl = torch.tensor([[0.0, 0.1, 0.2, 0.4, 0.5], [0.8, 0.9, 1.0, 1.1, 0.0]])
    packed = token_level_rewards(seq, pmask, kl=pkl, kl_coef=0.5, segment_ids=seg)
    torch.testing.assert_close(packed[0, :3], padded[0, :3])
    torch.testing.assert_close(packed[0, 3:], padded[1, :2])
    torch.testing.assert_close(packed[1, :4], padded[2])
    assert packed[1, 4] == 0
