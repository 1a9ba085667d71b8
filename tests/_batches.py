"""Batches shared by the dist and ray tiers (a plain module: ``tests/`` is on sys.path through
its conftest)."""

import torch


def make_loss_batch(B: int, vocab: int, seed: int = 0, *, last_index: bool = False):
    """B sequences of lengths 6..17 with a response tail and the fields of the policy and value
    losses (plus ``last_index``, the reward model's read position, when asked)."""
    from megarlhf.engine.batch import TokenBatch

    g = torch.Generator().manual_seed(seed)
    seqs, resp = [], []
    for i in range(B):
        n = 6 + (i * 5) % 12
        p = 2 + i % 3
        seqs.append(torch.randint(3, vocab, (n,), generator=g).tolist())
        resp.append([0.0] * p + [1.0] * (n - p))
    batch = TokenBatch.from_sequences(seqs, fields={"response_mask": resp})
    S = batch.input_ids.shape[1]
    batch.fields["advantages"] = torch.randn(B, S, generator=g) * batch.attention_mask
    batch.fields["logp_old"] = -3.0 + 0.3 * torch.randn(B, S, generator=g)
    batch.fields["returns"] = torch.randn(B, S, generator=g)
    batch.fields["values_old"] = 0.1 * torch.randn(B, S, generator=g)
    if last_index:
        batch.fields["last_index"] = batch.lengths - 1
    return batch
