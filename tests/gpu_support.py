"""Shared by the CUDA tests (tests/test_gpu.py, tests/test_gpu_multi.py): a tiny job, the frames
of one in-process GPU, and the GPU processes nvidia-smi sees."""

from __future__ import annotations

import math
import subprocess
import time
from pathlib import Path

import torch


def tiny_job(folder: Path, seconds: float) -> tuple[Path, object, object]:
    """(tiny official-layout checkpoint, `seconds` of a 200 Hz tone as Audio16k, a 128x64 image)."""
    from liveavatar.loading.tiny import make_tiny_checkpoint
    from liveavatar.media.audio import audio_from_waveform
    from PIL import Image

    ckpt = make_tiny_checkpoint(folder / "tiny", seed=1)
    t = torch.arange(int(seconds * 16000)) / 16000
    audio = audio_from_waveform((0.3 * torch.sin(2 * math.pi * 200 * t))[None], 16000)
    return ckpt, audio, Image.new("RGB", (128, 64), (170, 120, 100))


def inprocess_blocks(ckpt: Path, audio, image, seed: int = 4) -> list:
    """Every decoded block of the job on cuda:0 in this process (fp32), then its memory freed."""
    from liveavatar.pipeline import LiveAvatar

    local = LiveAvatar.from_checkpoint(ckpt, device="cuda:0", dtype="fp32")
    blocks = list(local.generate(local.encode_prompt("hi"), local.encode_audio(audio),
                                 local.prepare_image(image, "128*64"), seed=seed))
    del local
    torch.cuda.empty_cache()
    return blocks


def max_pixel_difference(got: list, want: list) -> int:
    return max(int((g.frames.int() - w.frames.int()).abs().max()) for g, w in zip(got, want))


def gpu_pids() -> set[int]:
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout
    return {int(x) for x in out.split() if x.strip().isdigit()}


def wait_gone_from_gpu(pids: set[int], timeout: float) -> set[int]:
    """Poll nvidia-smi until none of `pids` holds GPU memory; returns those still there."""
    deadline = time.time() + timeout
    while gpu_pids() & pids and time.time() < deadline:
        time.sleep(0.5)
    return gpu_pids() & pids
