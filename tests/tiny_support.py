"""The tiny models and jobs several test files share (one copy of each setup).

- `fixture_dit`: the reference's tiny S2V DiT with its fixture weights (`tiny_s2v/`), eval mode.
- `forward_fixture`: the reference's DiT inputs (`forward/inputs_shared`) and its two single-step
  cases (`block0_step0`, `block1_step0`).
- `pipeline_model` / `pipeline_job`: a tiny random checkpoint loaded in-process and a 2.2 s job
  (gated 200 Hz tone, flat 64*64 image) encoded by it; as module-scoped fixtures named `model` and
  `job` for a test module that imports `model_fixture, job_fixture`.
- `group_reference`: the job worker-group tests send, with the in-process frames it must give.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from liveavatar.config import DiTConfig
from liveavatar.models.dit import CausalS2VDiT

HW = (16, 24)  # latent height, width of the forward fixtures


def fixture_dit(fixtures_dir: Path, dtype: torch.dtype = torch.float32, **kwargs) -> CausalS2VDiT:
    """The tiny DiT of `tiny_s2v/config.json` with the reference's weights; `kwargs` go to the model."""
    cfg = DiTConfig.from_json(fixtures_dir / "tiny_s2v" / "config.json")
    model = CausalS2VDiT(cfg, **kwargs)
    model.load_state_dict(load_file(fixtures_dir / "tiny_s2v" / "diffusion_pytorch_model.safetensors"))
    return model.eval().to(dtype)


def forward_fixture(fixtures_dir: Path) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """(shared inputs: context, ref/motion latents, ...; [block 0 step 0 case, block 1 step 0 case])."""
    fwd = fixtures_dir / "forward"
    inp = load_file(fwd / "inputs_shared.safetensors")
    cases = [load_file(fwd / "block0_step0.safetensors"), load_file(fwd / "block1_step0.safetensors")]
    return inp, cases


def pipeline_model(folder: Path):
    """`LiveAvatar` on the CPU in fp32 from a tiny random checkpoint (seed 5) written to `folder`."""
    from liveavatar.loading.tiny import make_tiny_checkpoint
    from liveavatar.pipeline import LiveAvatar

    return LiveAvatar.from_checkpoint(make_tiny_checkpoint(folder, seed=5), device="cpu", dtype="fp32")


def pipeline_job(model) -> dict:
    """2.2 s of a gated 200 Hz tone and a flat 64*64 image, encoded by `model`:
    {"ctx", "aud", "img", "ref", "audio"}."""
    from liveavatar.media.audio import audio_from_waveform

    t = torch.arange(int(2.2 * 16000)) / 16000
    wave = 0.3 * torch.sin(2 * math.pi * 200 * t) * (t * 3 % 1 > 0.4)
    audio = audio_from_waveform(wave[None], 16000)
    image = model.prepare_image(Image.new("RGB", (64, 64), (180, 120, 90)), "64*64")
    return {"ctx": model.encode_prompt("a person"), "aud": model.encode_audio(audio), "img": image,
            "ref": model.encode_reference(image), "audio": audio}


@pytest.fixture(scope="module", name="model")
def model_fixture(tmp_path_factory):
    return pipeline_model(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module", name="job")
def job_fixture(model) -> dict:
    return pipeline_job(model)


def group_reference(ckpt: Path, other_steps: int | None = None) -> tuple[dict, list, list | None]:
    """The job the worker-group tests send (random 80x64 image, 2.5 s 220 Hz sine: 62 frames, 6
    blocks over 2 clips, 64*64, seed 3, 4 steps) and the in-process blocks it must give, computed
    with one CPU thread like every worker (fp32 sums in one order). With `other_steps`, also the
    first clip's frames at that step count ([T, H, W, 3] per block). Returns (job, blocks, frames)."""
    from liveavatar.media.audio import Audio16k
    from liveavatar.pipeline.model import LiveAvatar
    from parallel.engine import make_job

    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((80, 64, 3)) * 255).astype(np.uint8))
    t = torch.arange(int(16000 * 2.5)) / 16000
    audio = Audio16k((0.3 * torch.sin(2 * torch.pi * 220 * t)).float())
    job = make_job(image, audio, "a person talking", size="64*64", seed=3, steps=4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = LiveAvatar.from_checkpoint(ckpt, device="cpu", dtype="fp32")
        img = model.prepare_image(image, "64*64")
        text, audio_features = model.encode_prompt(job["prompt"]), model.encode_audio(audio)
        blocks = list(model.generate(text, audio_features, img, seed=3, steps=4))
        other = None if other_steps is None else [
            b.frames for b in model.generate(model.encode_prompt(job["prompt"]), model.encode_audio(audio),
                                             img, seed=3, steps=other_steps, num_clip=1)]
    finally:
        torch.set_num_threads(threads)
    assert [b.index for b in blocks] == list(range(6)) and sum(b.frames.shape[0] for b in blocks) == 62
    return job, blocks, other
