"""Downstream evaluation: greedy decoding on held-out prompts, scored by the verifier."""

from __future__ import annotations

from megarlhf.data.job_data import PromptItem
from megarlhf.rewards.math_verify import MathVerifier
from megarlhf.rollout.base import SamplingParams


def greedy_accuracy(rollout, prompts: list[PromptItem], tokenizer, params: SamplingParams,
                    answer_prefix: str = "answer:") -> dict[str, float]:
    """Accuracy of the answers ``rollout`` generates with ``params`` (greedy,
    :func:`~megarlhf.controller.sampling.greedy_params`) on ``prompts`` (those with an answer)."""
    prompts = [p for p in prompts if p.answer is not None]
    if not prompts:
        return {}
    outs = rollout.generate([p.ids for p in prompts], params)
    texts = [tokenizer.decode(o.samples[0].token_ids) for o in outs]
    verifier = MathVerifier(answer_key="answer", answer_prefix=answer_prefix)
    scores = verifier([p.text for p in prompts], texts, [{"answer": p.answer} for p in prompts])
    lengths = [len(o.samples[0].token_ids) for o in outs]
    return {"eval/accuracy": sum(scores) / len(scores),
            "eval/response_length": sum(lengths) / len(lengths),
            "eval/num_prompts": float(len(prompts))}
