"""Node-layer pieces that run without ComfyUI: placement parsing, native-value conversions, the
live-model cache (on the real tiny checkpoint)."""

from __future__ import annotations

import os

import pytest
import torch

from test_nodes_support import make_tiny, pack_submodule

handle_mod = pack_submodule("nodes.handle")
convert = pack_submodule("nodes.convert")
errors = pack_submodule("nodes.errors")
Err = errors.LiveAvatarInputError


def place(devices, mode, cuda=0, default="cpu"):
    p = handle_mod.parse_placement(devices, mode, cuda_count=cuda, default_device=default)
    assert p.requested == mode.lower()
    return handle_mod.Placement(p.mode, p.devices)


def test_placement_forms():
    P = handle_mod.Placement
    assert place("auto", "auto") == P("single", ("cpu",))
    assert place("auto", "auto", cuda=2, default="cuda:0") == P("single", ("cuda:0",))
    assert place("auto", "tpp", cuda=5) == P("tpp", tuple(f"cuda:{i}" for i in range(5)))
    assert place("0,1,2,3,4", "auto", cuda=5) == P("tpp", tuple(f"cuda:{i}" for i in range(5)))
    assert place(" cuda:1 ; cuda:0", "tpp", cuda=2) == P("tpp", ("cuda:1", "cuda:0"))
    assert place("cuda", "single", cuda=1) == P("single", ("cuda:0",))
    assert place("CPU", "single") == P("single", ("cpu",))


@pytest.mark.parametrize("devices, mode, cuda, field, words", [
    ("auto", "tpp", 1, "devices", "at least 2 GPUs"),
    ("0,1", "single", 2, "devices", "one device"),
    ("0", "tpp", 2, "gpu_mode", "at least 2 GPUs"),
    ("3", "single", 2, "devices", "cuda:3 does not exist"),
    ("0,0", "tpp", 2, "devices", "twice"),
    ("cpu,0", "auto", 1, "devices", "cannot be combined"),
    ("gpu0", "single", 1, "devices", "not a device"),
    ("cpu", "fast", 0, "gpu_mode", "not one of"),
])
def test_placement_errors_name_the_input(devices, mode, cuda, field, words):
    with pytest.raises(Err) as exc:
        place(devices, mode, cuda=cuda)
    assert exc.value.input_name == field and words in str(exc.value)


def test_precision_options():
    from liveavatar.options import Precision

    assert handle_mod.precision_options("fp8") == Precision("bf16", "tensor")
    assert handle_mod.precision_options("fp8_row") == Precision("bf16", "row")  # row scaling reachable
    assert handle_mod.precision_options("bf16") == Precision("bf16", None)
    with pytest.raises(Err, match="'precision'"):
        handle_mod.precision_options("int4")


def test_native_conversions():
    img = convert.first_image(torch.rand(3, 20, 30, 4), "N")
    assert img.shape == (1, 20, 30, 3)
    grey = convert.first_image(torch.full((1, 5, 6, 1), 0.5), "N")
    assert grey.shape == (1, 5, 6, 3) and float(grey.mean()) == pytest.approx(0.5)
    with pytest.raises(Err, match="'image'"):
        convert.first_image(torch.rand(20, 30, 3), "N")
    wav, rate = convert.native_audio({"waveform": torch.zeros(2, 100), "sample_rate": 44100}, "N")
    assert wav.shape == (1, 2, 100) and rate == 44100
    with pytest.raises(Err, match="'audio'"):
        convert.native_audio({"waveform": torch.zeros(1, 1, 0), "sample_rate": 16000}, "N")
    with pytest.raises(Err, match="'audio'"):
        convert.native_audio(torch.zeros(1, 1, 10), "N")
    buf = convert.ImageBuffer(frames=2, height=4, width=4, samples=1280, sample_rate=16000)
    buf.add(torch.full((2, 4, 4, 3), 255, dtype=torch.uint8), torch.ones(1, 1280))
    buf.add(torch.zeros(1, 4, 4, 3, dtype=torch.uint8), torch.zeros(640))  # one more than planned: grows
    frames, audio = buf.image(), buf.audio()
    assert frames.shape == (3, 4, 4, 3) and frames.dtype == torch.float32
    assert float(frames[:2].min()) == 1.0 and float(frames[2].max()) == 0.0
    assert audio["waveform"].shape == (1, 1, 1920) and audio["sample_rate"] == 16000
    assert float(audio["waveform"][0, 0, :1280].min()) == 1.0 and float(audio["waveform"][0, 0, 1280:].max()) == 0.0
    states = convert.encoder_output_states(
        {"encoded_audio_all_layers": tuple(torch.randn(1, 7, 8) for _ in range(3))}, "N")
    assert states.shape == (3, 7, 8)
    prev = convert.preview_image(torch.zeros(600, 900, 3, dtype=torch.uint8), 300)
    assert max(prev.size) == 300


def _spec(ckpt, strength=1.0):
    return handle_mod.LoadSpec(kind="checkpoint", paths=(("ckpt_dir", str(ckpt)),), lora=None,
                               lora_strength=strength, dtype="fp32", fp8=False, attn="sdpa", compile=False,
                               placement=handle_mod.Placement("single", ("cpu",)),
                               stamps=handle_mod.file_stamps([str(ckpt)]))


def test_live_cache_keeps_one_model(tmp_path):
    ckpt = make_tiny(tmp_path / "tiny")
    try:
        first = handle_mod.get_or_open(_spec(ckpt))
        assert handle_mod.get_or_open(_spec(ckpt)) is first
        ctx = first.encode_prompt("hello")
        assert ctx.ndim == 2 and ctx.shape[1] == first.text_dim
        second = handle_mod.get_or_open(_spec(ckpt, strength=0.5))
        assert second is not first and first.closed and not second.closed
        with pytest.raises(RuntimeError, match="unloaded"):
            first.encode_prompt("hello")
        cfg = ckpt / "config.json"
        os.utime(cfg, (cfg.stat().st_atime, cfg.stat().st_mtime + 10))  # a changed file reloads the model
        third = handle_mod.get_or_open(_spec(ckpt, strength=0.5))
        assert third is not second and second.closed
    finally:
        handle_mod.close_all()


def test_reference_latents_encoded_once_per_image(tmp_path):
    """A new seed reuses the reference's VAE latents; a job cannot alter the cached copy."""
    from liveavatar.media.audio import audio_from_waveform
    from PIL import Image
    from test_nodes_support import speech_like

    ckpt = make_tiny(tmp_path / "tiny")
    try:
        h = handle_mod.get_or_open(_spec(ckpt))
        ctx = h.encode_prompt("hi")
        aud = h.encode_audio(audio_from_waveform(speech_like(0.36, 16000, 1), 16000))
        img = h.prepare_image(Image.new("RGB", (96, 64), (180, 120, 90)), "64*64")

        def frames():
            return torch.cat([b.frames for b in h.generate(ctx, aud, img, seed=5, steps=3)])

        first = frames()
        cached = h._refs[id(img)][1]
        before = cached.motion.clone()
        second = frames()
        assert h._refs[id(img)][1] is cached and torch.equal(cached.motion, before)
        assert torch.equal(first, second) and first.shape[0] == aud.num_frames
    finally:
        handle_mod.close_all()
