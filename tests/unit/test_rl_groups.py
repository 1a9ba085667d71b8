"""Groups of unequal size (a prompt that kept only some of its samples) through every
group-based estimator: GRPO normalization, Dr.GRPO, RLOO, REINFORCE++-baseline and online-DPO
pairs, each against a plain-Python loop over the groups; equal groups given as ``group_ids``
give exactly what ``group_size`` gives, in any order of the samples."""

import math

import pytest
import torch

from megarlhf.rl import (
    dr_grpo_advantages,
    normalize_rewards,
    process_rewards,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
    rloo_baseline_advantages,
    token_level_rewards,
)
from megarlhf.rl.losses import select_dpo_pairs

pytestmark = pytest.mark.unit

# Four prompts with 3, 1, 4 and 2 samples, interleaved (not consecutive), the third group tied.
IDS = torch.tensor([0, 2, 0, 1, 2, 3, 2, 0, 3, 2])
R = torch.tensor([1.0, 0.5, 0.0, 0.7, 0.5, 2.0, 0.5, 0.5, -1.0, 0.5])


def _members():
    return {int(g): [i for i in range(len(IDS)) if int(IDS[i]) == int(g)] for g in IDS.unique()}


def _loop_normalize(r, scale, unbiased, eps=1e-6):
    out = [0.0] * len(r)
    for rows in _members().values():
        vals = [float(r[i]) for i in rows]
        n = len(vals)
        if n < 2 or max(vals) == min(vals):
            continue  # a group of one or a tied group: 0
        mean = sum(vals) / n
        var = sum((v - mean) ** 2 for v in vals) / (n - 1 if unbiased else n)
        for i in rows:
            out[i] = (float(r[i]) - mean) / ((math.sqrt(var) + eps) if scale else 1.0)
    return torch.tensor(out)


@pytest.mark.parametrize("scale,unbiased", [(True, False), (True, True), (False, False)])
def test_group_normalization_of_unequal_groups_matches_the_loop(scale, unbiased):
    """If this fails, GRPO / Dr.GRPO normalization uses the wrong group members, sizes or
    std (n vs n - 1) when groups differ in size or are not consecutive."""
    got = normalize_rewards(R, mode="group", scale_by_std=scale, unbiased_std=unbiased,
                            group_ids=IDS)
    torch.testing.assert_close(got, _loop_normalize(R, scale, unbiased))
    mask = torch.ones(len(R), 2)
    if not scale:
        torch.testing.assert_close(dr_grpo_advantages(R, mask, group_ids=IDS),
                                   _loop_normalize(R, False, False)[:, None] * mask)


@pytest.mark.parametrize("unbiased", [False, True])
def test_equal_groups_by_ids_equal_groups_by_size_in_any_order(unbiased):
    """If this fails, the unequal-group path disagrees with the equal-group one, or depends on
    where a prompt's samples sit in the batch."""
    g = torch.Generator().manual_seed(0)
    r = torch.randint(0, 3, (12,), generator=g).float()
    by_size = process_rewards(r, 4, unbiased_std=unbiased)
    ids = torch.arange(12) // 4
    torch.testing.assert_close(process_rewards(r, group_ids=ids, unbiased_std=unbiased),
                               by_size)
    perm = torch.randperm(12, generator=g)
    torch.testing.assert_close(process_rewards(r[perm], group_ids=ids[perm],
                                               unbiased_std=unbiased), by_size[perm])
    torch.testing.assert_close(rloo_baseline_advantages(r[perm], group_ids=ids[perm]),
                               rloo_baseline_advantages(r, 4)[perm])
    # N = 1 everywhere: batch normalization, as with group_size = 1.
    torch.testing.assert_close(normalize_rewards(r, group_ids=torch.arange(12)),
                               normalize_rewards(r, 1))


def test_rloo_unequal_groups_match_the_loop():
    """If this fails, RLOO's leave-one-out baseline uses the wrong group size, or a response
    alone in its group gets a non-zero advantage."""
    want = [0.0] * len(R)
    for rows in _members().values():
        vals = [float(R[i]) for i in rows]
        if len(vals) < 2:
            continue
        for i in rows:
            want[i] = float(R[i]) - (sum(vals) - float(R[i])) / (len(vals) - 1)
    got = rloo_baseline_advantages(R, group_ids=IDS)
    torch.testing.assert_close(got, torch.tensor(want))
    assert float(got[3]) == 0.0  # group 1 has one sample
    mask = torch.ones(len(R), 3)
    torch.testing.assert_close(rloo_advantages(R, mask, group_ids=IDS), got[:, None] * mask)


def test_reinforce_pp_baseline_matches_the_loop():
    """If this fails, REINFORCE++-baseline no longer subtracts the group mean (no std) before
    REINFORCE++'s token returns and batch normalization."""
    mask = torch.zeros(len(R), 4)
    for b in range(len(R)):
        mask[b, : 1 + b % 4] = 1
    kl = 0.1 * torch.ones(len(R), 4)
    adv, ret = reinforce_pp_baseline_advantages(R, mask, kl=kl, kl_coef=0.5, group_ids=IDS)
    # The loop: group means, then returns-to-go with the KL penalty, then global whitening.
    means = {g: sum(float(R[i]) for i in rows) / len(rows) for g, rows in _members().items()}
    returns = torch.zeros(len(R), 4)
    for b in range(len(R)):
        n = int(mask[b].sum())
        for t in range(n):
            returns[b, t] = -0.05 * (n - t) + (float(R[b]) - means[int(IDS[b])])
    vals = returns[mask.bool()]
    want = (returns - vals.mean()) / torch.sqrt(vals.var(unbiased=False) + 1e-8) * mask
    torch.testing.assert_close(ret, returns * mask)
    torch.testing.assert_close(adv, want, atol=1e-5, rtol=1e-5)
    # Equal groups: the same as centering, folding the KL, then reinforce_pp_advantages.
    r = torch.tensor([1.0, 0.0, 0.0, 0.0])
    m = torch.ones(4, 2)
    centered = normalize_rewards(r, 2, scale_by_std=False)
    want2 = reinforce_pp_advantages(token_level_rewards(centered, m), m)
    got2 = reinforce_pp_baseline_advantages(r, m, 2)
    torch.testing.assert_close(got2[0], want2[0])


def test_dpo_pairs_of_unequal_groups():
    """If this fails, online DPO pairs a prompt's best and worst samples across groups, or a
    group of one (or a tie) yields a pair."""
    best, worst, valid = select_dpo_pairs(R, group_ids=IDS)
    # groups in label order 0, 1, 2, 3: rows {0,2,7}, {3}, {1,4,6,9}, {5,8}
    assert best.tolist() == [0, 3, 1, 5] and worst.tolist() == [2, 3, 1, 8]
    assert valid.tolist() == [True, False, False, True]
    b2, w2, v2 = select_dpo_pairs(torch.tensor([0.0, 1.0, 1.0, 1.0]), 2)
    assert b2.tolist() == [1, 2] and w2.tolist() == [0, 2] and v2.tolist() == [True, False]
