"""Overlapped decode (DiT thread + decode stream) is CUDA only: on the CPU the serial path runs.

The CUDA behaviour (frames equal to the serial path, cancel, early close) is in tests/test_gpu.py.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from PIL import Image

from liveavatar.loading.tiny import make_tiny_checkpoint
from liveavatar.media.audio import audio_from_waveform
from liveavatar.pipeline import LiveAvatar
from liveavatar.pipeline.overlap import overlapped_decode


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = LiveAvatar.from_checkpoint(make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=2),
                                       device="cpu", dtype="fp32")
    t = torch.arange(int(1.0 * 16000)) / 16000
    audio = audio_from_waveform((0.3 * torch.sin(2 * math.pi * 200 * t))[None], 16000)
    image = model.prepare_image(Image.new("RGB", (64, 64), (180, 120, 90)), "64*64")
    return model, (model.encode_prompt("a person"), model.encode_audio(audio), image)


def test_forced_overlap_on_cpu_is_refused_before_any_work(setup):
    model, args = setup
    steps = []
    gen = model.generate(*args, seed=1, overlap_decode=True, progress=steps.append)
    with pytest.raises(ValueError, match="overlap_decode=True needs a CUDA model"):
        next(gen)
    assert steps == []
    with pytest.raises(ValueError, match="needs a CUDA device"):
        next(overlapped_decode(lambda stopped: iter(()), lambda: None, torch.device("cpu")))


def test_default_on_cpu_is_the_serial_path(setup):
    model, args = setup
    default = list(itertools.islice(model.generate(*args, seed=1), 2))
    serial = list(itertools.islice(model.generate(*args, seed=1, overlap_decode=False), 2))
    assert len(default) == 2
    for a, b in zip(default, serial):
        assert torch.equal(a.frames, b.frames)
        assert set(a.timings) == {"dit", "decode"} and min(a.timings.values()) > 0
