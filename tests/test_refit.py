"""The re-fit after loading (issue 15): when the free memory measured after loading is short of
what the caches and the working set need next to the resident DiT blocks, the job's preflight
(`pipeline.job.plan_paged_caches`, fed the free bytes as the CUDA path feeds it
`memory.device_free`) moves the fewest resident blocks to host streaming, logs it, and the frames
stay those of the all-resident model; it refuses, with the numbers, only when streaming every
block does not fit either. A tiny 8-layer checkpoint on the CPU ("stream": 4 blocks resident)."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math

import pytest
import torch
from PIL import Image

from liveavatar.loading.tiny import TINY_DIT, make_tiny_checkpoint
from liveavatar.media.audio import audio_from_waveform
from liveavatar.models.layer_stream import LayerResidency
from liveavatar.pipeline import LiveAvatar
from liveavatar.pipeline.job import plan_paged_caches
from liveavatar.pipeline.memory import GIB, VAE_BYTES, block_bytes, block_rounding_bytes, estimate_memory

SIZE, STEPS = 64, 4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = dataclasses.replace(TINY_DIT, num_layers=8)
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny8", seed=7, dit=cfg)


def frames(model: LiveAvatar) -> torch.Tensor:
    """uint8 frames of the first 2 blocks (fixed prompt, tone, image; the second block reads the
    first one's caches)."""
    t = torch.arange(int(1.5 * 16000)) / 16000
    audio = audio_from_waveform((0.3 * torch.sin(2 * math.pi * 220 * t))[None], 16000)
    image = model.prepare_image(Image.new("RGB", (SIZE, SIZE), (170, 110, 95)), f"{SIZE}*{SIZE}")
    gen = model.generate(model.encode_prompt("a person"), model.encode_audio(audio), image, seed=4, steps=STEPS)
    return torch.cat([b.frames for b in itertools.islice(gen, 2)])


@pytest.fixture(scope="module")
def resident_frames(ckpt):
    model = LiveAvatar.from_checkpoint(ckpt, device="cpu", dtype="fp32", weights="resident")
    assert model.dit.layer_stream is None
    return frames(model)


def _need(cfg, resident_blocks: int) -> int:
    """Device bytes the job needs besides the loaded weights (the preflight's estimate)."""
    return estimate_memory(cfg, SIZE, SIZE, steps_owned=STEPS, dtype=torch.float32, param_counts=(0, 0),
                           residency=LayerResidency(resident_blocks, 0, 3)).total


def _released(cfg) -> int:
    """Device bytes one resident block gives back when streamed (its packed buffer)."""
    return block_bytes(cfg, torch.float32, False) + block_rounding_bytes(cfg, torch.float32, False)


def test_short_free_memory_demotes_the_fewest_blocks_and_keeps_the_frames(ckpt, resident_frames, caplog):
    model = LiveAvatar.from_checkpoint(ckpt, device="cpu", dtype="fp32", weights="stream")
    dit, stream = model.dit, model.dit.layer_stream
    cfg = dit.cfg
    assert stream.residency == LayerResidency(4, 0, 3) and stream.streamed == [4, 5, 6, 7]
    # measured free (the loaded VAE is credited back): 1.5 blocks short of the need -> 2 blocks move
    free = _need(cfg, 4) - VAE_BYTES - int(1.5 * _released(cfg))
    with caplog.at_level(logging.INFO, logger="liveavatar"):
        plan = plan_paged_caches(model, SIZE, SIZE, STEPS, free, 4 * free, decode_here=True)
    assert plan.resident_kv_layers == 0
    assert stream.residency == LayerResidency(2, 0, 3) and stream.streamed == [2, 3, 4, 5, 6, 7]
    for i in (2, 3):  # now views of their own host buffers, like the blocks streamed from loading
        flat = dit.blocks[i]._stream_flat
        assert flat.numel() == stream.layer_bytes
        assert all(t.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
                   for t in dit.blocks[i].parameters())
    lines = [r.getMessage() for r in caplog.records if "re-fit after loading" in r.getMessage()]
    assert len(lines) == 1
    assert f"need {_need(cfg, 4) / GIB:.2f} GiB next to 4 resident DiT blocks" in lines[0]
    assert f"{(free + VAE_BYTES) / GIB:.2f} GiB are free" in lines[0]
    assert "moved 2 block(s) (layers 2-3," in lines[0] and "2/8 DiT layers resident (6 streamed)" in lines[0]
    # a second preflight (the job's own, after the bench's) finds the demoted placement enough
    caplog.clear()
    plan_paged_caches(model, SIZE, SIZE, STEPS, free + 2 * _released(cfg), 4 * free, decode_here=True)
    assert stream.residency.weights == 2 and not any("re-fit" in r.getMessage() for r in caplog.records)
    got = frames(model)
    assert got.shape == resident_frames.shape and torch.equal(got, resident_frames)


def test_enough_free_memory_moves_nothing(ckpt, caplog):
    model = LiveAvatar.from_checkpoint(ckpt, device="cpu", dtype="fp32", weights="stream")
    free = _need(model.dit.cfg, 4) - VAE_BYTES
    with caplog.at_level(logging.INFO, logger="liveavatar"):
        plan_paged_caches(model, SIZE, SIZE, STEPS, free, 4 * free, decode_here=True)
    assert model.dit.layer_stream.residency == LayerResidency(4, 0, 3)
    assert not any("re-fit" in r.getMessage() for r in caplog.records)


def test_refusal_when_every_block_streamed_does_not_fit(ckpt):
    model = LiveAvatar.from_checkpoint(ckpt, device="cpu", dtype="fp32", weights="stream")
    cfg = model.dit.cfg
    free, total = 2**20, 8 * GIB
    with pytest.raises(MemoryError) as err:
        plan_paged_caches(model, SIZE, SIZE, STEPS, free, total, decode_here=True)
    msg = str(err.value)
    room = free + VAE_BYTES + 4 * _released(cfg)  # what streaming all 4 resident blocks would free
    assert msg.startswith(f"generating at {SIZE}x{SIZE} with {STEPS} step caches paged per layer "
                          f"(every DiT block streamed) needs about {_need(cfg, 0) / GIB:.1f} GiB on cpu")
    assert f"but only {room / GIB:.1f} of {total / GIB:.1f} GiB are free" in msg
    assert "weights 0.0" in msg and "Remedies:" in msg
    assert model.dit.layer_stream.residency == LayerResidency(4, 0, 3)  # refused before moving anything


def test_placement_counts_the_audio_encoder_as_loaded(ckpt):
    """The wav2vec2 encoder stays on the device beside the DiT for the whole job: the bytes the
    placement subtracts from the free memory (`AudioFeatureExtractor.device_bytes`, from its
    config alone) are those of the loaded encoder."""
    import json

    from liveavatar.loading.official import find_official_checkpoint
    from liveavatar.models.wav2vec import AudioFeatureExtractor

    folder = find_official_checkpoint(ckpt).wav2vec_dir
    config = json.loads((folder / "config.json").read_text())
    for dtype in (torch.float32, torch.bfloat16):
        loaded = AudioFeatureExtractor.from_pretrained(folder, dtype=dtype).model
        held = sum(t.numel() * t.element_size() for t in (*loaded.parameters(), *loaded.buffers()))
        assert AudioFeatureExtractor.device_bytes(config, dtype) == held > 0
