"""MoE hooks refuse what they used to paper over (each was a silent fallback)."""

from types import SimpleNamespace

import pytest
import torch

from megarlhf.engine.moe import MoEHooks

pytestmark = pytest.mark.unit


def test_a_model_object_of_no_chunk_is_an_error():
    """Broken: a model object the engine does not know was taken for chunk 0, so padding masks
    and routing replay went to the wrong layers without a word."""
    fake = SimpleNamespace(_chunk_of={id(object()): 0})
    with pytest.raises(RuntimeError, match="none of this engine's chunks"):
        MoEHooks._chunk_index(fake, torch.nn.Linear(1, 1))


def test_a_token_mask_that_does_not_fit_the_router_is_an_error():
    """Broken: on a shape mismatch the router metrics counted padding as tokens, silently."""
    fake = SimpleNamespace(_counting=True, recompute=False, _valid={0: torch.ones(3).bool()},
                           _counts=torch.zeros(2, 4, dtype=torch.float64))
    hook = MoEHooks._make_hook(fake, chunk=0, layer=1)
    with pytest.raises(RuntimeError, match="routed 5 tokens but the micro-batch's token mask "
                                           "has 3"):
        hook(None, (), (None, torch.ones(5, 4)))
    hook(None, (), (None, torch.ones(3, 4)))
    assert fake._counts[1].tolist() == [3.0] * 4
