"""vLLM's outputs and sampling parameters <-> megarlhf's (:mod:`megarlhf.rollout.base`).

Log-probs: the LLM is built with ``logprobs_mode="processed_logprobs"`` and each request asks
for ``logprobs=0`` (the sampled token only). In this mode vLLM returns the log-softmax of the
logits after temperature (``Sampler.sample`` / ``TopKTopPSampler``, ``vllm/v1/sample/``); greedy
requests skip the temperature, so they get ``log_softmax(logits)``. That is
:mod:`megarlhf.rollout.base`'s definition as long as no top-k/top-p filter is active: with one,
vLLM reports the log-prob under the filtered, renormalised distribution, which no setting of the
pinned version turns back into the full-vocabulary number ("raw_logprobs" is taken before
temperature). So a request with top-k/top-p and ``logprobs=True`` is refused.

Weight versions: vLLM labels every output token with the weight version its engine had when the
token was sampled (``CompletionOutput.weight_versions``); :func:`convert_request_outputs` checks
that every token of every sample carries the version the engine was last synced to, so a
replica can never hand out samples from stale or mixed weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from megarlhf.rollout.base import RolloutOutput, Sample, SamplingParams
from megarlhf.compat.vllm import PINNED_VLLM_VERSION

def to_vllm_sampling_kwargs(params: SamplingParams, prompt_index: int) -> dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams`` for prompt ``prompt_index`` of a call.

    vLLM gives child ``i`` of an ``n``-sample request the seed ``seed + i``; prompt ``j`` gets
    ``seed + j * n`` so that every sample of the call has its own seed (``seed + j*n + i``, as
    in the HF engine). ``ignore_eos`` makes ``stop_token_ids`` the only stop condition besides
    the length (our contract: the caller lists EOS itself); without it vLLM would also stop at
    the EOS ids of the model's generation config.
    """
    if params.logprobs and params.filters_vocabulary:
        raise ValueError(
            f"vLLM engine: top_k={params.top_k} / top_p={params.top_p} with logprobs=True: vLLM "
            f"{PINNED_VLLM_VERSION} reports log-probs of the top-k/top-p *filtered* distribution, "
            "not log_softmax(logits / T) over the full vocabulary that the learner computes. "
            "Sample without top-k/top-p (top_k=-1, top_p=1), or set sampling logprobs=False and "
            "let the learner compute the old log-probs."
        )
    kwargs: dict[str, Any] = dict(
        n=params.n,
        temperature=float(params.temperature),
        top_p=float(params.top_p),
        top_k=params.top_k if params.top_k_enabled else 0,
        max_tokens=params.max_new_tokens,
        stop_token_ids=list(params.stop_token_ids),
        ignore_eos=True,
        detokenize=False,
        logprobs=0 if params.logprobs else None,
        flat_logprobs=True,
        seed=None if params.seed is None else params.seed + prompt_index * params.n,
    )
    return kwargs



def _sampled_logprobs(logprobs: Any, token_ids: list[int], where: str) -> list[float]:
    """The log-prob of each sampled token from vLLM's per-position sample logprobs.

    ``logprobs`` is vLLM's ``FlatLogprobs`` (``flat_logprobs=True``: flat ``token_ids`` /
    ``logprobs`` lists cut by ``start_indices`` / ``end_indices``, read directly here) or a list
    of ``{token_id: Logprob}`` dicts, one per position.
    """
    if logprobs is None or len(logprobs) != len(token_ids):
        got = None if logprobs is None else len(logprobs)
        raise RuntimeError(
            f"vLLM returned {got} log-prob positions for {len(token_ids)} tokens ({where})"
        )
    flat = all(hasattr(logprobs, a) for a in ("start_indices", "end_indices", "token_ids"))
    values = []
    for t, tok in enumerate(token_ids):
        value = None
        if flat:
            for i in range(logprobs.start_indices[t], logprobs.end_indices[t]):
                if logprobs.token_ids[i] == tok:
                    value = logprobs.logprobs[i]
                    break
        else:
            entry = logprobs[t]
            if entry is not None and tok in entry:
                value = entry[tok].logprob
        if value is None:
            raise RuntimeError(
                f"vLLM returned no log-prob for the sampled token {tok} ({where}, token {t})"
            )
        values.append(float(value))
    return values


def convert_request_outputs(
    request_outputs: Sequence[Any],
    prompt_token_ids: Sequence[Sequence[int]],
    params: SamplingParams,
    weight_version: str | None = None,
) -> list[RolloutOutput]:
    """vLLM ``RequestOutput``s (one per prompt, in order) -> our :class:`RolloutOutput`s.

    Checks what the adapter relies on: one output per prompt in prompt order, ``n`` samples
    each (sorted by ``CompletionOutput.index``), finish reasons "stop"/"length" only, and one
    log-prob per response token (with ``logprobs=0`` each position holds the sampled token).
    """
    if len(request_outputs) != len(prompt_token_ids):
        raise RuntimeError(
            f"vLLM returned {len(request_outputs)} outputs for {len(prompt_token_ids)} prompts"
        )
    results = []
    for j, (out, prompt) in enumerate(zip(request_outputs, prompt_token_ids, strict=True)):
        echoed = out.prompt_token_ids  # vLLM echoes every request's prompt
        if echoed is None or list(echoed) != list(prompt):
            raise RuntimeError(f"vLLM output {j} belongs to another prompt (outputs out of order)")
        completions = sorted(out.outputs, key=lambda c: c.index)
        if len(completions) != params.n:
            raise RuntimeError(
                f"vLLM returned {len(completions)} samples for prompt {j}, expected n={params.n}"
            )
        samples = []
        for c in completions:
            where = f"prompt {j}, sample {c.index}"
            if c.finish_reason not in ("stop", "length"):
                raise RuntimeError(
                    f"vLLM sample finished with {c.finish_reason!r} ({where}); expected 'stop' "
                    "or 'length' (was the request aborted, or the engine put to sleep?)"
                )
            token_ids = [int(t) for t in c.token_ids]
            if weight_version is not None:
                check_weight_versions(c, len(token_ids), weight_version, where)
            logprobs = None
            if params.logprobs:
                logprobs = _sampled_logprobs(c.logprobs, token_ids, where)
            samples.append(
                Sample(token_ids=token_ids, logprobs=logprobs, finish_reason=c.finish_reason)
            )
        results.append(RolloutOutput(prompt_token_ids=prompt, samples=tuple(samples)))
    return results




def check_weight_versions(completion: Any, num_tokens: int, expected: str, where: str) -> None:
    """Every token of ``completion`` was sampled with weight version ``expected``.

    vLLM labels output tokens with ``weight_versions`` spans (``vllm/outputs.py``:
    ``WeightVersionSpan(version, start, end)``); a sample with no labels, a span of another
    version or spans that do not cover every token is refused.
    """
    spans = getattr(completion, "weight_versions", None)
    if num_tokens == 0:
        return
    if not spans:
        raise RuntimeError(f"vLLM returned no weight-version labels for {where} (expected "
                           f"version {expected!r})")
    covered = 0
    for span in spans:
        if span.version != expected:
            raise RuntimeError(
                f"vLLM sampled tokens {span.start}-{span.end} of {where} with weight version "
                f"{span.version!r}, not {expected!r}: stale or mixed weights")
        if span.start != covered:
            break
        covered = span.end
    if covered != num_tokens:
        raise RuntimeError(f"vLLM's weight-version labels of {where} cover {covered} of "
                           f"{num_tokens} tokens")
