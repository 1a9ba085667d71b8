"""Loss specs: summed over micro-batches (packed or not), loss and metrics equal global values.

This is the contract the engine relies on: it adds micro-batch losses and metrics (and sums
gradients over data-parallel ranks) without any further scaling. fp32; tolerance 1e-6.
"""

import pytest
import torch

from megarlhf.engine.batch import TokenBatch, make_micro_batches
from megarlhf.engine.loss_fns import (
    DPOLossSpec,
    ORMLossSpec,
    PolicyLossSpec,
    SFTLossSpec,
    ValueLossSpec,
    make_loss_fn,
)
from megarlhf.rl import losses as L
from megarlhf.rl import rm_losses as R


def _batch(seed=0, B=6):
    g = torch.Generator().manual_seed(seed)
    seqs, resp = [], []
    for i in range(B):
        n = 5 + (3 * i) % 7
        seqs.append(torch.randint(0, 50, (n,), generator=g).tolist())
        resp.append([0] * 2 + [1] * (n - 2))
    b = TokenBatch.from_sequences(seqs, fields={"response_mask": resp, "loss_mask": resp})
    S = b.input_ids.shape[1]
    am = b.attention_mask.float()
    for k in ("advantages", "returns", "values_old"):
        b.fields[k] = torch.randn(B, S, generator=g) * am
    b.fields["logp_old"] = (-2 + 0.2 * torch.randn(B, S, generator=g)) * am
    b.fields["logp"] = (-2 + 0.2 * torch.randn(B, S, generator=g)) * am
    b.fields["entropy"] = torch.rand(B, S, generator=g) * am
    b.fields["values"] = torch.randn(B, S, generator=g) * am
    b.fields["ref_logp_sum"] = torch.randn(B, generator=g)
    b.fields["last_index"] = b.lengths - 1
    b.fields["kind"] = torch.tensor([R.KIND_CHOSEN, R.KIND_REJECTED] * 2 + [R.KIND_BINARY] * 2)
    b.fields["label"] = torch.tensor([0, 0, 0, 0, 1, 0])
    return b


def _run(spec, batch, **mb_kwargs):
    """Sum of loss and metrics over micro-batches, with outputs taken from the batch fields."""
    fn = make_loss_fn(spec)
    total, metrics = 0.0, {}
    for mb in make_micro_batches(batch, **mb_kwargs):
        out = {k: mb.fields[k] for k in ("logp", "entropy", "values")}
        loss, m = fn(out, mb)
        total += float(loss)
        for k, v in m.items():
            metrics[k] = metrics.get(k, 0.0) + float(v)
    return total, metrics


SPLITS = [dict(micro_batch_size=2), dict(micro_batch_size=6), dict(max_tokens=24, group_size=2)]


@pytest.mark.parametrize("split", SPLITS)
def test_policy_spec_sums_to_global(split):
    """If this fails, PPO/GRPO losses or their logged metrics depend on the micro-batching."""
    b = _batch()
    mask = b.fields["response_mask"].bool()
    n = float(mask.sum())
    spec = PolicyLossSpec(normalizer=n, num_tokens=n, eps_low=0.2, eps_high=0.28,
                          entropy_coef=0.01)
    loss, m = _run(spec, b, **split)
    pg, pm = L.policy_loss(b.fields["logp"], b.fields["logp_old"], b.fields["advantages"], mask,
                           eps_low=0.2, eps_high=0.28)
    ent = L.aggregate(b.fields["entropy"], mask)
    assert loss == pytest.approx(float(pg - 0.01 * ent), abs=1e-6)
    assert m["clip_frac"] == pytest.approx(float(pm["clip_frac"]), abs=1e-6)
    assert m["approx_kl"] == pytest.approx(float(pm["approx_kl"]), abs=1e-6)
    assert m["entropy"] == pytest.approx(float(ent), abs=1e-6)


@pytest.mark.parametrize("split", SPLITS)
def test_value_and_sft_specs_sum_to_global(split):
    """If this fails, critic or SFT losses depend on the micro-batching."""
    b = _batch()
    mask = b.fields["response_mask"].bool()
    n = float(mask.sum())
    loss, _ = _run(ValueLossSpec(normalizer=n, num_tokens=n, clip_eps=0.2), b, **split)
    ref, _ = L.value_loss(b.fields["values"], b.fields["values_old"], b.fields["returns"], mask,
                          clip_eps=0.2)
    assert loss == pytest.approx(float(ref), abs=1e-6)
    loss, m = _run(SFTLossSpec(normalizer=n, num_tokens=n), b, **split)
    assert loss == pytest.approx(float(-L.aggregate(b.fields["logp"], mask)), abs=1e-6)


@pytest.mark.parametrize("split", [dict(micro_batch_size=2), dict(max_tokens=24, group_size=2)])
def test_pairwise_specs_sum_to_global(split):
    """If this fails, DPO or reward-model pairs are split across micro-batches or mis-scaled."""
    b = _batch()
    mask = b.fields["response_mask"].bool()
    seq = L.sequence_logprobs(b.fields["logp"], mask)
    ref = b.fields["ref_logp_sum"]
    loss, m = _run(DPOLossSpec(num_pairs=3, beta=0.2), b, **split)
    want, wm = L.dpo_loss(seq[0::2], seq[1::2], ref[0::2], ref[1::2], beta=0.2)
    assert loss == pytest.approx(float(want), abs=1e-6)
    assert m["reward_accuracy"] == pytest.approx(float(wm["reward_accuracy"]), abs=1e-6)

    scores = b.fields["values"][torch.arange(6), b.fields["last_index"]]
    loss, m = _run(ORMLossSpec(num_pairs=2, num_binary=2), b, **split)
    want, wm = R.orm_multitask_loss(scores, b.fields["kind"], b.fields["label"])
    assert loss == pytest.approx(float(want), abs=1e-6)
    assert m["pair_accuracy"] == pytest.approx(float(wm["pair_accuracy"]), abs=1e-6)


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("loss_type,agg", [("gspo", "seq_mean_token_mean"),
                                           ("gspo_token", "token_mean"),
                                           ("cispo", "token_mean"), ("ppo", "token_sum")])
def test_policy_loss_types_with_is_weights_sum_to_global(split, loss_type, agg):
    """If this fails, GSPO / GSPO-token / CISPO (or token_sum aggregation), with off-policy
    weights and a KL loss by k3+, depend on the micro-batching or packing (GSPO's sequence
    ratio must see whole sequences)."""
    b = _batch(1)
    mask = b.fields["response_mask"].bool()
    g = torch.Generator().manual_seed(5)
    b.fields["is_weights"] = torch.rand(mask.shape, generator=g) * mask
    b.fields["logp_ref"] = b.fields["logp_old"] + 0.1
    n = float(mask.sum())
    norm = float(L.aggregate_normalizer(mask, agg))
    spec = PolicyLossSpec(normalizer=norm, num_tokens=n, loss_type=loss_type, eps_low=0.1,
                          eps_high=0.15, agg_mode=agg, use_is_weights=True, kl_coef=0.3,
                          kl_estimator="k3+", kl_clamp=5.0)
    loss, m = _run(spec, b, **split)
    kw = dict(is_weights=b.fields["is_weights"], agg_mode=agg)
    args = (b.fields["logp"], b.fields["logp_old"], b.fields["advantages"], mask)
    if loss_type == "ppo":
        pg, pm = L.policy_loss(*args, eps_low=0.1, eps_high=0.15, **kw)
    elif loss_type == "cispo":
        pg, pm = L.cispo_loss(*args, eps_low=0.1, eps_high=0.15, **kw)
    else:
        pg, pm = L.gspo_loss(*args, eps_low=0.1, eps_high=0.15,
                             token_level=loss_type == "gspo_token", **kw)
    kl = L.kl_loss(b.fields["logp"], b.fields["logp_ref"], mask, estimator="k3+", clamp=5.0,
                   agg_mode=agg)
    assert loss == pytest.approx(float(pg + 0.3 * kl), abs=1e-5)
    assert m["pg_loss"] == pytest.approx(float(pg), abs=1e-5)
    assert m["clip_frac"] == pytest.approx(float(pm["clip_frac"]), abs=1e-6)
    assert m["ratio_mean"] == pytest.approx(float(pm["ratio_mean"]), abs=1e-6)
