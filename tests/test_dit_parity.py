"""Causal S2V DiT vs the official code's outputs (fixtures `forward/`, `tiny_s2v/`, `audio/`).

fp32 on CPU with the tiny model's real weights. Bitwise equal (max |diff| 0) for every tensor on a
CPU that rounds like the fixtures' machine; compared by `fixture_match.assert_matches_fixture`.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from fixture_match import FIXTURE_RTOL, assert_matches_fixture, relative_diff
from tiny_support import HW, fixture_dit
from liveavatar.models.causal_audio import CausalAudioEncoder

FSL = 96
LAYERS = 4


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module")
def ref(fixtures_dir):
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    fwd = fixtures_dir / "forward"
    return {
        "dir": fixtures_dir,
        "cases": json.loads((fwd / "forward_cases.json").read_text()),
        "inputs": load_file(fwd / "inputs_shared.safetensors"),
        "sink": load_file(fwd / "sink_prefill.safetensors"),
        "b0": load_file(fwd / "block0_step0.safetensors"),
        "b1": load_file(fwd / "block1_step0.safetensors"),
        "b1_d30": load_file(fwd / "block1_step0_reldist30.safetensors"),
        "rollout": load_file(fwd / "rollout.safetensors"),
    }


build = fixture_dit


@pytest.fixture(scope="module")
def model(ref):
    return build(ref["dir"])


@pytest.fixture(scope="module")
def primed(model, ref):
    """Text state and a prefilled sink (shared by every test; tests copy what they mutate)."""
    inp = ref["inputs"]
    text = model.encode_text(inp["context.0"])
    sink = model.new_sink_cache(HW)
    model.prefill_sink(inp["ref_latents"], inp["motion_latents"], text, sink)
    return text, sink


def run_block(model, case, text, cache, sink, start_frame, d=17):
    t = case["t"]
    assert torch.all(t == t[0, 0])
    return model.forward_block(case["x.0"], t[0, 0].item(), text, case["audio_input"], case["cond_states"],
                               cache, sink, start_frame, d)


def test_fixture_conventions(ref):
    c = ref["cases"]
    assert c["frame_seqlen"] == FSL and tuple(c["latent_hw"]) == HW
    assert c["relative_dist_per_call"][:8] == [17] * 8 and c["relative_dist_per_call"][8] == 30


def test_sink_prefill(model, primed, ref):
    _, sink = primed
    fx = ref["sink"]
    assert sink.capacity == sink.length == int(fx["cond_end"][0]) == 240 == model.sink_tokens(HW)
    for layer in range(LAYERS):
        assert_matches_fixture(sink.keys(layer), fx[f"cond_k.{layer}"], f"sink keys, layer {layer}")
        assert_matches_fixture(sink.values(layer), fx[f"cond_v.{layer}"], f"sink values, layer {layer}")


def check_block(model, cache, case, out, rows, name):
    assert out.dtype == case["x.0"].dtype
    assert_matches_fixture(out, case["out.0"], f"{name} velocity")
    for layer in range(LAYERS):
        k, v = cache.ring_rows(layer, *rows)
        assert_matches_fixture(k, case[f"cache_k.{layer}"], f"{name} cache keys, layer {layer}")
        assert_matches_fixture(v, case[f"cache_v.{layer}"], f"{name} cache values, layer {layer}")
    g, tokens = model.encode_audio(case["audio_input"])
    assert_matches_fixture(g, case["audio_emb_global"], f"{name} audio_emb_global")
    assert_matches_fixture(tokens, case["merged_audio_emb"], f"{name} merged_audio_emb")


@pytest.mark.parametrize("sink_slot", [False, True])
def test_block0_then_block1_step0(model, primed, ref, sink_slot):
    text, sink = primed
    cache = model.new_step_cache(HW, sink_slot=sink_slot)
    assert cache.ring == ref["cases"]["kv_cache_len"] == 1152
    out0 = run_block(model, ref["b0"], text, cache, sink, start_frame=0)
    check_block(model, cache, ref["b0"], out0, (0, 288), "block 0")
    assert cache.length == 288

    after_b0 = copy.deepcopy(cache)
    out1 = run_block(model, ref["b1"], text, cache, sink, start_frame=3)
    check_block(model, cache, ref["b1"], out1, (288, 576), "block 1")
    k0, _ = cache.ring_rows(0, 0, 288)  # block 0's rows are read, not rewritten
    assert torch.equal(k0, after_b0.ring_rows(0, 0, 288)[0])

    # relative_dist 30: the reference token moves to temporal position 33 (shift 3)
    assert model.reference_position(3, 30) == 33 and model.reference_position(3, 17) == 30
    out30 = run_block(model, ref["b1"], text, after_b0, sink, start_frame=3, d=30)
    assert_matches_fixture(out30, ref["b1_d30"]["out.0"], "block 1 relative_dist 30 velocity")
    assert maxdiff(out30, out1) > 1e-3


def rollout(model, ref, text, sink, sink_slot=True):
    """2 blocks x 4 steps with Euler updates; yields (block, step, x, velocity, x_next)."""
    inp, cases = ref["inputs"], ref["cases"]
    ts = torch.tensor(cases["timesteps"], dtype=torch.float32)
    sigmas = torch.tensor(cases["sigmas"], dtype=torch.float32)
    caches = [model.new_step_cache(HW, sink_slot=sink_slot) for _ in ts]
    for b in range(cases["num_blocks"]):
        x = inp["clip_noise"][:, 3 * b: 3 * b + 3]
        audio = inp["audio_emb"][..., 12 * b: 12 * b + 12]
        pose = inp["cond_latents"][:, :, 3 * b: 3 * b + 3]
        for i in range(len(ts)):
            v = model.forward_block(x, ts[i].item(), text, audio, pose, caches[i], sink, 3 * b, 17)
            x_next = x + (sigmas[i + 1] - sigmas[i]) * v
            yield b, i, x, v, x_next
            x = x_next


@pytest.mark.parametrize("sink_slot", [True, False])
def test_rollout(model, primed, ref, sink_slot):
    text, sink = primed
    fx = ref["rollout"]
    finals = []
    for b, i, x, v, x_next in rollout(model, ref, text, sink, sink_slot):
        assert_matches_fixture(x, fx[f"b{b}_s{i}.x"], f"rollout block {b} step {i} x")
        assert_matches_fixture(v, fx[f"b{b}_s{i}.out"], f"rollout block {b} step {i} velocity")
        assert_matches_fixture(x_next, fx[f"b{b}_s{i}.x_next"], f"rollout block {b} step {i} x_next")
        if i == 3:
            finals.append(x_next)
    assert_matches_fixture(torch.cat(finals, dim=1), fx["clip_output"], "rollout clip output")


def test_rope_fp16_switch_is_real(ref):
    """float64 RoPE factors (switch off) move keys by ~1e-3 and outputs by ~1e-4 from the reference;
    the fixture comparison's tolerance catches it (keys move by over 4x FIXTURE_RTOL of their scale)."""
    model = build(ref["dir"], rope_fp16_tables=False)
    inp = ref["inputs"]
    text = model.encode_text(inp["context.0"])
    sink = model.new_sink_cache(HW)
    model.prefill_sink(inp["ref_latents"], inp["motion_latents"], text, sink)
    cache = model.new_step_cache(HW)
    out = run_block(model, ref["b0"], text, cache, sink, start_frame=0)
    k, _ = cache.ring_rows(0, 0, 288)
    assert maxdiff(k, ref["b0"]["cache_k.0"]) > 2e-4
    assert relative_diff(k, ref["b0"]["cache_k.0"]) > 4 * FIXTURE_RTOL
    assert maxdiff(out, ref["b0"]["out.0"]) > 3e-5
    assert maxdiff(out, ref["b0"]["out.0"]) < 1e-3  # a precision change, not a different model


@pytest.mark.parametrize("fp16_tables", [True, False])
def test_kept_rope_factors_are_rope_factors_bit_for_bit(ref, fp16_tables):
    """Block and sink factors composed from kept time rows (made 64 temporal indices at a time)
    and position bases are the bits `rope_factors` gives for their positions: block grids on and
    across a chunk boundary, the sink's reference tokens at several temporal indices."""
    from liveavatar.models.rope import grid_positions, rope_factors

    model = build(ref["dir"], rope_fp16_tables=fp16_tables)
    inp = ref["inputs"]
    sink = model.new_sink_cache(HW)
    model.prefill_sink(inp["ref_latents"], inp["motion_latents"], model.encode_text(inp["context.0"]), sink)
    hp, wp = model._grid(HW)
    for dtype in (torch.float64, torch.float32):
        model.rope_compute_dtype = dtype

        def direct(positions):
            return rope_factors(positions, model.cfg.head_dim, fp16_tables, None, dtype)

        for f0 in (0, 3, 62, 63, 64, 301):
            got, want = model._block_rope(f0, 3, hp, wp), direct(grid_positions([f0, f0 + 1, f0 + 2], list(range(hp)),
                                                                                  list(range(wp))))
            assert torch.equal(got.cos, want.cos) and torch.equal(got.sin, want.sin), (dtype, f0)
        for ref_t in (30, 47, 63, 64, 1000):
            got, want = model._sink_rope(sink, ref_t), direct(sink.stream_positions(ref_t))
            assert got.cos.shape == want.cos.shape and got.cos.dtype == dtype
            assert torch.equal(got.cos, want.cos) and torch.equal(got.sin, want.sin), (dtype, ref_t)


def test_attention_backend_switch(model, primed, ref):
    """The 'math' kernel gives the same block up to kernel rounding (amplified by the bf16 cast)."""
    text, sink = primed
    model.attn_backend = "math"
    try:
        out = run_block(model, ref["b0"], text, model.new_step_cache(HW), sink, start_frame=0)
    finally:
        model.attn_backend = "sdpa"
    assert maxdiff(out, ref["b0"]["out.0"]) < 2e-4
    with pytest.raises(ValueError, match="attn_backend"):
        model.attn_backend = "nope"


def test_text_kv_precompute_is_exact(model, primed, ref):
    """Per-layer text K/V computed once per job == computed in every layer call."""
    text, sink = primed
    lazy = model.encode_text(ref["inputs"]["context.0"], precompute_kv=False)
    assert lazy.kv is None and text.kv.shape == (LAYERS, 2, 1, 512, 4, 32)
    out_lazy = run_block(model, ref["b0"], lazy, model.new_step_cache(HW), sink, 0)
    out_pre = run_block(model, ref["b0"], text, model.new_step_cache(HW), sink, 0)
    assert torch.equal(out_lazy, out_pre)


def test_low_precision_paths(ref):
    """bf16 weights/caches (the GPU dtype) and float32 RoPE arithmetic run and stay near the reference."""
    inp, b0 = ref["inputs"], ref["b0"]
    for kwargs, dtype, tol in (({}, torch.bfloat16, 0.02), ({"rope_compute_dtype": torch.float32}, torch.float32, 1e-5)):
        model = build(ref["dir"], **kwargs).to(dtype)
        text = model.encode_text(inp["context.0"])
        sink = model.new_sink_cache(HW)
        model.prefill_sink(inp["ref_latents"], inp["motion_latents"], text, sink)
        cache = model.new_step_cache(HW)
        assert cache.kv.dtype == sink.kv.dtype == dtype
        out = run_block(model, b0, text, cache, sink, 0)
        assert out.dtype == torch.float32  # dtype of x
        rel = ((out - b0["out.0"]).norm() / b0["out.0"].norm()).item()
        assert rel < tol, (dtype, kwargs, rel)


def test_ring_buffer_window(model, primed, ref):
    """Clip 0 attends only to rows written so far; from clip 1 on the write wraps and the whole ring is read."""
    text, sink = primed
    case = ref["b1"]
    cache = model.new_step_cache(HW)
    run_block(model, ref["b0"], text, cache, sink, start_frame=0)
    noisy = copy.deepcopy(cache)
    noisy.kv[:, :, :, 576:cache.ring] = torch.randn_like(noisy.kv[:, :, :, 576:cache.ring])
    assert torch.equal(run_block(model, case, text, copy.deepcopy(cache), sink, 3),
                       run_block(model, case, text, noisy, sink, 3))

    for f0 in (3, 6, 9):  # fill the ring: blocks at frames 3, 6, 9
        run_block(model, case, text, cache, sink, f0)
    assert cache.length == cache.ring
    stale = copy.deepcopy(cache)  # rows of block 0 are overwritten by the block at frame 12
    stale.kv[:, :, :, :288] = torch.randn_like(stale.kv[:, :, :, :288])
    fresh = copy.deepcopy(cache)
    out_a = run_block(model, case, text, cache, sink, 12)
    out_b = run_block(model, case, text, stale, sink, 12)
    assert torch.equal(out_a, out_b)
    assert torch.equal(cache.kv[:, :, :, :288], stale.kv[:, :, :, :288])
    fresh.kv[:, :, :, 288:576] = 0  # an older block inside the window does matter
    assert maxdiff(run_block(model, case, text, fresh, sink, 12), out_a) > 1e-4
    with pytest.raises(ValueError, match="multiple of the block"):
        run_block(model, case, text, cache, sink, 11)


def test_sink_refresh_reaches_step_caches(model, primed, ref):
    """A re-prefilled sink (new reference latent) is re-rotated into an existing step cache."""
    text, sink = primed
    inp = ref["inputs"]
    cache = model.new_step_cache(HW, sink_slot=True)  # the slot must notice the new sink
    run_block(model, ref["b0"], text, cache, sink, 0)
    clone = copy.deepcopy(cache)

    new_ref = inp["clip_noise"][:, :1].unsqueeze(0)
    refreshed = copy.deepcopy(sink)
    model.prefill_sink(new_ref, inp["motion_latents"], text, refreshed)
    other = model.new_sink_cache(HW)
    model.prefill_sink(new_ref, inp["motion_latents"], text, other)

    out_refreshed = run_block(model, ref["b1"], text, cache, refreshed, 3)
    out_other = run_block(model, ref["b1"], text, clone, other, 3)
    assert torch.equal(out_refreshed, out_other)
    assert maxdiff(out_refreshed, ref["b1"]["out.0"]) > 1e-3


def test_sink_required(model, primed, ref):
    text, _ = primed
    with pytest.raises(RuntimeError, match="prefill_sink"):
        run_block(model, ref["b0"], text, model.new_step_cache(HW), model.new_sink_cache(HW), 0)


def test_causal_audio_encoder_matches_audio_fixture(fixtures_dir):
    """Case 7: the official CausalAudioEncoder(dim=32, out_dim=128, 25 layers) on real-shaped features."""
    sd = load_file(fixtures_dir / "audio" / "causal_audio_encoder_tiny.safetensors")
    prefix = "casual_audio_encoder."
    enc = CausalAudioEncoder(audio_dim=32, dim=128, num_layers=25, num_tokens=4)
    enc.load_state_dict({k[len(prefix):]: v for k, v in sd.items()})
    fx = load_file(fixtures_dir / "audio" / "audio_path.safetensors")
    for b in (0, 1):
        g, local = enc(fx[f"block{b}.encoder_in"])
        # 1.4e-6 between thread counts in the reference itself (fixture README)
        assert maxdiff(g, fx[f"block{b}.global_all"]) <= 1e-5
        assert maxdiff(local, fx[f"block{b}.local_all"]) <= 1e-5
        assert maxdiff(g[:, 19:], fx[f"block{b}.audio_emb_global"]) <= 1e-5
        assert maxdiff(local[:, 19:], fx[f"block{b}.merged_audio_emb"]) <= 1e-5
