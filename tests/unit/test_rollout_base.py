"""The rollout interface: SamplingParams validation, output dataclasses, the log-prob definition,
the factory, and that nothing but the vLLM engine imports vLLM."""

import pathlib
import re
import subprocess
import sys

import pytest
import torch

from megarlhf.rollout import make_rollout_engine
from megarlhf.rollout.base import RolloutOutput, Sample, SamplingParams, token_logprobs


def test_sampling_params_defaults_and_normalisation():
    """Broken: engines read a different stop set or temperature than the caller configured."""
    p = SamplingParams(n=2, temperature=0.7, stop_token_ids=[5, 3, 5], seed=1)
    assert p.stop_token_ids == (5, 3)
    assert not p.greedy and p.logprob_temperature == 0.7
    assert not p.filters_vocabulary
    g = SamplingParams(temperature=0)
    assert g.greedy and g.logprob_temperature == 1.0 and not g.filters_vocabulary
    assert SamplingParams(top_k=5).filters_vocabulary
    assert SamplingParams(top_p=0.9).filters_vocabulary
    assert not SamplingParams(top_k=0).filters_vocabulary  # 0 and -1 both disable top-k


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n=0), "sampling.n"),
        (dict(n=True), "sampling.n"),
        (dict(temperature=-0.1), "sampling.temperature"),
        (dict(temperature=2.5), "sampling.temperature"),
        (dict(temperature=float("nan")), "finite"),
        (dict(temperature=0.001), "below 0.01"),
        (dict(temperature=0, n=4), "greedy"),
        (dict(top_p=0.0), "sampling.top_p"),
        (dict(top_p=1.5), "sampling.top_p"),
        (dict(top_k=-2), "sampling.top_k"),
        (dict(top_k=1.5), "sampling.top_k"),
        (dict(max_new_tokens=0), "sampling.max_new_tokens"),
        (dict(stop_token_ids=[1, -1]), "stop_token_ids"),
        (dict(stop_token_ids="7"), "stop_token_ids"),
        (dict(seed=-1), "sampling.seed"),
        (dict(logprobs=1), "sampling.logprobs"),
    ],
)
def test_sampling_params_rejects_with_a_message(kwargs, match):
    """Broken: a bad sampling config reaches an engine (vLLM would reject or silently clamp it)."""
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_sample_checks_lengths_and_finish_reason():
    """Broken: an engine could hand the trainer log-probs misaligned with the tokens."""
    s = Sample(token_ids=[1, 2], logprobs=[-0.5, -1.0], finish_reason="stop")
    assert s.token_ids == (1, 2) and s.logprobs == (-0.5, -1.0)
    with pytest.raises(ValueError, match="one per token"):
        Sample(token_ids=[1, 2], logprobs=[-0.5], finish_reason="stop")
    with pytest.raises(ValueError, match="finish_reason"):
        Sample(token_ids=[1], logprobs=None, finish_reason="abort")
    out = RolloutOutput(prompt_token_ids=[3, 4], samples=[s])
    assert out.prompt_token_ids == (3, 4) and out.samples == (s,)


def test_token_logprobs_is_tempered_full_vocab_log_softmax():
    """Broken: the shared log-prob definition (what learner and engines compare) changed."""
    torch.manual_seed(0)
    logits = torch.randn(3, 7)
    tokens = torch.tensor([0, 3, 6])
    for t in (0.5, 1.0, 1.7):
        want = torch.log_softmax(logits / t, -1)[torch.arange(3), tokens]
        torch.testing.assert_close(token_logprobs(logits, tokens, t), want, rtol=0, atol=1e-7)
    greedy = token_logprobs(logits, tokens, 0)  # greedy reports untempered log-probs
    torch.testing.assert_close(greedy, torch.log_softmax(logits, -1)[torch.arange(3), tokens])


def test_factory_rejects_unknown_kind():
    """Broken: a typo in the rollout kind would fail late or pick an engine silently."""
    with pytest.raises(ValueError, match="'hf', 'vllm'"):
        make_rollout_engine("sglang", model={})


def test_only_the_vllm_adapter_imports_vllm():
    """Broken: CPU machines (no vLLM) could no longer import megarlhf."""
    root = pathlib.Path(__file__).resolve().parents[2] / "megarlhf"
    pattern = re.compile(r"^\s*(import vllm|from vllm)\b", re.M)
    # The adapter (engine, outputs, the worker side of the weight transfer), the compat layer,
    # the NCCL wire (vLLM's communicator; a GPU machine has vLLM), and the agents' tool-call
    # parsers (vLLM's, imported when a `tools` environment is built).
    allowed = {"rollout/vllm_engine.py", "rollout/vllm_outputs.py", "rollout/vllm_transfer.py",
               "compat/vllm.py", "weights/transfer.py", "agents/tools.py"}
    offenders = [
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if str(path.relative_to(root)) not in allowed and pattern.search(path.read_text())
    ]
    assert offenders == []
    code = (
        "import sys, megarlhf.rollout, megarlhf.rollout.hf_engine, megarlhf.rollout.vllm_engine\n"
        "import megarlhf.agents, megarlhf.agents.tools, megarlhf.agents.openai_server\n"
        "assert 'vllm' not in sys.modules, 'importing megarlhf.rollout imported vllm'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
