"""Log-probs and entropy of sampled tokens from vocabulary-parallel logits.

The hot core of PPO/GRPO: for every token, ``log p(y_t)`` of the sampled token and the entropy
``H_t`` of the policy's distribution, from logits whose vocabulary is split over the
tensor-parallel (TP) ranks the way megatron's output layer splits it — rank ``r`` holds columns
``[r * V_p, (r + 1) * V_p)`` of the padded vocabulary, ``V_p = V_padded / tp`` — without ever
gathering the full vocabulary.

Math (``x = logits / temperature`` in fp32, ``j`` over the ``V`` real columns)::

    logZ   = log sum_j exp(x_j)
    logp   = x_y - logZ
    H      = logZ - E_p[x]               (E_p[x] = sum_j p_j x_j,  p = softmax(x))
    dlogp / dx_j = 1[j = y] - p_j
    dH    / dx_j = -p_j (x_j - E_p[x])

Forward: each rank reduces its own columns to four numbers per token — its max ``m_r``,
``S_r = sum exp(x - m_r)``, ``A_r = sum exp(x - m_r)(x - m_r)`` and the target logit if it owns
the target — then one MAX and one SUM all-reduce of per-token statistics (``O(tokens)`` bytes,
independent of V) combine them::

    m = max_r m_r,   c_r = exp(m_r - m)
    S = sum_r c_r S_r,   A = sum_r c_r (A_r + S_r (m_r - m))
    logZ = m + log S,    E_p[x] = m + A / S

Backward needs no communication: the outputs are replicated on every TP rank, and the gradient
of each rank's columns follows from its own logits and the saved per-token ``logZ`` and
``E_p[x]``. Nothing of size ``V_p`` is saved besides a reference to the input logits (the
backward recomputes ``x``), and the ``V_p``-wide fp32 work is done ``chunk`` tokens at a time,
so extra memory is ``O(chunk * V_p)`` plus the gradient itself.

Padded columns (global index >= ``vocab_size``) are excluded (they get zero gradient). A target
outside ``[0, vocab_size)`` (e.g. a pad id at a masked position) gives ``logp = -logZ``: finite
and meaningless; mask such positions downstream.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

DEFAULT_CHUNK_ELEMENTS = 1 << 25  # fp32 work buffers of 128 MiB


def _group_size_rank(tp_group) -> tuple[int, int]:
    if tp_group is None or not dist.is_available() or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(tp_group), dist.get_rank(tp_group)


def _chunk_rows(n_rows: int, n_cols: int, chunk_tokens: int | None) -> int:
    """Tokens per fp32 work chunk."""
    if chunk_tokens is None:
        chunk_tokens = DEFAULT_CHUNK_ELEMENTS // max(n_cols, 1)
    return max(1, min(chunk_tokens, max(n_rows, 1)))


class _VocabParallelLogprobEntropy(torch.autograd.Function):
    """See the module docstring. Inputs are 2-D: ``(N, V_p)`` logits and ``(N,)`` targets."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, tp_group, temperature: float,
                vocab_size: int, compute_entropy: bool, chunk_tokens: int | None):
        tp_size, tp_rank = _group_size_rank(tp_group)
        n, vp = logits.shape
        start = tp_rank * vp
        n_valid = max(0, min(vp, vocab_size - start))  # real (unpadded) columns on this rank
        local_t = target.long() - start
        owns = (local_t >= 0) & (local_t < n_valid)  # (N,) this rank holds the target column
        local_t = torch.where(owns, local_t, torch.zeros_like(local_t))

        f32 = dict(dtype=torch.float32, device=logits.device)
        m_r = torch.full((n,), float("-inf"), **f32)
        s_r = torch.zeros(n, **f32)
        a_r = torch.zeros(n, **f32)
        z_r = torch.zeros(n, **f32)
        if n_valid > 0:
            rows = _chunk_rows(n, n_valid, chunk_tokens)
            buf_x = torch.empty(min(rows, n), n_valid, **f32)  # reused work buffers
            buf_e = torch.empty_like(buf_x)
            for i in range(0, n, rows):
                j = min(i + rows, n)
                x = buf_x[:j - i]
                x.copy_(logits[i:j, :n_valid])  # (c, V_r) fp32
                if temperature != 1.0:
                    x.div_(temperature)
                m = x.amax(dim=-1)  # (c,)
                x.sub_(m.unsqueeze(-1))  # x - m_r
                z_r[i:j] = x.gather(-1, local_t[i:j].unsqueeze(-1)).squeeze(-1) + m
                e = torch.exp(x, out=buf_e[:j - i])  # (c, V_r)
                s_r[i:j] = e.sum(-1)
                if compute_entropy:
                    a_r[i:j] = e.mul_(x).sum(-1)
                m_r[i:j] = m
            del buf_x, buf_e
        z_r = torch.where(owns, z_r, torch.zeros_like(z_r))

        m_glob = m_r.clone()
        if tp_size > 1:
            dist.all_reduce(m_glob, op=dist.ReduceOp.MAX, group=tp_group)
        has = s_r > 0  # False on a rank whose columns are all padding
        shift = torch.where(has, m_r - m_glob, torch.zeros_like(m_r))
        c = torch.where(has, torch.exp(shift), torch.zeros_like(m_r))
        stats = torch.stack([c * s_r, c * (a_r + s_r * shift), z_r])  # (3, N)
        if tp_size > 1:
            dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=tp_group)
        s, a, z = stats[0], stats[1], stats[2]
        log_s = torch.log(s)
        logz = m_glob + log_s
        logp = z - logz
        if compute_entropy:
            entropy = log_s - a / s
            expect_x = m_glob + a / s
        else:
            entropy = torch.zeros_like(logp)
            expect_x = torch.zeros_like(logp)

        ctx.save_for_backward(logits, local_t, owns, logz, expect_x)
        ctx.temperature = temperature
        ctx.n_valid = n_valid
        ctx.chunk_tokens = chunk_tokens
        ctx.compute_entropy = compute_entropy
        ctx.set_materialize_grads(False)
        if not compute_entropy:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp: Tensor | None, grad_entropy: Tensor | None):
        logits, local_t, owns, logz, expect_x = ctx.saved_tensors
        n, vp = logits.shape
        nv = ctx.n_valid
        grad = torch.empty_like(logits)
        grad[:, nv:] = 0  # padded columns
        if not ctx.compute_entropy:
            grad_entropy = None
        if nv == 0 or (grad_logp is None and grad_entropy is None):
            grad[:, :nv] = 0
            return grad, None, None, None, None, None, None
        g_lp = grad_logp.float() if grad_logp is not None else None
        g_h = grad_entropy.float() if grad_entropy is not None else None
        rows = _chunk_rows(n, nv, ctx.chunk_tokens)
        in_place = grad.dtype == torch.float32  # then the gradient itself is the work buffer
        buf_x = None if in_place else torch.empty(min(rows, n), nv, dtype=torch.float32,
                                                  device=logits.device)
        buf_p = torch.empty(min(rows, n), nv, dtype=torch.float32, device=logits.device)
        for i in range(0, n, rows):
            j = min(i + rows, n)
            x = grad[i:j, :nv] if in_place else buf_x[:j - i]
            x.copy_(logits[i:j, :nv])  # (c, V_r) fp32
            if ctx.temperature != 1.0:
                x.div_(ctx.temperature)
            p = torch.sub(x, logz[i:j].unsqueeze(-1), out=buf_p[:j - i]).exp_()  # softmax
            # d/dx_j of (g_lp * logp + g_h * H) = g_lp (1[j = y] - p_j) - g_h p_j (x_j - E[x])
            if g_h is not None:
                x.sub_(expect_x[i:j].unsqueeze(-1)).mul_(g_h[i:j].unsqueeze(-1))
                if g_lp is not None:
                    x.add_(g_lp[i:j].unsqueeze(-1))
                x.mul_(p).neg_()
            else:
                torch.mul(p, -g_lp[i:j].unsqueeze(-1), out=x)
            if g_lp is not None:
                r = torch.arange(j - i, device=x.device)
                x[r, local_t[i:j]] += torch.where(owns[i:j], g_lp[i:j], 0.0)
            if ctx.temperature != 1.0:
                x.div_(ctx.temperature)
            if not in_place:
                grad[i:j, :nv] = x
        return grad, None, None, None, None, None, None


def vocab_parallel_logprobs_entropy(logits_shard: Tensor, target_ids: Tensor, tp_group=None, *,
                                    temperature: float = 1.0, vocab_size: int | None = None,
                                    compute_entropy: bool = True,
                                    chunk_tokens: int | None = None
                                    ) -> tuple[Tensor, Tensor | None]:
    """Log-prob of each target token and the entropy, from this rank's vocabulary shard.

    Args:
        logits_shard: ``(..., V_p)`` logits of vocabulary columns
            ``[tp_rank * V_p, (tp_rank + 1) * V_p)`` (megatron's layout), any float dtype and
            any leading shape (pass megatron's ``[s, b, V_p]`` as it is, with ``[s, b]``
            targets; a non-contiguous view would be copied).
        target_ids: ``(...)`` token ids in the global vocabulary (the tokens that were sampled;
            for next-token prediction shift them by one first).
        tp_group: the tensor-parallel process group, or None for an unsharded vocabulary.
        temperature: logits are divided by it first, as the sampler does (``logits / T``), so
            that log-probs match those of the sampling distribution.
        vocab_size: the real vocabulary size; columns at global index >= ``vocab_size`` are
            padding and are excluded. Defaults to ``V_p * tp`` (no padding).
        compute_entropy: False skips the entropy (returns None) and its work.
        chunk_tokens: tokens per fp32 work chunk; default keeps each chunk buffer at
            :data:`DEFAULT_CHUNK_ELEMENTS` elements.

    Returns:
        ``(logp, entropy)``, each ``(...)`` fp32, identical on every TP rank and differentiable
        w.r.t. ``logits_shard`` (the gradient has the logits' dtype); ``entropy`` is None when
        ``compute_entropy=False``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    tp_size, _ = _group_size_rank(tp_group)
    lead = logits_shard.shape[:-1]
    vp = logits_shard.shape[-1]
    if target_ids.shape != lead:
        raise ValueError(f"target_ids {tuple(target_ids.shape)} must match the leading dims of "
                         f"logits_shard {tuple(logits_shard.shape)}")
    if vocab_size is None:
        vocab_size = vp * tp_size
    if not 0 < vocab_size <= vp * tp_size:
        raise ValueError(f"vocab_size={vocab_size} must be in (0, V_p * tp = {vp * tp_size}]")
    logp, entropy = _VocabParallelLogprobEntropy.apply(
        logits_shard.reshape(-1, vp), target_ids.reshape(-1), tp_group, float(temperature),
        int(vocab_size), bool(compute_entropy), chunk_tokens)
    return logp.view(lead), (entropy.view(lead) if compute_entropy else None)


def logprobs_entropy_reference(logits_full: Tensor, target_ids: Tensor, temperature: float = 1.0,
                               vocab_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Unsharded reference: ``log_softmax`` over the full vocabulary, then gather.

    Materializes ``(..., V)`` fp32 tensors; for tests and small vocabularies.

    Args:
        logits_full: ``(..., V_padded)`` logits.
        target_ids: ``(...)`` ids in ``[0, vocab_size)``.
        temperature: ``logits / T``.
        vocab_size: real vocabulary size (columns past it are dropped); default all.

    Returns:
        ``(logp, entropy)``, ``(...)`` fp32.
    """
    v = logits_full.shape[-1] if vocab_size is None else vocab_size
    x = logits_full[..., :v].float() / temperature  # (..., V)
    logprobs = torch.log_softmax(x, dim=-1)
    logp = logprobs.gather(-1, target_ids.long().unsqueeze(-1)).squeeze(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return logp, entropy


__all__ = ["vocab_parallel_logprobs_entropy", "logprobs_entropy_reference",
           "DEFAULT_CHUNK_ELEMENTS"]
