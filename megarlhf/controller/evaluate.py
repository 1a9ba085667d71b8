"""Downstream evaluation: greedy decoding on held-out prompts, scored by the verifier."""

from __future__ import annotations

from megarlhf.data.job_data import PromptItem


def greedy_accuracy(rollout, prompts: list[PromptItem], tokenizer, max_new_tokens: int,
                    answer_prefix: str = "answer:") -> dict[str, float]:
    """Accuracy of greedy (temperature 0) answers on ``prompts`` (those with an answer)."""
    from megarlhf.rewards.math_verify import MathVerifier
    from megarlhf.rollout.base import SamplingParams

    prompts = [p for p in prompts if p.answer is not None]
    if not prompts:
        return {}
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens,
                            stop_token_ids=(tokenizer.eos_id,), logprobs=False)
    outs = rollout.generate([p.ids for p in prompts], params)
    texts = [tokenizer.decode(o.samples[0].token_ids) for o in outs]
    verifier = MathVerifier(answer_key="answer", answer_prefix=answer_prefix)
    scores = verifier([p.text for p in prompts], texts, [{"answer": p.answer} for p in prompts])
    lengths = [len(o.samples[0].token_ids) for o in outs]
    return {"eval/accuracy": sum(scores) / len(scores),
            "eval/response_length": sum(lengths) / len(lengths),
            "eval/num_prompts": float(len(prompts))}
