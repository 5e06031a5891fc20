"""Helpers for the node tests (no tests here): ComfyUI modules, the pack as ComfyUI loads it, media.

ComfyUI's own modules (`comfy_api`, `folder_paths`, `comfy.*`) come from the checkout named by
`COMFYUI_DIR` (`./dev.sh test` sets it to the ComfyUI around the pack when there is one; `.ci/run`
to the snapshot it sets up); tests that need them skip when it is unset or ComfyUI's requirements
are not importable from this interpreter, and fail instead of skipping under CI=true (conftest.py).
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import wave
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACK_MODULE = "comfyui_liveavatar_pack"
COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
TINY_NAME = "liveavatar-tiny"
IMAGE_NAME = "avatar.png"  # the names the shipped workflows load
AUDIO_NAME = "speech.wav"


def comfy_problem() -> str | None:
    """Why ComfyUI's modules cannot be used here (None when they can)."""
    if not COMFYUI_DIR:
        return "COMFYUI_DIR is not set"
    if not (Path(COMFYUI_DIR) / "comfy_api" / "latest" / "__init__.py").is_file():
        return f"COMFYUI_DIR={COMFYUI_DIR} has no comfy_api/latest (V3 schema)"
    try:
        import_comfy()
    except Exception as exc:  # missing dependency of ComfyUI in this interpreter
        return f"ComfyUI modules do not import here: {exc!r}"
    return None


def import_comfy():
    """Import ComfyUI's modules from COMFYUI_DIR on the CPU; returns (folder_paths, model_management)."""
    root = str(Path(COMFYUI_DIR).resolve())
    if root not in sys.path:
        sys.path.insert(0, root)  # ahead of the repo, whose nodes/ would shadow ComfyUI's nodes.py
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_management as mm
    import comfy.utils  # noqa: F401
    import folder_paths
    from comfy_api.latest import io  # noqa: F401

    return folder_paths, mm


def needs_comfy():
    """pytest mark: skip unless ComfyUI's modules import."""
    problem = comfy_problem()
    return pytest.mark.skipif(problem is not None, reason=problem or "")


def load_pack():
    """Import the repo as ComfyUI does (a package from its __init__.py) and return it."""
    if PACK_MODULE in sys.modules:
        return sys.modules[PACK_MODULE]
    spec = importlib.util.spec_from_file_location(PACK_MODULE, REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE] = module
    spec.loader.exec_module(module)
    return module


def pack_submodule(name: str):
    load_pack()
    return importlib.import_module(f"{PACK_MODULE}.{name}")


def speech_like(seconds: float, rate: int = 22050, channels: int = 2):
    """A syllable-rate modulated harmonic tone, float32 [channels, T] (stereo: slightly different)."""
    import torch

    t = torch.arange(int(round(seconds * rate)), dtype=torch.float32) / rate
    env = 0.5 * (1 - torch.cos(2 * math.pi * 4.0 * t))
    tone = sum(torch.sin(2 * math.pi * f * t) / (k + 1) for k, f in enumerate((180.0, 360.0, 720.0)))
    mono = 0.3 * env * tone
    return torch.stack([mono * (1.0 - 0.2 * c) for c in range(channels)])


def write_wav(path: Path, seconds: float, rate: int = 22050, channels: int = 2) -> Path:
    """16-bit PCM wav of `speech_like` audio (standard library writer)."""
    import numpy as np

    data = speech_like(seconds, rate, channels).numpy().T
    pcm = (np.clip(data, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


def make_tiny(dest: Path) -> Path:
    """The tiny random checkpoint folder (official layout) at `dest`."""
    from liveavatar.loading.tiny import make_tiny_checkpoint

    make_tiny_checkpoint(dest, 0)
    return dest
