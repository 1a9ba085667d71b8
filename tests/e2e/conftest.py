"""Shared end-to-end fixtures: one run of the CPU demo per test session.

The demo (the README's first command) is itself the main e2e test; its artifacts — the task
data, the tokenizer, the SFT model exported as an HF directory, TensorBoard logs and the
summary — are reused by the other e2e tests (PPO, DPO, resume, reward models, async) so CI pays
for the SFT stage once.
"""

import os

import pytest


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    from megarlhf.demo import run_demo

    out = str(tmp_path_factory.mktemp("demo"))
    summary = run_demo(out, progress=False)
    data = os.path.join(out, "data")
    return {
        "dir": out,
        "summary": summary,
        "sft_hf": os.path.join(out, "sft", "hf"),
        "data": data,
        "prompts_train": os.path.join(data, "prompts_train.jsonl"),
        "prompts_heldout": os.path.join(data, "prompts_heldout.jsonl"),
        "tokenizer": os.path.join(data, "tokenizer.model"),
    }



def pytest_collection_modifyitems(items):
    """e2e tests get 20 minutes instead of the suite's 10: the first one to ask for ``demo_run``
    also pays for the whole demo (about 6-7 minutes on 2 cores) in its setup."""
    for item in items:
        if item.get_closest_marker("e2e") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(1200))
