"""Reward-model losses and metrics (methods.md 1.1, 1.2): Bradley-Terry + BCE multi-task ORM,
PRM per-step BCE with soft/hard labels, PRM sequence scores, accuracy and rank-based AUC."""

import math

import pytest
import torch

from megarlhf.rl import (
    KIND_BINARY,
    KIND_CHOSEN,
    KIND_IGNORE,
    KIND_REJECTED,
    binary_accuracy,
    binary_auc,
    binary_ce_loss,
    bradley_terry_loss,
    orm_multitask_loss,
    pairwise_accuracy,
    prm_sequence_score,
    prm_step_loss,
)


def softplus(x):
    return math.log1p(math.exp(x))


BT_EXPECTED = (softplus(-1.0) + softplus(1.0)) / 2     # pairs (2 vs 1) and (0 vs 1)
BCE_EXPECTED = (math.log(2.0) + softplus(2.0)) / 2     # (s=0, l=1) and (s=2, l=0)


def test_bradley_terry_and_bce_hand_values():
    """If this fails, the ORM's pairwise or binary loss has the wrong formula or sign."""
    assert bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])).item() == \
        pytest.approx(BT_EXPECTED)
    assert binary_ce_loss(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0])).item() == \
        pytest.approx(BCE_EXPECTED)


def test_orm_multitask_mixed_batch():
    """If this fails, a batch mixing preference pairs and binary rows is not L_bin + L_pref with
    each term averaged over its own kind (or pairs are matched wrongly)."""
    scores = torch.tensor([2.0, 0.0, 1.0, 0.0, 2.0, 1.0, 55.0]).requires_grad_()
    kinds = torch.tensor([KIND_CHOSEN, KIND_BINARY, KIND_REJECTED, KIND_CHOSEN, KIND_BINARY,
                          KIND_REJECTED, KIND_IGNORE])
    labels = torch.tensor([-1.0, 1.0, -1.0, -1.0, 0.0, -1.0, 1.0])
    loss, m = orm_multitask_loss(scores, kinds, labels)
    loss.backward()
    assert loss.item() == pytest.approx(BT_EXPECTED + BCE_EXPECTED)
    assert m["loss_pref"].item() == pytest.approx(BT_EXPECTED)
    assert m["loss_bin"].item() == pytest.approx(BCE_EXPECTED)
    assert m["pair_accuracy"].item() == pytest.approx(0.5)
    assert m["chosen_reward"].item() == pytest.approx(1.0)
    assert m["rejected_reward"].item() == pytest.approx(1.0)
    assert m["binary_accuracy"].item() == pytest.approx(0.0)  # s=0 -> "no" on l=1; s=2 on l=0
    assert m["binary_auc"].item() == pytest.approx(0.0)
    assert scores.grad[6] == 0  # ignored row
    # sigmoid(1-2)-... : d/ds_c of softplus(-(s_c - s_r)) = -sigmoid(-(s_c - s_r)), / 2 pairs
    assert scores.grad[0].item() == pytest.approx(-1 / (1 + math.e) / 2)


def test_orm_missing_kind_contributes_zero():
    """If this fails, a batch with only pairs (or only binary rows, or nothing) gets NaN from
    the empty term's mean."""
    s = torch.tensor([2.0, 1.0, 0.0, 1.0]).requires_grad_()
    only_pairs, m = orm_multitask_loss(s, torch.tensor([KIND_CHOSEN, KIND_REJECTED] * 2))
    assert only_pairs.item() == pytest.approx(BT_EXPECTED)
    assert m["loss_bin"].item() == 0.0 and math.isnan(m["binary_auc"].item())
    only_bin, _ = orm_multitask_loss(torch.tensor([0.0, 2.0]), torch.tensor([0, 0]),
                                     torch.tensor([1.0, 0.0]))
    assert only_bin.item() == pytest.approx(BCE_EXPECTED)
    nothing, _ = orm_multitask_loss(s, torch.full((4,), KIND_IGNORE))
    nothing.backward()
    assert nothing.item() == 0.0 and (s.grad == 0).all()
    with pytest.raises(ValueError, match="chosen"):
        orm_multitask_loss(s, torch.tensor([KIND_CHOSEN, KIND_CHOSEN, KIND_REJECTED, -1]))


def test_orm_normalizers_sum_over_microbatches():
    """If this fails, splitting an RM batch into micro-batches changes the loss."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(12, generator=g)
    kinds = torch.tensor([1, 2, 0, 0, 1, 2, 0, 1, 2, 1, 2, 0])
    labels = (torch.rand(12, generator=g) > 0.5).float()
    full, _ = orm_multitask_loss(scores, kinds, labels)
    parts = [slice(0, 6), slice(6, 12)]
    n_pairs, n_bin = int((kinds == KIND_CHOSEN).sum()), int((kinds == KIND_BINARY).sum())
    total = sum(orm_multitask_loss(scores[p], kinds[p], labels[p], pair_normalizer=n_pairs,
                                   binary_normalizer=n_bin)[0] for p in parts)
    torch.testing.assert_close(total, full)


def test_prm_step_loss_soft_and_hard():
    """If this fails, the PRM is trained at non-step positions or with the wrong label type."""
    logits = torch.tensor([[0.0, 1.0, 7.0, 2.0]]).requires_grad_()
    steps = torch.tensor([[1, 0, 0, 1]]).bool()
    soft, m = prm_step_loss(logits, steps, torch.tensor([[0.5, 9.0, 9.0, 1.0]]))
    assert soft.item() == pytest.approx((math.log(2.0) + softplus(-2.0)) / 2)
    assert m["num_steps"].item() == 2
    assert m["step_accuracy"].item() == pytest.approx(0.5)  # logit 0 is "no", label 0.5 "yes"
    hard, _ = prm_step_loss(logits, steps, torch.tensor([[0.25, 0.0, 0.0, 0.0]]),
                            label_type="hard")  # any success -> 1; none -> 0
    assert hard.item() == pytest.approx((math.log(2.0) + softplus(2.0)) / 2)
    hard.backward()
    assert logits.grad[0, 1] == 0 and logits.grad[0, 2] == 0
    none, _ = prm_step_loss(logits, torch.zeros_like(steps), torch.zeros(1, 4))
    assert none.item() == 0.0


def test_prm_sequence_score_reductions():
    """If this fails, best-of-N with a PRM ranks responses by the wrong step aggregate."""
    p = torch.tensor([[0.9, 0.0, 0.5, 0.8], [0.6, 0.3, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5]])
    logits = torch.log(p / (1 - p))
    steps = torch.tensor([[1, 0, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]]).bool()
    torch.testing.assert_close(prm_sequence_score(logits, steps, "last"),
                               torch.tensor([0.8, 0.3, 0.0]))
    torch.testing.assert_close(prm_sequence_score(logits, steps, "min"),
                               torch.tensor([0.5, 0.3, 0.0]))
    torch.testing.assert_close(prm_sequence_score(logits, steps, "prod"),
                               torch.tensor([0.9 * 0.5 * 0.8, 0.6 * 0.3, 0.0]))


def _naive_auc(scores, labels):
    pos = [s for s, l in zip(scores, labels) if l >= 0.5]
    neg = [s for s, l in zip(scores, labels) if l < 0.5]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_auc_rank_based_with_ties():
    """If this fails, RM evaluation reports a wrong AUC (tie handling or rank arithmetic)."""
    assert binary_auc(torch.tensor([0.1, 0.4, 0.35, 0.8]),
                      torch.tensor([0, 0, 1, 1])).item() == pytest.approx(0.75)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        s = torch.randint(0, 6, (40,), generator=g).float()  # many ties
        labels = (torch.rand(40, generator=g) > 0.4).float()
        assert binary_auc(s, labels).item() == pytest.approx(
            _naive_auc(s.tolist(), labels.tolist()), abs=1e-6)
    assert binary_auc(torch.ones(5), torch.tensor([0, 1, 0, 1, 1])).item() == 0.5
    assert math.isnan(binary_auc(torch.ones(3), torch.ones(3)).item())


def test_accuracies():
    """If this fails, logged pairwise/binary accuracies are wrong (ties count 1/2 by design)."""
    assert pairwise_accuracy(torch.tensor([2.0, 1.0, 0.0]),
                             torch.tensor([1.0, 1.0, 3.0])).item() == pytest.approx(0.5)
    assert binary_accuracy(torch.tensor([1.0, -1.0, 0.5]),
                           torch.tensor([1.0, 0.0, 0.0])).item() == pytest.approx(2 / 3)
