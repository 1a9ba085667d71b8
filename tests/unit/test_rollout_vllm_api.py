"""The vLLM adapter's calls against the real, installed vLLM API (skipped where vLLM is absent).

These need only vLLM's Python package, not a GPU: they check signatures, fields and the worker
extension's compatibility, and convert real vLLM output objects.
"""

import dataclasses
import inspect
import pickle
import typing

import pytest

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (GPU machines only)")

from megarlhf.rollout.base import SamplingParams  # noqa: E402
from megarlhf.rollout.vllm_engine import (  # noqa: E402
    LOGPROBS_MODE,
    PINNED_VLLM_VERSION,
    build_llm_kwargs,
)
from megarlhf.rollout.vllm_outputs import (  # noqa: E402
    convert_request_outputs,
    to_vllm_sampling_kwargs,
)
from megarlhf.rollout.vllm_transfer import (  # noqa: E402
    MegarlhfWeightTransferEngine,
    VLLMWorkerExtension,
)


def test_installed_vllm_is_the_pinned_version():
    """Broken: setup.py's pin and the adapter's PINNED_VLLM_VERSION disagree with the install."""
    assert vllm.__version__ == PINNED_VLLM_VERSION


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(n=4, temperature=0.8, max_new_tokens=32, stop_token_ids=[2], seed=3),
        SamplingParams(temperature=0, max_new_tokens=5),
        SamplingParams(n=2, top_k=20, top_p=0.9, logprobs=False),
    ],
)
def test_sampling_kwargs_build_a_real_vllm_sampling_params(params):
    """Broken: our kwargs no longer construct vLLM's SamplingParams with the meaning we intend."""
    kwargs = to_vllm_sampling_kwargs(params, prompt_index=1)
    sp = vllm.SamplingParams(**kwargs)
    assert sp.n == params.n and sp.max_tokens == params.max_new_tokens
    assert sp.temperature == params.temperature
    assert sp.ignore_eos is True and sp.detokenize is False and sp.flat_logprobs is True
    assert sp.logprobs == (0 if params.logprobs else None)
    assert list(sp.stop_token_ids) == list(params.stop_token_ids)
    assert sp.seed == kwargs["seed"]


def test_llm_kwargs_are_llm_or_engine_args_fields():
    """Broken: vLLM.LLM would reject (or ignore) a keyword the adapter relies on."""
    llm_params = set(inspect.signature(vllm.LLM.__init__).parameters)
    engine_fields = {f.name for f in dataclasses.fields(vllm.EngineArgs)}
    kwargs = build_llm_kwargs("/ckpt", max_model_len=2048)
    unknown = [k for k in kwargs if k not in llm_params and k not in engine_fields]
    assert unknown == []
    from vllm.config.model import LogprobsMode, ModelConfig

    assert LOGPROBS_MODE in typing.get_args(LogprobsMode)
    # What the engine reads from llm.model_config.
    model_config_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    assert {"logprobs_mode", "enable_sleep_mode"} <= model_config_fields
    assert callable(ModelConfig.get_vocab_size)


def test_llm_methods_the_adapter_calls():
    """Broken: LLM.generate / collective_rpc / sleep / wake_up / reset_prefix_cache changed."""

    def params(fn):
        return inspect.signature(fn).parameters

    assert {"prompts", "sampling_params", "use_tqdm"} <= set(params(vllm.LLM.generate))
    assert {"method", "args", "kwargs"} <= set(params(vllm.LLM.collective_rpc))
    from vllm.v1.engine.llm_engine import LLMEngine

    assert list(params(LLMEngine.set_weight_version))[1:] == ["weight_version"]
    assert "level" in params(vllm.LLM.sleep) and "tags" in params(vllm.LLM.wake_up)
    assert callable(vllm.LLM.reset_prefix_cache)


def test_worker_extension_against_the_real_worker_and_reload_api():
    """Broken: vLLM refuses the extension (name clash) or its weight-reload hooks moved."""
    from vllm.model_executor.model_loader.reload import (
        finalize_layerwise_processing,
        finalize_layerwise_reload,
        initialize_layerwise_reload,
    )

    assert list(inspect.signature(initialize_layerwise_reload).parameters) == ["model"]
    # finalize_layerwise_reload(*args, **kwargs) forwards to finalize_layerwise_processing.
    assert callable(finalize_layerwise_reload)
    params = list(inspect.signature(finalize_layerwise_processing).parameters)
    assert params[:2] == ["model", "model_config"]
    try:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
        from vllm.v1.worker.gpu_worker import Worker
    except Exception as e:  # the CUDA worker may not import on a CPU-only machine
        pytest.skip(f"vLLM's GPU worker does not import here: {e!r}")
    # The check vLLM's WorkerWrapperBase applies before mixing the extension in.
    clashes = [a for a in dir(VLLMWorkerExtension) if not a.startswith("__") and hasattr(Worker, a)]
    assert clashes == []
    assert callable(GPUModelRunner.get_model)
    # The weight-transfer worker methods the engine calls through collective_rpc, as the CPU
    # worker has them (inherited).
    from vllm.v1.worker.cpu_worker import CPUWorker

    for name, args in [("init_weight_transfer_engine", ["init_info"]),
                       ("start_weight_update", []), ("update_weights", ["update_info"]),
                       ("finish_weight_update", [])]:
        for cls in (Worker, CPUWorker):
            assert list(inspect.signature(getattr(cls, name)).parameters)[1:] == args, name


def test_convert_real_vllm_outputs():
    """Broken: the conversion misreads vLLM's own RequestOutput / CompletionOutput / logprobs."""
    from vllm.logprobs import FlatLogprobs, Logprob
    from vllm.outputs import CompletionOutput, RequestOutput

    def sample_logprobs(tokens, flat):
        positions = [{t: Logprob(logprob=-0.5 * (k + 1), rank=1)} for k, t in enumerate(tokens)]
        if not flat:
            return positions
        out = FlatLogprobs()
        for p in positions:
            out.append(p)
        return out

    params = SamplingParams(n=2, max_new_tokens=3, stop_token_ids=[9], seed=0)
    outs = [
        RequestOutput(
            request_id="0",
            prompt=None,
            prompt_token_ids=[1, 2],
            prompt_logprobs=None,
            outputs=[
                CompletionOutput(
                    1, "", [4, 5, 6], None, sample_logprobs([4, 5, 6], flat), finish_reason="length"
                ),
                CompletionOutput(
                    0,
                    "",
                    [7, 9],
                    None,
                    sample_logprobs([7, 9], flat),
                    finish_reason="stop",
                    stop_reason=9,
                ),
            ],
            finished=True,
        )
        for flat in (True, False)
    ]
    for res in convert_request_outputs(outs, [[1, 2], [1, 2]], params):
        a, b = res.samples
        assert a.token_ids == (7, 9) and a.finish_reason == "stop"
        assert a.logprobs == pytest.approx((-0.5, -1.0))
        assert b.token_ids == (4, 5, 6) and b.logprobs == pytest.approx((-0.5, -1.0, -1.5))


def test_transfer_messages_survive_vllms_rpc_and_parse():
    """Broken: the rendezvous or a transfer spec arrive in vLLM's workers as something else than
    sent (LLM -> engine core: msgpack without types; engine core -> workers: pickle), or vLLM's
    factory / parsers refuse what the trainer sends."""
    import torch
    from vllm.config import VllmConfig
    from vllm.config.weight_transfer import WeightTransferConfig
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    from megarlhf.weights.transfer import TransferSpec, pack_bucket

    def through_rpc(kwargs):
        request = (0, 1, "collective_rpc", ("update_weights", None, (), kwargs))
        decoded = MsgpackDecoder().decode(MsgpackEncoder().encode(request))
        return pickle.loads(pickle.dumps(decoded[3][3]))

    bucket, _ = pack_bucket([("a", torch.randn(3, 4)), ("b", torch.randn(9).bfloat16())])
    spec = TransferSpec(owners=(0, 2), buckets=(bucket,))
    init = dict(rendezvous=[["10.0.0.1", 29500], ["10.0.0.2", 29501]], world_size=5,
                rank_offset=3, wire="gloo", timeout_s=60.0, workers_per_replica=2)
    update = {"version": 7, "spec": spec.to_dict()}
    got_init = through_rpc({"init_info": init})["init_info"]
    got_update = through_rpc({"update_info": update})["update_info"]
    assert got_init == init and TransferSpec.from_dict(got_update["spec"]) == spec
    cfg = VllmConfig()
    engine = WeightTransferEngineFactory.create_engine(
        WeightTransferConfig(backend="megarlhf"), cfg, torch.device("cpu"), torch.nn.Linear(2, 2))
    assert isinstance(engine, MegarlhfWeightTransferEngine)
    assert engine.parse_init_info(got_init).rendezvous == init["rendezvous"]
    parsed = engine.parse_update_info(got_update)
    assert parsed.version == 7 and TransferSpec.from_dict(parsed.spec) == spec
    with pytest.raises(ValueError, match="Invalid init_info"):
        engine.parse_init_info({"rendezvous": [], "nonsense": 1})


def test_weight_versions_of_real_vllm_outputs():
    """Broken: the version check misreads vLLM's own WeightVersionSpan labels."""
    from vllm.outputs import CompletionOutput, RequestOutput, WeightVersionSpan

    params = SamplingParams(n=1, max_new_tokens=3, logprobs=False)

    def out(spans):
        c = CompletionOutput(0, "", [4, 5, 6], None, None, finish_reason="length",
                             weight_versions=spans)
        return [RequestOutput(request_id="0", prompt=None, prompt_token_ids=[1],
                              prompt_logprobs=None, outputs=[c], finished=True)]

    convert_request_outputs(out([WeightVersionSpan("3", 0, 3)]), [[1]], params,
                            weight_version="3")
    with pytest.raises(RuntimeError, match="stale or mixed"):
        convert_request_outputs(out([WeightVersionSpan("3", 0, 1), WeightVersionSpan("4", 1, 3)]),
                                [[1]], params, weight_version="4")


def test_consumption_sees_derived_views():
    """Broken: a tensor a vLLM loader took through a view it derived (a narrow, a transpose)
    would be reported as skipped; or a skipped one (no loader call holds any of its bytes) as
    taken."""
    import torch

    from megarlhf.rollout.vllm_transfer import _Consumption

    flat = torch.zeros(64, dtype=torch.uint8)
    a, b = flat[:16].view(torch.float32), flat[32:48].view(torch.float32)
    c = _Consumption()
    c.add([("a", a), ("b", b)])
    c.taken([b[1:], torch.zeros(3)])  # a view of b's bytes; an unrelated tensor
    assert c.unconsumed() == ["a"]
    c.taken([a.view(2, 2).t()])
    assert c.unconsumed() == []
