"""End to end through the real CLI in subprocesses: tiny checkpoint -> generate -> mp4 with audio.

Checks what a user checks: the file's size equals the logged effective size, frame count and fps
follow the audio length, the audio track is there and as long as the video (within one frame).
Bad input (exit status 2, a one-line cause) is the matrix of `test_bad_input_matrix.py`.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from liveavatar.config import DiTConfig
from liveavatar.media.video_writer import probe_video

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600,
            env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "liveavatar", *args], cwd=cwd or REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO), **(env or {})})


def write_wav(path: Path, seconds: float, rate: int = 22050, channels: int = 2) -> None:
    t = np.arange(int(seconds * rate)) / rate
    sig = 0.3 * np.sin(2 * math.pi * 220 * t) * (1 + np.sin(2 * math.pi * 3 * t)) / 2
    data = np.repeat((sig * 32767).astype(np.int16)[:, None], channels, axis=1)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(data.tobytes())


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("e2e")
    img = Image.new("RGB", (200, 100), (200, 150, 120))
    img.paste((40, 40, 40), (80, 30, 120, 60))
    img.save(d / "face.png")
    write_wav(d / "speech.wav", 1.3)
    res = run_cli("make-tiny-checkpoint", str(d / "ckpt"), "--seed", "3")
    assert res.returncode == 0, res.stderr
    return {"dir": d, "image": d / "face.png", "audio": d / "speech.wav", "ckpt": d / "ckpt"}


def generate(inputs: dict, out: Path, *extra: str, ckpt: Path | None = None,
             env: dict | None = None) -> subprocess.CompletedProcess:
    return run_cli("generate", "--image", str(inputs["image"]), "--audio", str(inputs["audio"]),
                   "--prompt", "a person talking", "--ckpt-dir", str(ckpt or inputs["ckpt"]),
                   "--device", "cpu", "--dtype", "fp32", "--out", str(out), *extra, env=env)


def test_generate_writes_the_logged_size_with_audio(inputs):
    out = inputs["dir"] / "out" / "video.mp4"
    res = generate(inputs, out, "--size", "128x64", "--size-mode", "exact", "--seed", "1")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "effective size 128x64" in res.stderr + res.stdout
    info = probe_video(out)
    assert (info["width"], info["height"]) == (128, 64)
    assert info["fps"] == pytest.approx(25)
    # 1.3 s of audio -> floor(1.3 * 25) = 32 frames; the audio track matches within one frame
    assert info["frames"] == 32
    assert info["audio_duration_s"] == pytest.approx(32 / 25, abs=1 / 25)
    assert info["audio_rate"] == 16000


def test_other_tiny_config_loads_without_code_changes(inputs, tmp_path):
    cfg = DiTConfig(dim=48, num_heads=3, num_layers=3, ffn_dim=96, freq_dim=32, audio_dim=32,
                    audio_inject_layers=(1, 2))
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    ckpt = tmp_path / "other"
    res = run_cli("make-tiny-checkpoint", str(ckpt), "--config", str(tmp_path / "cfg.json"))
    assert res.returncode == 0, res.stderr
    loaded = DiTConfig.from_json(ckpt)
    assert (loaded.dim, loaded.num_layers, loaded.audio_inject_layers) == (48, 3, (1, 2))
    # relative paths (taken from the working directory), area mode, a clip cap
    d = inputs["dir"]
    res = run_cli("generate", "--image", "face.png", "--audio", "speech.wav", "--prompt", "hi",
                  "--ckpt-dir", str(ckpt), "--size", "128*64", "--num-clip", "1",
                  "--device", "cpu", "--dtype", "fp32", "--out", "rel/other.mp4", cwd=d)
    assert res.returncode == 0, res.stderr[-3000:]
    line = next(ln for ln in (res.stderr + res.stdout).splitlines() if "effective size" in ln)
    w, h = map(int, line.split("effective size ")[1].split()[0].rstrip(",").split("x"))
    info = probe_video(d / "rel" / "other.mp4")
    assert (info["width"], info["height"]) == (w, h)
    assert w % 64 == 0 and h % 64 == 0 and w * h <= 128 * 64
    assert info["frames"] == 32


# Bad input through the CLI (sizes, options, files, checkpoints): tests/test_bad_input_matrix.py
