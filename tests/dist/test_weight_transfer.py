"""megarlhf's weight-transfer protocol with the transformers engine as the receiver (the engine
users debug with; no vLLM), in one process plus its gloo group: the whole trainer side
(plan, owners, rendezvous, start / update / finish with versions) and the delta count.

Oracle: the HF directory the actor was loaded from; after a change of 3 known elements, the
engine holds exactly the actor's new weights and the delta count is exactly 3.
"""

import os

import pytest
import torch
from safetensors.torch import load_file

from megarlhf.platform.launch import run_distributed

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from megarlhf.models.tiny import save_tiny_hf_model, tiny_arch

    d = str(tmp_path_factory.mktemp("lm"))
    save_tiny_hf_model(d, tiny_arch("llama", num_layers=2, tied=True), seed=3)
    return d


def rank_transfer(hf_dir):
    from megarlhf.config.schema import ModelConfig
    from megarlhf.models.builder import build_model
    from megarlhf.models.tiny import tiny_arch
    from megarlhf.parallel.layout import ParallelLayout, initialize_parallel
    from megarlhf.rollout.base import LocalSyncClient
    from megarlhf.rollout.hf_engine import HFRolloutEngine
    from megarlhf.weights.loader import load_hf_dir
    from megarlhf.weights.transfer import OwnersTrainerEngine, TrainerInitInfo

    ctx = initialize_parallel(ParallelLayout())
    bundle = build_model(ModelConfig(hf_dir=hf_dir, dtype="fp32"), ctx, init_weights=False)
    load_hf_dir(bundle, hf_dir)
    engine = HFRolloutEngine(model=tiny_arch("llama", num_layers=2, tied=True))  # random
    info = TrainerInitInfo(rank=0, host="127.0.0.1", num_receivers=1, workers_per_replica=1,
                           bucket_bytes=1 << 14, dtype=torch.float32, wire="gloo",
                           timeout_s=60, measure_delta=True)
    transfer = OwnersTrainerEngine.trainer_init(info, bundle, client=LocalSyncClient([engine]))
    out = {}
    s1 = transfer.send_weights(version=1)
    out["v1"] = {k: v.clone() for k, v in engine.model.state_dict().items()}
    out["first"] = (s1.changed, s1.elements, s1.buckets, engine.weight_version)
    norm = [p for n, p in bundle.chunks[0].named_parameters() if n.endswith("final_layernorm.weight")]
    with torch.no_grad():
        norm[0][:3] += 1.0
    s2 = transfer.send_weights(version=2)
    out["v2"] = {k: v.clone() for k, v in engine.model.state_dict().items()}
    out["second"] = (s2.changed, s2.elements, s2.replicas[0].version, s2.replicas[0].missing)
    transfer.shutdown()
    return out


def test_transfer_into_the_transformers_engine_with_delta_count(hf_dir):
    """If this fails, the weight-transfer protocol drops or corrupts tensors on its way into an
    engine, does not label the update with its version, or miscounts what changed between two
    syncs (what a delta sync would send)."""
    r = run_distributed(rank_transfer, 1, hf_dir, timeout=120)[0]
    ref = load_file(os.path.join(hf_dir, "model.safetensors"))
    for name, want in ref.items():
        assert torch.equal(r["v1"][name], want), name
    changed, elements, buckets, version = r["first"]
    assert (changed, elements) == (0, 0) and buckets > 1 and version == "1"
    changed, elements, version, missing = r["second"]
    total = sum(t.numel() for t in ref.values())
    assert (changed, elements) == (3, total) and version == "2" and missing == ()
    diff = {n for n in ref if not torch.equal(r["v2"][n], r["v1"][n])}
    assert diff == {"model.norm.weight"}
    assert torch.equal(r["v2"]["model.norm.weight"][:3], ref["model.norm.weight"][:3] + 1)
