"""`parallel.open_worker_group`: the LiveAvatar call shape over a real gloo worker group (CPU)."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from liveavatar.loading.tiny import make_tiny_checkpoint
from liveavatar.media.audio import audio_from_waveform
from liveavatar.pipeline import LiveAvatar
from liveavatar.pipeline.payloads import AudioPayload, Backend, ImagePayload
from liveavatar.sizes import resolve_size
from parallel import open_worker_group
from parallel.handle import GroupModel, schedule_for


def test_schedule_choices():
    s = schedule_for("tpp", ["cuda:0", "cuda:1"], 4, None)
    assert s.num_dit_ranks == 2
    s = schedule_for("tpp", [f"cuda:{i}" for i in range(5)], 4, None)
    assert s.num_dit_ranks == 4 and s.world_size == 5  # 4 DiT ranks + the decode rank
    with pytest.raises(ValueError, match="devices"):
        schedule_for("tpp", ["cuda:0"], 4, None)
    with pytest.raises(ValueError, match="mode"):
        schedule_for("ring", ["cuda:0"], 4, None)


@pytest.mark.slow
def test_two_rank_group_matches_in_process(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", seed=2)
    t = torch.arange(int(1.2 * 16000)) / 16000
    audio = audio_from_waveform((0.3 * torch.sin(2 * math.pi * 180 * t))[None], 16000)
    img = Image.new("RGB", (64, 64), (150, 110, 90))

    local = LiveAvatar.from_checkpoint(ckpt, device="cpu", dtype="fp32")
    want = list(local.generate(local.encode_prompt("hello"), local.encode_audio(audio),
                               local.prepare_image(img, "64*64"), seed=9))

    group = open_worker_group("checkpoint", ["cpu", "cpu"], mode="tpp", ckpt_dir=str(ckpt), dtype="fp32")
    assert isinstance(group, GroupModel)
    # both backends satisfy the one contract, and their payloads the same socket types
    assert isinstance(local, Backend) and isinstance(group, Backend)
    local_aud, group_aud = local.encode_audio(audio), group.encode_audio(audio)
    local_img, group_img = local.prepare_image(img, "64*64"), group.prepare_image(img, "64*64")
    assert isinstance(local_aud, AudioPayload) and isinstance(group_aud, AudioPayload)
    assert isinstance(local_img, ImagePayload) and isinstance(group_img, ImagePayload)
    assert group_aud.num_frames == local_aud.num_frames and group_img.size == resolve_size(img.size, "64*64")
    assert (group_img.width, group_img.height) == (local_img.width, local_img.height)
    group.overrides = {"pg_timeout_s": 60.0}
    try:
        events = []
        got = list(group.generate(group.encode_prompt("hello"), group_aud, group_img, seed=9,
                                  progress=events.append))
    finally:
        group.close()
    assert [b.index for b in got] == [b.index for b in want]
    assert len(events) == len(got)
    for g, w in zip(got, want):
        assert g.first_frame == w.first_frame
        # fp32 on different thread counts: a few pixels may round differently
        diff = (g.frames.int() - w.frames.int()).abs()
        assert diff.max() <= 2 and diff.float().mean() < 0.01
        assert torch.equal(g.audio, w.audio)


@pytest.mark.slow
def test_cancel_raises_like_in_process_and_group_stays_usable(tmp_path):
    from liveavatar.pipeline import GenerationCancelled

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", seed=2)
    t = torch.arange(int(3.0 * 16000)) / 16000
    audio = audio_from_waveform((0.3 * torch.sin(2 * math.pi * 180 * t))[None], 16000)
    img = Image.new("RGB", (64, 64), (150, 110, 90))
    group = open_worker_group("checkpoint", ["cpu"], mode="single", ckpt_dir=str(ckpt), dtype="fp32")
    try:
        seen = []
        with pytest.raises(GenerationCancelled):
            for blk in group.generate(group.encode_prompt("hi"), group.encode_audio(audio),
                                      group.prepare_image(img, "64*64"), seed=1, cancel=lambda: bool(seen)):
                seen.append(blk)
        assert 1 <= len(seen) < 7
        short = audio_from_waveform((0.3 * torch.sin(2 * math.pi * 180 * t[:8000]))[None], 16000)
        again = list(group.generate(group.encode_prompt("hi"), group.encode_audio(short),
                                    group.prepare_image(img, "64*64"), seed=1))
        assert sum(b.frames.shape[0] for b in again) == 12
    finally:
        group.close()
