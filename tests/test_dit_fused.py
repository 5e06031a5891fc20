"""Fused layer regions (`CausalS2VDiT.compile_blocks`, models/compiled.py) vs the eager layers.

Tiny model with its real fixture weights, a streaming rollout of 6 blocks x 2 denoising steps
(the window grows in clip 0, then the ring wraps), with and without the step-cache sink slot.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from tiny_support import HW, fixture_dit, forward_fixture



_build = fixture_dit


def _rollout(model, fixtures_dir, slot: bool, blocks: int = 6, fp8: bool = False) -> torch.Tensor:
    inp, cases = forward_fixture(fixtures_dir)
    text = model.encode_text(inp["context.0"])
    sink = model.new_sink_cache(HW, fp8=fp8)
    model.prefill_sink(inp["ref_latents"], inp["motion_latents"], text, sink)
    caches = [model.new_step_cache(HW, sink_slot=slot, fp8=fp8) for _ in range(2)]
    outs = []
    for b in range(blocks):
        case = cases[min(b, 1)]
        for i, cache in enumerate(caches):
            outs.append(model.forward_block(case["x.0"].to(model.dtype), case["t"][0, 0].item() - 100 * i, text,
                                            case["audio_input"], case["cond_states"], cache, sink, 3 * b, 17))
    return torch.stack(outs).float()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("slot", [False, True])
def test_fused_regions_match_eager_layers(fixtures_dir, slot):
    """Same arithmetic as DiTBlock/AudioInjector: observed 3.4e-7 relative in fp32 (bf16 norm3 rounding)."""
    model = _build(fixtures_dir)
    eager = _rollout(model, fixtures_dir, slot)
    model.compile_blocks(compile=False)
    assert _rel(_rollout(model, fixtures_dir, slot), eager) < 1e-5


@pytest.mark.parametrize("slot", [False, True])
def test_graph_mode_ring_rows_bitwise(fixtures_dir, slot):
    """use_cuda_graphs(): on CPU nothing is captured, but the call takes the graph-mode path
    (ring rows written through a device index tensor instead of a slice): bitwise the same."""
    model = _build(fixtures_dir)
    model.compile_blocks(compile=False)
    plain = _rollout(model, fixtures_dir, slot)
    model.use_cuda_graphs()
    assert torch.equal(_rollout(model, fixtures_dir, slot), plain)
    assert model.cuda_graphs.captures == 0


@pytest.mark.parametrize("slot", [False, True])
def test_graph_mode_eager_layers_bitwise(fixtures_dir, slot):
    """use_cuda_graphs() without compile_blocks: the eager layers write the ring rows through the
    index too (what a captured graph replays on CUDA): bitwise the slice writes."""
    model = _build(fixtures_dir)
    plain = _rollout(model, fixtures_dir, slot)
    model.use_cuda_graphs()
    assert torch.equal(_rollout(model, fixtures_dir, slot), plain)
    assert model.cuda_graphs.captures == 0


@pytest.mark.parametrize("slot", [False, True])
def test_fp8_kv_fused_and_graph_rows(fixtures_dir, slot):
    """fp8 KV caches on the fused path: close to the eager layers with fp8 caches, and the
    graph-mode ring rows (index writes of packed rows) bitwise the slice writes."""
    model = _build(fixtures_dir)
    eager = _rollout(model, fixtures_dir, slot, blocks=5, fp8=True)
    model.compile_blocks(compile=False)
    plain = _rollout(model, fixtures_dir, slot, blocks=5, fp8=True)
    assert _rel(plain, eager) < 1e-2
    model.use_cuda_graphs()
    assert torch.equal(_rollout(model, fixtures_dir, slot, blocks=5, fp8=True), plain)


def test_fused_regions_bf16(fixtures_dir):
    model = _build(fixtures_dir, torch.bfloat16)
    eager = _rollout(model, fixtures_dir, slot=False, blocks=2)
    model.compile_blocks(compile=False)
    assert _rel(_rollout(model, fixtures_dir, slot=False, blocks=2), eager) < 0.01  # observed 2.9e-3 over 6 blocks


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler")
@pytest.mark.slow
def test_compiled_regions_one_graph_each_no_recompiles(fixtures_dir):
    """torch.compile: one graph per region shared by all layers, none made after the first block."""
    from torch._dynamo.utils import counters

    model = _build(fixtures_dir)
    eager = _rollout(model, fixtures_dir, slot=True, blocks=5)
    torch._dynamo.reset()
    model.compile_blocks()
    g0 = counters["stats"]["unique_graphs"]
    out = _rollout(model, fixtures_dir, slot=True, blocks=1)
    first = counters["stats"]["unique_graphs"] - g0
    assert model._fused.compiled, model._fused.error
    assert first == 6  # pre, post, ffn, audio_pre, audio_post, sink-key rotation
    out = torch.cat([out, _rollout(model, fixtures_dir, slot=True, blocks=5)[2:]])
    assert counters["stats"]["unique_graphs"] - g0 == first
    assert _rel(out, eager) < 1e-3  # observed 4e-5 (inductor fp32 reductions)


@pytest.mark.parametrize("kind", ["lin", "fp8_row", "fp8_tensor"])
def test_fuse_linears_one_gemm_same_outputs_shared_storage(kind):
    """q/k/v fused into one GEMM: outputs match the three layers, the layers' weights become views
    of the fused weight (no extra memory); per-tensor fp8 scales cannot be fused (None)."""
    from liveavatar.models.compiled import fuse_linears, run_linear
    from liveavatar.models.fp8 import FP8Linear

    torch.manual_seed(0)
    layers = [torch.nn.Linear(64, 64) for _ in range(3)]
    if kind != "lin":
        layers = [FP8Linear.from_linear(m, emulate=True, scaling=kind.split("_")[1]) for m in layers]
    x = torch.randn(2, 7, 64)
    separate = torch.cat([m(x) for m in layers], dim=-1)
    fused = fuse_linears(layers)
    if kind == "fp8_tensor":
        assert fused is None
        return
    out = run_linear(x, fused)
    assert torch.allclose(out.float(), separate.float(), rtol=1e-5, atol=1e-5)
    assert torch.allclose(torch.cat([m(x) for m in layers], dim=-1), separate)  # layers still work alone
    weight = fused[1]
    for i, m in enumerate(layers):
        w = m.weight if kind == "lin" else m.weight_fp8
        assert w.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()
        assert w.data_ptr() == weight[64 * i].data_ptr()
