"""Test tiers (markers): unit, dist, ray, e2e, gpu. A test without a marker counts as unit.

gpu tests are skipped where CUDA is absent; everything else runs on CPU (megatron's real code
with gloo, see megarlhf/platform/cpu_compat.py).
"""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    tiers = {"unit", "dist", "ray", "e2e", "gpu"}
    skip_gpu = pytest.mark.skip(reason="needs CUDA (run the gpu tier on a GPU machine)")
    for item in items:
        names = {m.name for m in item.iter_markers()}
        if not names & tiers:
            item.add_marker(pytest.mark.unit)
        if "gpu" in names and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
