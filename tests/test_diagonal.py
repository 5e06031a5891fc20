"""The TPP diagonal in one batched pass (models/diagonal.py) vs the unbatched calls, CPU fp32.

Tiny model with its fixture weights; blocks 0..4 (the ring wraps) x 3 steps, each step with its
own cache: the unbatched reference runs block by block, step by step; the diagonal runs the
calls (t, 0), (t-1, 1), (t-2, 2) together at tick t. Same function: only the GEMMs' row counts
differ (float32 rounding)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tiny_support import HW, fixture_dit, forward_fixture
from liveavatar.models.diagonal import DiagonalCall, forward_diagonal
from liveavatar.models.layer_stream import LayerResidency

BLOCKS, STEPS = 5, 3


def _setup(fixtures_dir, fused: bool):
    model = fixture_dit(fixtures_dir)
    if fused:
        model.compile_blocks(compile=False)
    inp, cases = forward_fixture(fixtures_dir)
    text = model.encode_text(inp["context.0"])
    sink = model.new_sink_cache(HW)
    model.prefill_sink(inp["ref_latents"], inp["motion_latents"], text, sink)
    return model, cases, text, sink


def _call(model, cases, sink, caches, b: int, s: int) -> DiagonalCall:
    case = cases[b % 2]
    x = case["x.0"] + 0.1 * s  # a different input per (block, step)
    return DiagonalCall(x=x, timestep=case["t"][0, 0].item() - 100 * s, audio=model.encode_audio(case["audio_input"]),
                        cache=caches[s], sink=sink, start_frame=3 * b, sink_offset=17 + s, cond=case["cond_states"])


def _unbatched(model, cases, text, sink) -> dict:
    caches = [model.new_step_cache(HW) for _ in range(STEPS)]
    out = {}
    for b in range(BLOCKS):
        for s in range(STEPS):
            c = _call(model, cases, sink, caches, b, s)
            out[b, s] = model.forward_block(c.x, c.timestep, text, None, c.cond, c.cache, c.sink, c.start_frame,
                                            c.sink_offset, audio=c.audio)
    return out


def _diagonal(model, cases, text, sink) -> dict:
    caches = [model.new_step_cache(HW) for _ in range(STEPS)]
    out = {}
    for t in range(BLOCKS + STEPS - 1):
        pairs = [(t - s, s) for s in range(STEPS) if 0 <= t - s < BLOCKS]
        got = forward_diagonal(model, text, [_call(model, cases, sink, caches, b, s) for b, s in pairs])
        out.update(zip(pairs, got))
    return out


@pytest.mark.parametrize("fused,stream", [(False, False), (True, True)])
def test_diagonal_pass_equals_unbatched_calls(fixtures_dir, fused, stream):
    model, cases, text, sink = _setup(fixtures_dir, fused)
    ref = _unbatched(model, cases, text, sink)
    if stream:  # streamed weights: each streamed block copied once per diagonal, not once per call
        model.stream_layers(LayerResidency(1, model.cfg.num_layers, buffers=2))
    got = _diagonal(model, cases, text, sink)
    assert got.keys() == ref.keys()
    worst = max(((got[k] - ref[k]).norm() / ref[k].norm()).item() for k in ref)
    assert worst < 1e-5, worst
    if stream:  # 7 diagonals of 1-3 calls: 7 passes, each streamed block copied once per pass
        streamed = sum(model.layer_stream.blocks[i]._stream_flat.numel() for i in model.layer_stream.streamed)
        assert model.layer_stream.stats.weight_bytes <= (BLOCKS + STEPS - 1 + 1) * streamed


def test_diagonal_refuses_shared_caches(fixtures_dir):
    model, cases, text, sink = _setup(fixtures_dir, False)
    cache = model.new_step_cache(HW)
    calls = [_call(model, cases, sink, [cache], 0, 0), _call(model, cases, sink, [cache], 1, 0)]
    with pytest.raises(ValueError, match="its own step cache"):
        forward_diagonal(model, text, calls)


def test_diagonal_blocks_equal_the_runner_blocks(fixtures_dir):
    """pipeline.diagonal: 6 blocks (the Rolling Sink refresh at clip 1 included: blocks of clip 0
    still in flight keep the old sink) x 3 steps with Euler updates, against StepRunner.run."""
    from liveavatar.pipeline.diagonal import diagonal_blocks
    from liveavatar.pipeline.plan import block_noise, make_plan
    from liveavatar.pipeline.sampler import BlockInputs, StepRunner, make_schedule

    model, cases, text, _ = _setup(fixtures_dir, False)
    inp = load_file(fixtures_dir / "forward" / "inputs_shared.safetensors")
    stream = model.stream
    plan = make_plan(6 * stream.frames_per_block - 3, stream, lead_in_frames=3)
    assert [b.clip for b in plan.blocks] == [0, 0, 0, 0, 1, 1]
    inputs = BlockInputs(audio=cases[0]["audio_input"], cond=cases[0]["cond_states"])

    def runner():
        r = StepRunner(model, text, HW, make_schedule(STEPS, stream), range(STEPS), stream, seed=3, device="cpu",
                       dtype=torch.float32)
        r.prefill(inp["ref_latents"], inp["motion_latents"])
        return r

    r, seq, first = runner(), [], None
    for blk in plan.blocks:
        if blk.clip == 1 and blk.block_in_clip == 0:  # as RankJob.begin_clip
            r.prefill(first[:, 0:1].unsqueeze(0), inp["motion_latents"])
        seq.append(r.run(block_noise(3, blk, HW, stream), blk, inputs))
        if blk.index == 0:
            first = seq[-1].clone()
    got = list(diagonal_blocks(runner(), plan.blocks, lambda b: block_noise(3, b, HW, stream), lambda b: inputs,
                               motion=inp["motion_latents"]))
    assert [b.index for b, _ in got] == [b.index for b in plan.blocks]
    worst = max(((x - y).norm() / y.norm()).item() for (_, x), y in zip(got, seq))
    assert worst < 1e-4, worst
