"""Per-layer weight and KV streaming (models/layer_stream.py) vs the resident DiT, on the CPU.

The tiny model with its fixture weights; on the CPU the "device" slots are host tensors and the
copies synchronous, but the code path (slots, cyclic prefetch, per-layer KV paging and write-back,
byte counts) is the one a GPU runs. Outputs must be bitwise those of the resident model.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from tiny_support import HW, fixture_dit, forward_fixture
from liveavatar.models.block_packing import PACK_ALIGN, pack_on_device
from liveavatar.models.layer_stream import LayerResidency



_build = fixture_dit


def _rollout(model, fixtures_dir, kv_layers: int | None, blocks: int = 5, steps: int = 2,
             on_call=None, cache_refs: list | None = None) -> torch.Tensor:
    """blocks x steps streaming calls (window grows in clip 0, then the ring wraps); cache_refs
    receives a weak reference to each step cache."""
    inp, cases = forward_fixture(fixtures_dir)
    text = model.encode_text(inp["context.0"])
    sink = model.new_sink_cache(HW)
    model.prefill_sink(inp["ref_latents"], inp["motion_latents"], text, sink)
    caches = [model.new_step_cache(HW, resident_layers=kv_layers) for _ in range(steps)]
    if cache_refs is not None:
        cache_refs.extend(weakref.ref(c) for c in caches)
    if model.layer_stream is not None:
        model.layer_stream.attach_caches(caches)
    outs = []
    for b in range(blocks):
        case = cases[min(b, 1)]
        for i, cache in enumerate(caches):
            outs.append(model.forward_block(case["x.0"], case["t"][0, 0].item() - 100 * i, text,
                                            case["audio_input"], case["cond_states"], cache, sink, 3 * b, 17))
            if on_call is not None:
                on_call()
    return torch.stack(outs)


def _tensor_bytes(block) -> int:
    return sum(t.numel() * t.element_size() for t in (*block.parameters(), *block.buffers()))


@pytest.fixture(scope="module")
def resident_rollouts(fixtures_dir):
    """{fused: outputs of the resident model} (eager layers, and the fused regions run eagerly)."""
    out = {}
    for fused in (False, True):
        model = _build(fixtures_dir)
        if fused:
            model.compile_blocks(compile=False)
        out[fused] = _rollout(model, fixtures_dir, None)
    return out


@pytest.mark.parametrize("fused,weights,kv,buffers", [(True, 1, 1, 2), (False, 0, 0, 1), (True, 2, 3, 3),
                                                      (False, 4, 0, 2)])
def test_streamed_layers_bitwise_equal_resident(fixtures_dir, resident_rollouts, fused, weights, kv, buffers):
    """Streamed blocks run from slots bound to packed copies (fused: the q|k|v GEMM on a view of
    the packed bytes), paged KV layers from lent slots: the same numbers, bit for bit."""
    model = _build(fixtures_dir)
    if fused:
        model.compile_blocks(compile=False)
    model.stream_layers(LayerResidency(weights, kv, buffers))
    assert torch.equal(_rollout(model, fixtures_dir, kv), resident_rollouts[fused])


def test_byte_counts_are_the_streamed_layers_bytes(fixtures_dir):
    """Per streaming call: every streamed block copied once (its tensors' bytes and the alignment
    gaps between them, nothing more), every paged cache layer's ring copied in once, the block's
    rows written back."""
    model = _build(fixtures_dir)
    n = model.cfg.num_layers
    weights, kv = 1, 2
    tensor_bytes = sum(_tensor_bytes(model.blocks[i]) for i in range(weights, n))
    gaps = sum(PACK_ALIGN for i in range(weights, n) for _ in (*model.blocks[i].parameters(), *model.blocks[i].buffers()))
    model.stream_layers(LayerResidency(weights, kv, buffers=2))
    stream = model.layer_stream
    streamed_bytes = stream.host_bytes()
    assert tensor_bytes <= streamed_bytes < tensor_bytes + gaps
    assert streamed_bytes == (n - weights) * stream.layer_bytes
    per_call = []

    def mark():
        per_call.append(stream.stats.snapshot())

    _rollout(model, fixtures_dir, kv, blocks=5, steps=2, on_call=mark)
    diffs = [{k: b[k] - a[k] for k in a} for a, b in zip(per_call, per_call[1:])]
    c = model.new_step_cache(HW)  # one layer of one step cache: its ring rows, keys and values
    layer_kv = c.kv[0].numel() * c.kv.element_size()
    block_rows = 3 * (HW[0] // 2) * (HW[1] // 2)
    for d in diffs:  # steady state: each streamed layer exactly once per call
        assert d["weight_bytes"] == streamed_bytes
        assert d["kv_bytes"] == (n - kv) * layer_kv
        assert d["d2h_bytes"] == (n - kv) * layer_kv * block_rows // c.ring
    assert stream.stats.copy_gbps() > 0


def test_paged_cache_needs_the_stream(fixtures_dir):
    model = _build(fixtures_dir)
    with pytest.raises(RuntimeError, match="paged and not bound"):
        _rollout(model, fixtures_dir, 1, blocks=1, steps=1)


def test_streamed_fp8_layers_bitwise_equal_resident(fixtures_dir):
    """fp8 linears (CPU _scaled_mm or its emulation) packed as they are: e4m3 weights, 0-d scales."""
    from liveavatar.models.fp8 import FP8Linear, convert_to_fp8

    model = _build(fixtures_dir).to(torch.bfloat16)
    convert_to_fp8(model, allow_cpu=True)
    model.compile_blocks(compile=False)
    resident = _rollout(model, fixtures_dir, None, blocks=2)
    model.stream_layers(LayerResidency(1, 2, 2))
    slot = model.layer_stream.slots[0]
    assert isinstance(slot.ffn[0], FP8Linear) and slot.ffn[0].weight_fp8.dtype == torch.float8_e4m3fn
    pack_on_device(model.blocks[0])  # a resident block as loading leaves it
    for block in (slot, model.blocks[0]):  # cuBLASLt's fp8 GEMM refuses operands (scales too) off 16 bytes
        tensors = dict(block.named_parameters()) | dict(block.named_buffers())
        assert any(t.dim() == 0 for t in tensors.values())
        assert all(t.data_ptr() % 16 == 0 for t in tensors.values()), \
            {k: t.data_ptr() % 16 for k, t in tensors.items() if t.data_ptr() % 16}
    assert torch.equal(_rollout(model, fixtures_dir, 2, blocks=2), resident)


def test_host_arena_carves_equal_buffers_without_power_of_two_waste():
    from liveavatar.models.pinned import HostArena

    gib = 2**30
    assert HostArena.per_allocation(int(0.327 * gib)) == 3  # an fp8 14B block: three per 1 GiB allocation
    arena = HostArena(pin=False)
    bufs = [arena.take(1000, 5 - k) for k in range(5)]
    assert all(b.numel() == 1000 and b.dtype == torch.uint8 for b in bufs)
    spans = sorted((b.data_ptr(), b.data_ptr() + 1000) for b in bufs)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # disjoint
    assert arena.allocated < 5 * 1000 + 5 * 256


def test_fp8_conversion_after_device_packing_is_packed_again(fixtures_dir):
    """A block packed on the device by loading, then converted to fp8 (a late `apply_speed_options`):
    its norms and biases kept the old bf16 buffer alive beside the new e4m3 weights until
    `repack_on_device` packs it again into one buffer, values unchanged."""
    from liveavatar.models.fp8 import convert_to_fp8
    from liveavatar.models.block_packing import repack_on_device

    model = _build(fixtures_dir).to(torch.bfloat16)
    for block in model.blocks:
        pack_on_device(block)

    def storages(block) -> set[int]:
        return {t.untyped_storage().data_ptr() for t in (*block.parameters(), *block.buffers())}

    assert all(len(storages(b)) == 1 for b in model.blocks)
    assert repack_on_device(model.blocks) == 0  # nothing replaced: nothing to do
    convert_to_fp8(model, allow_cpu=True)
    assert all(len(storages(b)) > 1 for b in model.blocks)
    before = [{k: v.clone() for k, v in b.state_dict().items()} for b in model.blocks]
    assert repack_on_device(model.blocks) == len(model.blocks)
    for block, want in zip(model.blocks, before):
        assert len(storages(block)) == 1
        got = block.state_dict()
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k].reshape(-1).view(torch.uint8), want[k].reshape(-1).view(torch.uint8)) for k in want)


def test_weights_round_trip_keeps_streamed_blocks_and_frames(fixtures_dir, resident_rollouts):
    """`move_weights` (ComfyUI taking the GPU back and returning it): resident blocks travel as one
    packed buffer each, streamed blocks stay in their host buffers, the stream's device slots are
    released and made again; the frames are the resident model's, bit for bit."""
    model = _build(fixtures_dir)
    model.compile_blocks(compile=False)
    model.stream_layers(LayerResidency(2, 2, 2))
    stream = model.layer_stream
    host = {i: model.blocks[i]._stream_flat.untyped_storage().data_ptr() for i in stream.streamed}
    stream.release_slots()
    assert not stream.slots and not stream.kv_slots
    model.move_weights("cpu")  # the stream's own device: the slots come back
    assert len(stream.slots) == 2
    for i, block in enumerate(model.blocks):
        ptrs = {t.untyped_storage().data_ptr() for t in (*block.parameters(), *block.buffers())}
        assert ptrs == ({host[i]} if i in host else ptrs) and len(ptrs) == 1
    assert torch.equal(_rollout(model, fixtures_dir, 2), resident_rollouts[True])


def test_finished_job_caches_and_dropped_models_free_without_the_cycle_collector(fixtures_dir, resident_rollouts):
    """A job's paged step caches (pinned host rows as large as the DiT at full size) are freed when
    the job lets them go, not kept by the model's layer stream until the next job attaches its own;
    a dropped model frees its stream and slots at once. Checked with Python's cycle collector off:
    what is freed here is freed by reference counting."""
    model = _build(fixtures_dir)
    model.compile_blocks(compile=False)
    model.stream_layers(LayerResidency(1, 1, 2))
    gc.collect()
    gc.disable()
    try:
        refs: list = []
        assert torch.equal(_rollout(model, fixtures_dir, 1, cache_refs=refs), resident_rollouts[True])
        assert len(refs) == 2 and all(r() is None for r in refs), "the finished job's caches are still alive"
        again: list = []  # the model still runs a new job (its stream attaches the new caches)
        assert torch.equal(_rollout(model, fixtures_dir, 1, cache_refs=again), resident_rollouts[True])
        stream, slot_block = weakref.ref(model.layer_stream), weakref.ref(model.layer_stream.slots[0])
        streamed_block = weakref.ref(model.blocks[-1])
        del model
        assert stream() is None and slot_block() is None and streamed_block() is None
    finally:
        gc.enable()
