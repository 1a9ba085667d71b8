"""The real vLLM engine (vLLM's CPU build here, its CUDA build on GPUs): sampling semantics,
log-probs against transformers, weight updates and their failure modes. No fakes.

One engine serves the whole module (vLLM starts in ~20-30 s on 2 cores). Its model is a tiny
Llama with tied embeddings, head_dim 32 (the smallest head size vLLM's CPU attention runs) and
a vocabulary vLLM pads.
Tolerance for log-probs: 1e-5 in fp32 (vLLM and transformers sum in different orders; measured
<= 5e-7).
"""

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (tools/install_cpu.sh installs it)")

from megarlhf.models.tiny import save_tiny_hf_model, tiny_arch  # noqa: E402
from megarlhf.rollout.base import SamplingParams, WeightSyncError, token_logprobs  # noqa: E402
from megarlhf.rollout.vllm_engine import VLLMRolloutEngine  # noqa: E402

pytestmark = [pytest.mark.unit, pytest.mark.slow]

TOL = 1e-5
VOCAB = 250  # vLLM pads embedding rows to a multiple of 64: padding that is never loaded
PROMPTS = [[1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11, 12], [13]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("vllm_tiny")
    arch = tiny_arch("llama", vocab_size=VOCAB, hidden_size=64, num_heads=2, num_kv_heads=2,
                     num_layers=2, tied=True)
    model = save_tiny_hf_model(str(d), arch)
    engine = VLLMRolloutEngine.create(str(d), dtype="float32", max_model_len=128, seed=0)
    yield engine, model
    engine.close()


def hf_logprobs(model, prompt, tokens, temperature):
    ids = torch.tensor([list(prompt) + list(tokens)])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1: -1]  # (T, V)
    return token_logprobs(logits, torch.tensor(tokens), temperature)


def max_gap(engine, model, temperature=1.0, prompts=PROMPTS):
    params = SamplingParams(n=2, temperature=temperature, max_new_tokens=12, seed=3)
    gap = 0.0
    for prompt, out in zip(prompts, engine.generate(prompts, params), strict=True):
        for s in out.samples:
            ref = hf_logprobs(model, prompt, s.token_ids, temperature)
            gap = max(gap, float((ref - torch.tensor(s.logprobs)).abs().max()))
    return gap


def test_greedy_is_argmax_and_logprobs_match_transformers(setup):
    """Broken: vLLM's greedy decoding or its log-prob mode differs from the learner's definition
    (log_softmax of the untempered logits for greedy requests)."""
    engine, model = setup
    params = SamplingParams(temperature=0, max_new_tokens=10)
    for prompt, out in zip(PROMPTS, engine.generate(PROMPTS, params), strict=True):
        (s,) = out.samples
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(10):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        assert list(s.token_ids) == ids[len(prompt):]
        assert s.finish_reason == "length"
        ref = hf_logprobs(model, prompt, s.token_ids, 1.0)
        assert torch.allclose(torch.tensor(s.logprobs), ref, atol=TOL)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_match_transformers(setup, temperature):
    """Broken: rollout log-probs (the behaviour policy of PPO ratios) are not log_softmax(z/T)
    over the full vocabulary at the sampled tokens."""
    engine, model = setup
    assert max_gap(engine, model, temperature) < TOL


def test_n_samples_and_per_request_seeds(setup):
    """Broken: n, or the seed contract sample i of prompt j <- seed + j*n + i that lets rollout
    replicas split a batch without changing what is drawn."""
    engine, _ = setup
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=16, seed=11)
    a = engine.generate(PROMPTS, params)
    b = engine.generate(PROMPTS, params)
    assert [len(o.samples) for o in a] == [3] * len(PROMPTS)
    assert a == b  # same seed, same samples
    assert len({o.samples[i].token_ids for o in a for i in range(3)}) > 3  # not all equal
    # The last two prompts alone, seeds shifted by their position: the same samples.
    tail = engine.generate(PROMPTS[2:], SamplingParams(n=3, temperature=1.0, max_new_tokens=16,
                                                       seed=11 + 2 * 3))
    assert tail == a[2:]
    other = engine.generate(PROMPTS, SamplingParams(n=3, temperature=1.0, max_new_tokens=16,
                                                    seed=12))
    assert other != a


def test_seeded_batch_beyond_one_scheduler_step(setup):
    """Broken: a seeded batch whose prompts exceed vLLM's per-step token budget (4096) kills
    vLLM's CPU engine (chunked prefill rewinds a CPU generator: 'CPU Generator does not use
    offset'); the demo's rollout batch is such a batch
    (chunked prefill is off on CPU for this reason; vLLM warns that this may give incorrect
    outputs, so the log-probs are checked too)."""
    engine, model = setup
    prompts = [[1 + i % 50] + list(range(2, 25)) for i in range(64)]  # 256 x 24 > 4096 tokens
    outs = engine.generate(prompts, SamplingParams(n=4, max_new_tokens=4, seed=2))
    assert [len(o.samples) for o in outs] == [4] * 64
    for j in (0, 31, 63):
        for s in outs[j].samples:
            ref = hf_logprobs(model, prompts[j], s.token_ids, 1.0)
            assert torch.allclose(torch.tensor(s.logprobs), ref, atol=TOL)


def test_stop_ids_and_max_new_tokens(setup):
    """Broken: a sample runs past a stop token, drops it, or exceeds max_new_tokens; or vLLM
    stops at an EOS the caller did not list."""
    engine, _ = setup
    stops = tuple(range(0, VOCAB, 8))  # an eighth of the vocabulary: some samples stop early
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=9, stop_token_ids=stops, seed=5)
    finishes = set()
    for out in engine.generate(PROMPTS, params):
        for s in out.samples:
            assert 1 <= len(s.token_ids) <= 9
            early = [t for t in s.token_ids[:-1] if t in stops]
            assert early == []
            if s.finish_reason == "stop":
                assert s.token_ids[-1] in stops
            else:
                assert len(s.token_ids) == 9 and s.token_ids[-1] not in stops
            finishes.add(s.finish_reason)
    assert finishes == {"stop", "length"}
    for out in engine.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=5, seed=1)):
        assert all(len(s.token_ids) == 5 and s.finish_reason == "length" for s in out.samples)


def test_update_weights_changes_outputs_and_matches(setup):
    """Broken: a weight update that leaves vLLM with stale weights (even partly, e.g. the tied
    lm_head that vLLM 0.32's layerwise reload does not refresh from the embedding) or with
    wrong ones."""
    engine, model = setup
    g = torch.Generator().manual_seed(7)
    new = {k: v + 0.05 * torch.randn(v.shape, generator=g)
           for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied: not streamed
    perturbed = type(model)(model.config).eval()
    perturbed.load_state_dict(new, strict=False)
    perturbed.tie_weights()
    assert max_gap(engine, perturbed) > 1e-2  # the engine still serves the old weights
    # Buckets of ~20 KB: q/k/v (16 KB each) land in different buckets, so vLLM keeps a layer's
    # first tensors (views of their received bucket) until its last one arrives.
    bucket_bytes, engine.weight_bucket_bytes = engine.weight_bucket_bytes, 20_000
    try:
        stats = engine.update_weights(iter(new.items()))
        assert stats.tensors == len(new)  # the worker loads the embedding as lm_head too
        assert stats.missing == () and stats.buckets > len(new) // 2
        assert stats.version == engine.weight_version
        assert max_gap(engine, perturbed) < TOL
        engine.update_weights(  # back to the original weights, for the other tests
            (k, v) for k, v in model.state_dict().items() if k != "lm_head.weight")
        assert max_gap(engine, model) < TOL
    finally:
        engine.weight_bucket_bytes = bucket_bytes


@pytest.mark.parametrize("bad, match", [
    (("model.norm.weight", torch.zeros(3)), r"'model\.norm\.weight' has shape \(3,\).*\(64,\)"),
    (("model.layers.0.mlp.gate_projj.weight", torch.zeros(128, 64)),
     r"gate_projj.*closest: 'model\.layers\.0\.mlp\.gate_proj\.weight'"),
    (("lm_head.weight", torch.zeros(VOCAB, 64)), r"'lm_head\.weight' is not a tensor"),
])
def test_bad_tensor_is_named_and_nothing_is_sent(setup, bad, match):
    """Broken: a name/shape mismatch loads garbage or fails without naming the tensor; the
    bucket holding it must not reach vLLM."""
    engine, model = setup
    version = engine.weight_version
    with pytest.raises(WeightSyncError, match=match):
        engine.update_weights(iter([bad]))
    assert engine.weight_version == version  # nothing reached vLLM: it serves on
    assert max_gap(engine, model) < TOL


def test_tensor_vllm_skips_is_an_error(setup):
    """Broken: a streamed tensor that vLLM's loader silently ignores (a Llama engine ignores
    unexpected '.bias' tensors) passes as loaded (the manifest check is bypassed here to reach
    the engine's own consumption check)."""
    engine, model = setup
    manifest = engine._manifest
    engine._manifest = None
    try:
        sd = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
        sd["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)
        with pytest.raises(WeightSyncError, match=r"o_proj\.bias.*not taken"):
            engine.update_weights(iter(sd.items()))
    finally:
        engine._manifest = manifest
    assert engine.weight_version is None  # a failed update: it serves nothing ...
    with pytest.raises(RuntimeError, match="last update failed"):
        max_gap(engine, model)
    engine.update_weights((k, v) for k, v in sd.items() if not k.endswith(".bias"))
    assert max_gap(engine, model) < TOL  # ... until a complete one


def test_layer_split_across_updates_is_refused_and_kept(setup):
    """Broken: a layer whose tensors arrive in two update calls is 'processed' by vLLM with the
    missing part uninitialised (NaN log-probs, measured) instead of being refused."""
    engine, model = setup
    sd = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    first = {k: v for k, v in sd.items() if not k.endswith("self_attn.v_proj.weight")}
    with pytest.raises(WeightSyncError, match=r"layers \[.*qkv_proj.*only part"):
        engine.update_weights(iter(first.items()))
    assert engine.weight_version is None
    engine.update_weights(iter(sd.items()))
    assert max_gap(engine, model) < TOL


def test_manifest_is_the_checkpoint(setup):
    """Broken: the engine's manifest (checked before any sync) disagrees with its model."""
    engine, model = setup
    m = engine.weight_manifest()
    sd = model.state_dict()
    assert set(m.shapes) == set(sd) - {"lm_head.weight"}  # tied: the embedding only
    assert all(m.shapes[k] == tuple(sd[k].shape) for k in m.shapes)
    m.check_stream((k, tuple(v.shape)) for k, v in sd.items() if k != "lm_head.weight")
    with pytest.raises(WeightSyncError, match="lacks.*model.norm.weight"):
        m.check_stream((k, tuple(v.shape)) for k, v in sd.items()
                       if k not in ("lm_head.weight", "model.norm.weight"))


def test_cpu_head_sizes_are_vllms():
    """Broken: config validation refuses models vLLM's CPU backend runs, or lets through ones
    it refuses (our copy of its supported head sizes drifted from the installed vLLM)."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    from megarlhf.rollout.vllm_engine import VLLM_CPU_HEAD_SIZES

    assert list(VLLM_CPU_HEAD_SIZES) == list(CPUAttentionBackend.get_supported_head_sizes())
