"""The transformers rollout engine on tiny random models (Llama; Qwen2 with q/k/v bias), fp32.

The oracle for every generated number is a fresh, unpadded, cache-free forward pass of the same
weights over prompt + response.
"""

import weakref

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from megarlhf.rollout import make_rollout_engine
from megarlhf.rollout.base import SamplingParams, token_logprobs
from megarlhf.rollout.hf_engine import HFRolloutEngine

VOCAB = 160
LLAMA = dict(
    model_type="llama",
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)
QWEN2 = dict(
    model_type="qwen2",
    vocab_size=VOCAB,
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)
# Different lengths, so that left padding and position ids matter.
PROMPTS = [[5, 17, 3], [9, 1, 44, 2, 7, 81, 33, 12], [100], [61, 62, 63, 64, 65]]


def build_engine(cfg, seed=0, **kwargs) -> HFRolloutEngine:
    torch.manual_seed(seed)
    return HFRolloutEngine(cfg, **kwargs)


def build_hf_model(cfg, seed):
    fields = dict(cfg)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def full_forward_logprobs(model, prompt, response, temperature):
    """log_softmax(logits / T) at each response token from one plain forward pass."""
    ids = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        logits = model(ids).logits[0]  # (P + L, V)
    p = len(prompt)
    return token_logprobs(logits[p - 1 : -1], torch.tensor(response), temperature)


def full_forward_logits(model, prompt, response):
    ids = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        return model(ids).logits[0, len(prompt) - 1 : -1].float()  # (L, V)


def argmax_loop(model, prompt, steps):
    """Greedy continuation by recomputing the full sequence each step (no cache, no padding)."""
    ids = list(prompt)
    for _ in range(steps):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: thread start-up costs more than the math, and 2 shared cores oversubscribe."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def llama():
    return build_engine(LLAMA)


@pytest.fixture(scope="module")
def qwen2():
    return build_engine(QWEN2)


@pytest.mark.parametrize("which", ["llama", "qwen2"])
@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.7])
def test_logprobs_match_a_fresh_full_forward(request, which, temperature):
    """Broken: KV cache, left padding or position ids corrupt the rollout log-probs."""
    engine = request.getfixturevalue(which)
    params = SamplingParams(n=2, temperature=temperature, max_new_tokens=12, seed=7)
    outputs = engine.generate(PROMPTS, params)
    worst = 0.0
    for out in outputs:
        for s in out.samples:
            ref = full_forward_logprobs(
                engine.model, out.prompt_token_ids, s.token_ids, temperature
            )
            worst = max(worst, (ref - torch.tensor(s.logprobs)).abs().max().item())
    assert worst < 1e-5


def test_logprobs_are_tempered(llama):
    """Broken: the engine reports untempered log-probs while sampling at T != 1."""
    params = SamplingParams(n=2, temperature=0.5, max_new_tokens=8, seed=3)
    for out in llama.generate(PROMPTS[:2], params):
        for s in out.samples:
            tempered = full_forward_logprobs(llama.model, out.prompt_token_ids, s.token_ids, 0.5)
            plain = full_forward_logprobs(llama.model, out.prompt_token_ids, s.token_ids, 1.0)
            got = torch.tensor(s.logprobs)
            assert (got - tempered).abs().max() < 1e-5
            assert (got - plain).abs().max() > 1e-3


@pytest.mark.parametrize("which", ["llama", "qwen2"])
def test_greedy_equals_argmax_continuation(request, which):
    """Broken: batched, cached greedy decoding diverges from the plain forward's argmax."""
    engine = request.getfixturevalue(which)
    params = SamplingParams(temperature=0, max_new_tokens=10)
    for out in engine.generate(PROMPTS, params):
        (s,) = out.samples
        assert list(s.token_ids) == argmax_loop(engine.model, out.prompt_token_ids, 10)
        assert s.finish_reason == "length"
        ref = full_forward_logprobs(engine.model, out.prompt_token_ids, s.token_ids, 1.0)
        assert (ref - torch.tensor(s.logprobs)).abs().max() < 1e-5  # greedy: T = 1


def test_n_samples_and_max_new_tokens(llama):
    """Broken: wrong sample count per prompt, or samples that overrun max_new_tokens."""
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=6, seed=0)
    outputs = llama.generate(PROMPTS, params)
    assert [list(o.prompt_token_ids) for o in outputs] == PROMPTS
    for out in outputs:
        assert len(out.samples) == 3
        for s in out.samples:
            assert len(s.token_ids) == 6 and len(s.logprobs) == 6
            assert s.finish_reason == "length"
    assert len({s.token_ids for o in outputs for s in o.samples}) > 1


def test_stop_token_is_included_and_ends_the_sample(llama):
    """Broken: stop tokens dropped from the response, missed, or samples not ended at them."""
    greedy = llama.generate([PROMPTS[1]], SamplingParams(temperature=0, max_new_tokens=10))
    tokens = list(greedy[0].samples[0].token_ids)
    k = next(i for i in range(2, 10) if tokens[i] not in tokens[:i])
    params = SamplingParams(temperature=0, max_new_tokens=10, stop_token_ids=[tokens[k]])
    (s,) = llama.generate([PROMPTS[1]], params)[0].samples
    assert list(s.token_ids) == tokens[: k + 1] and s.finish_reason == "stop"
    assert len(s.logprobs) == k + 1

    stop = list(range(0, VOCAB, 8))  # an eighth of the vocabulary: about half the samples stop
    params = SamplingParams(n=4, temperature=1.5, max_new_tokens=8, stop_token_ids=stop, seed=1)
    reasons = set()
    for out in llama.generate(PROMPTS, params):
        for s in out.samples:
            reasons.add(s.finish_reason)
            body = s.token_ids[:-1]
            assert not any(t in stop for t in body)
            if s.finish_reason == "stop":
                assert s.token_ids[-1] in stop
            else:
                assert len(s.token_ids) == 8 and s.token_ids[-1] not in stop
    assert reasons == {"stop", "length"}


def test_top_k_restricts_samples_but_not_logprobs(llama):
    """Broken: top-k lets other tokens through, or renormalises the reported log-probs."""
    params = SamplingParams(n=4, temperature=1.8, top_k=3, max_new_tokens=8, seed=2)
    for out in llama.generate(PROMPTS, params):
        for s in out.samples:
            logits = full_forward_logits(llama.model, out.prompt_token_ids, s.token_ids)
            kth = torch.topk(logits, 3, dim=-1).values[:, -1]
            chosen = logits[torch.arange(len(s.token_ids)), torch.tensor(s.token_ids)]
            assert bool((chosen >= kth - 1e-5).all())
            ref = token_logprobs(logits, torch.tensor(s.token_ids), 1.8)  # full vocabulary
            assert (ref - torch.tensor(s.logprobs)).abs().max() < 1e-5


def test_top_p_restricts_samples(llama):
    """Broken: top-p samples tokens outside the nucleus."""
    top_p, temperature = 0.3, 1.5
    params = SamplingParams(n=4, temperature=temperature, top_p=top_p, max_new_tokens=8, seed=4)
    for out in llama.generate(PROMPTS, params):
        for s in out.samples:
            logits = full_forward_logits(llama.model, out.prompt_token_ids, s.token_ids)
            probs = torch.softmax(logits / temperature, -1)  # (L, V)
            for t, tok in enumerate(s.token_ids):
                # Mass of the strictly more likely tokens must be below top_p (nucleus rule).
                above = probs[t][probs[t] > probs[t, tok]].sum()
                assert above < top_p + 1e-5


def test_seeds_are_reproducible_and_independent_of_batching(llama):
    """Broken: a seeded rollout cannot be replayed, or depends on how rows are batched."""
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=11)
    a = llama.generate(PROMPTS, params)
    b = llama.generate(PROMPTS, params)
    assert a == b
    other = llama.generate(PROMPTS, SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=12))
    assert [s.token_ids for o in a for s in o.samples] != [
        s.token_ids for o in other for s in o.samples
    ]
    llama.max_batch_rows = 3
    try:
        chunked = llama.generate(PROMPTS, params)
    finally:
        llama.max_batch_rows = 64
    for x, y in zip(a, chunked, strict=True):
        for sx, sy in zip(x.samples, y.samples, strict=True):
            assert sx.token_ids == sy.token_ids
            assert max(abs(p - q) for p, q in zip(sx.logprobs, sy.logprobs, strict=True)) < 1e-5


def test_logprobs_false_returns_none(llama):
    """Broken: logprobs=False still returns (or crashes on) log-probs."""
    out = llama.generate(PROMPTS[:1], SamplingParams(max_new_tokens=3, seed=0, logprobs=False))
    assert out[0].samples[0].logprobs is None and len(out[0].samples[0].token_ids) == 3


@pytest.mark.parametrize("cfg", [LLAMA, QWEN2], ids=["llama", "qwen2"])
def test_update_weights_makes_the_engine_that_model(cfg):
    """Broken: weight sync leaves stale or misplaced weights, or is not idempotent."""
    engine = build_engine(cfg, seed=0)
    target = build_hf_model(cfg, seed=1)
    greedy = SamplingParams(temperature=0, max_new_tokens=8)
    before = engine.generate(PROMPTS, greedy)

    stats = engine.update_weights(iter(target.state_dict().items()))
    expected = {k: v for k, v in target.state_dict().items()}
    assert stats.tensors == len(expected)
    assert stats.bytes == sum(v.numel() * v.element_size() for v in expected.values())
    assert stats.missing == () and engine.missing_weights() == []
    assert stats.seconds > 0 and stats.gb_per_s > 0
    for name, value in engine.model.state_dict().items():
        assert torch.equal(value, target.state_dict()[name]), name

    after = engine.generate(PROMPTS, greedy)
    assert after != before
    for out in after:
        assert list(out.samples[0].token_ids) == argmax_loop(target, out.prompt_token_ids, 8)
    sampled = SamplingParams(n=2, temperature=0.9, max_new_tokens=8, seed=5)
    first = engine.generate(PROMPTS, sampled)
    for out in first:
        for s in out.samples:
            ref = full_forward_logprobs(target, out.prompt_token_ids, s.token_ids, 0.9)
            assert (ref - torch.tensor(s.logprobs)).abs().max() < 1e-5

    engine.update_weights(iter(target.state_dict().items()))  # the same weights again
    assert engine.generate(PROMPTS, greedy) == after
    assert engine.generate(PROMPTS, sampled) == first


def test_update_weights_rejects_wrong_name_shape_dtype(llama):
    """Broken: a mis-mapped weight stream is loaded silently instead of failing loudly."""
    good = llama.model.state_dict()["model.norm.weight"].clone()
    with pytest.raises(ValueError, match="'model.nrom.weight'"):
        llama.update_weights([("model.nrom.weight", good)])
    with pytest.raises(ValueError, match=r"'model.norm.weight' has shape \(16,\)"):
        llama.update_weights([("model.norm.weight", good[:16])])
    with pytest.raises(ValueError, match=r"'model.norm.weight' has dtype torch.bfloat16"):
        llama.update_weights([("model.norm.weight", good.bfloat16())])
    with pytest.raises(TypeError, match="'model.norm.weight'"):
        llama.update_weights([("model.norm.weight", good.tolist())])


def test_update_weights_reports_missing_parameters():
    """Broken: a partial stream goes unnoticed and the engine samples from random weights."""
    engine = build_engine(LLAMA)
    target = build_hf_model(LLAMA, seed=1).state_dict()
    stats = engine.update_weights((k, v) for k, v in target.items() if ".layers.1." not in k)
    layer1 = [k for k in target if ".layers.1." in k]
    assert sorted(stats.missing) == sorted(layer1)
    assert sorted(engine.missing_weights()) == sorted(layer1)
    stats = engine.update_weights((k, target[k]) for k in layer1)
    assert engine.missing_weights() == [] and len(stats.missing) == len(target) - len(layer1)


def test_tied_embeddings_accept_lm_head_absent_or_equal(qwen2):
    """Broken: a tied model rejects valid streams, or accepts an untied lm_head silently."""
    embed = qwen2.model.state_dict()["model.embed_tokens.weight"].clone()
    new = embed + 0.01
    stats = qwen2.update_weights([("model.embed_tokens.weight", new)])
    assert torch.equal(qwen2.model.lm_head.weight, new)
    assert not {"lm_head.weight", "model.embed_tokens.weight"} & set(stats.missing)
    qwen2.update_weights([("model.embed_tokens.weight", embed), ("lm_head.weight", embed)])
    assert torch.equal(qwen2.model.lm_head.weight, embed)
    with pytest.raises(ValueError, match="'lm_head.weight' is tied to 'model.embed_tokens.weight'"):
        qwen2.update_weights([("model.embed_tokens.weight", embed), ("lm_head.weight", new)])
    qwen2.update_weights([("model.embed_tokens.weight", embed)])  # leave the fixture as it was


def test_update_weights_holds_one_tensor_at_a_time():
    """Broken: the engine buffers the stream, so syncing a large model would double its memory."""
    engine = build_engine(LLAMA)
    source = build_hf_model(LLAMA, seed=1).state_dict()
    alive = []

    def stream():
        for name, value in source.items():
            assert all(ref() is None for ref in alive), "a previous tensor is still referenced"
            tensor = value.clone()
            alive.append(weakref.ref(tensor))
            yield name, tensor
            del tensor

    engine.update_weights(stream())
    assert engine.missing_weights() == []


def test_loads_weights_from_an_hf_directory(tmp_path):
    """Broken: the engine cannot start from a saved HF checkpoint (config + safetensors)."""
    source = build_hf_model(QWEN2, seed=3)
    source.save_pretrained(tmp_path)
    engine = make_rollout_engine("hf", model=str(tmp_path))
    assert isinstance(engine, HFRolloutEngine) and engine.missing_weights() == []
    for name, value in engine.model.state_dict().items():
        assert torch.equal(value, source.state_dict()[name]), name


def test_sleep_blocks_generation_until_wake_up():
    """Broken: the driver's sleep/wake ordering bugs would pass on CPU and fail on GPU."""
    engine = build_engine(LLAMA)
    engine.sleep()
    with pytest.raises(RuntimeError, match="wake_up"):
        engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=2, seed=0))
    engine.update_weights(engine.model.state_dict().items())  # allowed while asleep
    engine.wake_up()
    engine.reset_prefix_cache()
    assert len(engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=2, seed=0))) == 1


def test_rejects_bad_prompts(llama):
    """Broken: out-of-vocabulary or empty prompts crash deep in the model instead of clearly."""
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        llama.generate([[1], []], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match=f"token id {VOCAB}"):
        llama.generate([[1, VOCAB]], SamplingParams(max_new_tokens=2))
