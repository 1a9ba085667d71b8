"""The sampling parameters of every generation a job runs, built in one place, with their seeds.

Every sampled generation follows ``job.rollout`` (``top_p``, ``top_k``, ``max_new_tokens``,
stop tokens = the tokenizer's EOS + ``rollout.stop_token_ids``); what differs is the number of
samples, the temperature and the seed.

Seeds. A call with seed ``s`` draws sample ``i`` of prompt ``j`` from a generator seeded with
``s + j * n + i`` (:class:`~megarlhf.rollout.base.SamplingParams`). Each generation takes its
seed from the job's::

    seed = job.seed * SEED_STRIDE + offset               SEED_STRIDE = 1_000_003 (a prime)

    offset              generation
    step (0, 1, ...)    the RL rollout of step ``step``: the synchronous and the asynchronous
                        loops alike (batch ``b`` uses ``b``, so asynchronous K = 0 reproduces
                        the synchronous run)
    step + r * 100_003  extra round ``r >= 1`` of DAPO dynamic sampling at step ``step``
                        (distinct from every step's own while runs are under 100_003 steps)
    PRM_LABELS = 7      the rollouts that label PRM steps (Math-Shepherd, reward-model jobs)
    RM_DATA = 11        the policy samples labelled by the verifier as reward-model data
    BEST_OF_N = 13      the samples of a best-of-N evaluation

The fixed offsets belong to jobs that run no RL steps, so within a job every generation has its
own seed; across jobs they may coincide with an RL step's (reproducibility needs a fixed seed
per generation, not distinct ones). Greedy evaluation draws nothing and has no seed.

Log-probs are requested when the engine can return them (:func:`~megarlhf.config.validate.
engine_returns_logprobs`): RL rollouts only (the behaviour policy's log-probs and the
rollout-vs-actor check); the other generations keep only the text.
"""

from __future__ import annotations

from megarlhf.config import JobConfig
from megarlhf.config.validate import engine_returns_logprobs
from megarlhf.rollout.base import SamplingParams

SEED_STRIDE = 1_000_003
DYNAMIC_ROUND_STRIDE = 100_003
PRM_LABELS = 7
RM_DATA = 11
BEST_OF_N = 13


def seed_for(job: JobConfig, offset: int) -> int:
    """The seed of the generation at ``offset`` (module docstring)."""
    return job.seed * SEED_STRIDE + offset


def stop_tokens(job: JobConfig, tokenizer) -> tuple[int, ...]:
    """The EOS, then ``rollout.stop_token_ids`` (duplicates dropped)."""
    return tuple(dict.fromkeys([tokenizer.eos_id, *job.rollout.stop_token_ids]))


def sampling_params(job: JobConfig, tokenizer, *, n: int, offset: int,
                    temperature: float | None = None, logprobs: bool = False
                    ) -> SamplingParams:
    """``n`` samples per prompt with ``job.rollout``'s sampling and the seed of ``offset``.

    Args:
        temperature: default ``rollout.temperature``.
    """
    r = job.rollout
    return SamplingParams(n=n, temperature=r.temperature if temperature is None else temperature,
                          top_p=r.top_p, top_k=r.top_k, max_new_tokens=r.max_new_tokens,
                          stop_token_ids=stop_tokens(job, tokenizer),
                          seed=seed_for(job, offset), logprobs=logprobs)


def rollout_params(job: JobConfig, tokenizer, step: int, round: int = 0) -> SamplingParams:
    """The RL rollout of step ``step`` (its dynamic-sampling round ``round``; 0 = the step's
    own): ``batch.n_samples_per_prompt`` samples, with the behaviour log-probs when the engine
    can return them."""
    return sampling_params(job, tokenizer, n=job.batch.n_samples_per_prompt,
                           offset=step + round * DYNAMIC_ROUND_STRIDE,
                           logprobs=engine_returns_logprobs(job))


def greedy_params(job: JobConfig, tokenizer) -> SamplingParams:
    """Greedy decoding for downstream evaluation (one sample, stops at the EOS)."""
    return SamplingParams(n=1, temperature=0.0, max_new_tokens=job.rollout.max_new_tokens,
                          stop_token_ids=(tokenizer.eos_id,), logprobs=False)
