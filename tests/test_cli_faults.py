"""Faults around a real CLI run (subprocesses, tiny checkpoint on the CPU): what is on disk after a
SIGKILL, and what the user sees when the output cannot be written."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from test_cli_e2e import REPO, run_cli, write_wav

from liveavatar.media.video_writer import probe_video

pytestmark = pytest.mark.slow

BLOCK_LINE = re.compile(r"block (\d+)/(\d+): (\d+) frames")


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("faults")
    Image.new("RGB", (160, 96), (200, 150, 120)).save(d / "face.png")
    write_wav(d / "speech.wav", 3.0)
    res = run_cli("make-tiny-checkpoint", str(d / "ckpt"), "--seed", "3")
    assert res.returncode == 0, res.stderr
    return {"dir": d, "args": ["generate", "--image", str(d / "face.png"), "--audio", str(d / "speech.wav"),
                               "--prompt", "a person talking", "--ckpt-dir", str(d / "ckpt"), "--device", "cpu",
                               "--dtype", "fp32", "--size", "128x64", "--size-mode", "exact"]}


def _popen_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "liveavatar", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.parametrize("kill_after", [1, 2])
def test_sigkill_after_a_block_keeps_every_written_block(job, tmp_path, kill_after):
    """The CLI logs `block k/n` after writing block k; SIGKILL as soon as that line appears: the mp4
    plays and holds every frame of every block logged (and at most the block being written next)."""
    out = tmp_path / "killed.mp4"
    proc = _popen_cli(*job["args"], "--out", str(out))
    seen: list[int] = []
    total = None
    try:
        for line in proc.stdout:
            m = BLOCK_LINE.search(line)
            if m:
                seen.append(int(m.group(3)))
                total = int(m.group(2))
                if len(seen) == kill_after:
                    proc.send_signal(signal.SIGKILL)
                    break
    finally:
        proc.kill()
        rest = proc.stdout.read()
        proc.wait()
    seen += [int(m.group(3)) for m in BLOCK_LINE.finditer(rest)]
    assert total is not None and total > kill_after, "the job should have more blocks than we let it write"
    assert proc.returncode == -signal.SIGKILL and len(seen) == kill_after
    info = probe_video(out, decode=True)
    assert (info["width"], info["height"]) == (128, 64) and not info["truncated"]
    # every decoded block is there; a block finished between the log line and the kill may be too
    assert sum(seen) <= info["frames"] <= sum(seen) + seen[0]
    assert info["audio_duration_s"] >= sum(seen) / 25 - 3 * 1024 / 16000
