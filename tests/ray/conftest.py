"""A local Ray cluster per test module, declaring 8 GPUs that do not exist.

Placement groups of ``{"GPU": 1}`` bundles and fractional ``num_gpus`` actors schedule as on a
GPU node (Ray sets ``CUDA_VISIBLE_DEVICES`` per actor); torch sees no CUDA, so every worker
runs megatron on CPU with gloo.
"""

import pytest


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    kwargs = dict(num_cpus=2, num_gpus=8, include_dashboard=False, log_to_driver=False,
                  configure_logging=False)
    try:
        ray.init(**kwargs)
    except Exception as e:  # noqa: BLE001 - a raylet slow to register on a loaded machine
        if "timed out during startup" not in str(e):
            raise
        ray.shutdown()
        ray.init(**kwargs)
    yield ray
    ray.shutdown()
