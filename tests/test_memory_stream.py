"""The memory estimate with layer streaming and the placement decisions (pipeline/memory.py):
what a streamed layer saves, the largest resident counts that fit, and the refusal with numbers."""

from __future__ import annotations

import pytest
import torch

from liveavatar.config import DiTConfig
from liveavatar.models.layer_stream import LayerResidency
from liveavatar.pipeline.memory import (GIB, allocation_bytes, block_bytes, block_rounding_bytes, dit_weight_bytes,
                                        PAGED_WORKING_ACTIVATIONS, estimate_memory, fit_residency, fits,
                                        kv_layer_bytes, load_estimate, place_layers)

CFG = DiTConfig()  # the 14B layout (meta only: nothing is allocated)
W, H = 704, 384


def _est(res, **kw):
    return estimate_memory(CFG, W, H, steps_owned=4, fp8=True, residency=res, **kw)


def test_block_and_kv_layer_bytes_of_the_14b():
    blk = block_bytes(CFG, torch.bfloat16, fp8=True)
    assert 0.30 * GIB < blk < 0.35 * GIB  # 351M params, the linears in fp8
    assert kv_layer_bytes(CFG, W, H) == 12 * 24 * 44 * 2 * 5120 * 2  # one clip of tokens, keys + values, bf16
    full = dit_weight_bytes(CFG, torch.bfloat16, True)
    assert CFG.num_layers * blk < full  # the audio injectors and embeddings stay resident


def test_estimate_counts_resident_layers_and_slots():
    blk, kvl = block_bytes(CFG, torch.bfloat16, True), kv_layer_bytes(CFG, W, H)
    resident = _est(None)
    all_in = _est(LayerResidency(40, 40, 3))
    assert all_in.weights == resident.weights and all_in.step_caches == resident.step_caches
    part = _est(LayerResidency(30, 10, 3))
    rounding = block_rounding_bytes(CFG, torch.bfloat16, True)  # a resident block: one allocation
    assert 0 < rounding < 2 * 2**20
    # 10 streamed (their bytes and their allocations' rounding), 3 slots (one allocation each)
    assert part.weights == resident.weights - 10 * (blk + rounding) + 3 * allocation_bytes(blk)
    assert part.step_caches == (4 * 10 + 3) * kvl  # 10 layers of 4 steps resident + 3 slots
    # the working set measured with paging (PAGED_WORKING_ACTIVATIONS activations of the block)
    paged_working = PAGED_WORKING_ACTIVATIONS * 3 * (H // 16) * (W // 16) * CFG.dim * 2
    assert part.sink_cache == resident.sink_cache and part.working == resident.working + paged_working
    assert load_estimate(CFG, torch.bfloat16, True, LayerResidency(30, 0, 3)).weights == part.weights


@pytest.mark.parametrize("free_gib", [14, 22, 46, 80])
def test_fit_residency_is_the_largest_that_fits(free_gib):
    free = free_gib * GIB
    res = fit_residency(CFG, W, H, 4, free, fp8=True)
    assert res is not None and fits(_est(res), free)
    if res.weights < 40:  # blocks stay before caches do: no cache layer resident while a block streams
        assert res.kv == 0 and not fits(_est(LayerResidency(res.weights + 1, 0, 3)), free)
    if res.kv < 40:
        assert not fits(_est(LayerResidency(res.weights, res.kv + 1, 3)), free)


def test_place_layers_modes_and_refusal():
    big = 200 * GIB
    assert place_layers(CFG, W, H, 4, big, big, mode="auto", fp8=True) is None  # everything fits: resident
    assert place_layers(CFG, W, H, 4, 22 * GIB, big, mode="resident", fp8=True) is None
    assert place_layers(CFG, W, H, 4, big, big, mode="stream", fp8=True) == LayerResidency(40, 40, 3)
    res = place_layers(CFG, W, H, 4, 22 * GIB, 24 * GIB, mode="auto", fp8=True)
    assert res is not None and res.weights < 40 and res.kv == 0
    with pytest.raises(MemoryError, match=r"every DiT layer and KV layer streamed.*only 6.0 of 24.0 GiB are free"):
        place_layers(CFG, W, H, 4, 6 * GIB, 24 * GIB, mode="auto", fp8=True)
    with pytest.raises(ValueError, match="weights: 'disk'"):
        place_layers(CFG, W, H, 4, big, big, mode="disk")
