"""The long workflow's VIDEO path in real ComfyUI: minutes of output never held in RAM (needs COMFYUI_DIR).

`workflows/api/liveavatar_long_streaming.json` (Sampler video -> core Save Video) on the session
server (tests/comfy_server.py), switched to the tiny checkpoint on the CPU at its smallest size, runs
`LONG_S` seconds of audio. While it runs the server's RSS is sampled (psutil on its pid) and the
Sampler's growing mp4 in temp/ is opened (playable mid-run). Asserted:
- the saved video lasts as long as the audio, within one frame, and has an AAC audio stream;
- frames were never held in RAM. What the IMAGE path would have collected for this run
  (`video_out.collect_bytes`: 12 bytes per pixel per frame) grows with the frames written, so the
  server's typical RSS (the median sample of a stretch) is compared: its growth from the first
  fifth of the run to the last fifth stays under a quarter of that amount (holding the frames
  would grow it by 4/5 of it). The server runs glibc's default allocator, whose RSS sits about
  100 MiB above the live data and, now and then, drops by ~230 MiB for a moment when glibc trims
  (a stretch's lowest sample moved by 67 MiB between stretches in one CI run: noise, not memory
  held); with a fixed mmap threshold (`MALLOC_MMAP_THRESHOLD_=131072`, which doubles the run's
  time) the same run stays within +16..+49 MiB of the baseline throughout (2026-12-04). The peak
  is bounded by twice the IMAGE path's amount. Printed with the numbers.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from pathlib import Path

import pytest

from comfy_server import Server, needs_server
from test_nodes_support import AUDIO_NAME, REPO, TINY_NAME, pack_submodule, write_wav

pytestmark = [pytest.mark.comfyui, pytest.mark.slow, needs_server()]

FPS = 25
LONG_S = 120.0  # audio seconds: 3000 frames, 250 blocks: the IMAGE path would hold 148 MiB at 64*64
SIZE = "64*64"  # the tiny checkpoint's smallest size
LONG_AUDIO = "speech_minutes.wav"


class RssSampler:
    """Samples a process's resident memory (psutil) every `period` seconds on a thread; bytes."""

    def __init__(self, pid: int, period: float = 0.2):
        import psutil

        self.proc = psutil.Process(pid)
        self.period = period
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.proc.memory_info().rss)
            self._stop.wait(self.period)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def long_prompt(audio_name: str, prefix: str) -> dict:
    """The shipped long workflow on the tiny checkpoint, CPU, smallest size, the given input audio."""
    prompt = json.loads((REPO / "workflows" / "api" / "liveavatar_long_streaming.json").read_text())
    for node in prompt.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "LiveAvatarModelLoader":
            inputs.update(checkpoint=TINY_NAME, precision="fp32", devices="cpu", gpu_mode="single", compile=False)
        elif kind == "LiveAvatarReferenceImage":
            inputs.update(size=SIZE)
        elif kind == "LoadAudio":
            inputs.update(audio=audio_name)
        elif kind == "SaveVideo":
            inputs.update(filename_prefix=prefix)
    return prompt


def saved_video(srv: Server, hist: dict) -> Path:
    status = hist["status"]
    assert status["status_str"] == "success", json.dumps(dict(status["messages"]).get("execution_error"))[:4000]
    (item,) = [i for out in hist["outputs"].values() for i in out.get("images", []) if i["type"] == "output"]
    return srv.base / "output" / item["subfolder"] / item["filename"]


def test_long_workflow_streams_video_without_frames_in_ram(comfyui_server):
    from liveavatar.media.video_writer import probe_video

    srv = comfyui_server
    write_wav(srv.base / "input" / LONG_AUDIO, LONG_S, rate=16000, channels=1)
    temp = srv.base / "temp" / "LiveAvatar"

    # warm-up: the same graph on the 0.44 s input loads the model and imports everything
    warm = saved_video(srv, srv.wait_history(srv.queue(long_prompt(AUDIO_NAME, "LiveAvatar/warm"), "long")))
    assert probe_video(warm)["frames"] == 11
    before = set(temp.glob("*.mp4"))

    t0 = time.time()
    with RssSampler(srv.proc.pid) as rss:
        baseline = rss.proc.memory_info().rss
        pid = srv.queue(long_prompt(LONG_AUDIO, "LiveAvatar/long"), "long")
        growing = None  # the Sampler's mp4, opened while it is written
        while growing is None and time.time() - t0 < 600:
            fresh = sorted(set(temp.glob("*.mp4")) - before)
            if fresh and fresh[0].stat().st_size > 20_000:
                growing = probe_video(fresh[0])
            time.sleep(0.5)
        hist = srv.wait_history(pid, timeout=900)
    wall = time.time() - t0

    path = saved_video(srv, hist)
    info = probe_video(path)
    frames = round(LONG_S * FPS)
    assert info["codecs"] == {"video": "h264", "audio": "aac"} and info["audio_rate"] == 16000
    assert abs(info["frames"] / FPS - LONG_S) <= 1 / FPS, info
    assert abs(info["audio_duration_s"] - LONG_S) <= 1 / FPS, info
    assert growing is not None and 0 < growing["frames"] < frames, growing  # playable while it grows

    width, height = (int(v) for v in SIZE.split("*"))
    image_path = pack_submodule("nodes.video_out").collect_bytes(frames, width, height, frames * 640)
    samples = rss.samples
    fifth = max(1, len(samples) // 5)
    growth = statistics.median(samples[-fifth:]) - statistics.median(samples[:fifth])
    peak = max(samples)
    print(f"\n{LONG_S:.0f} s audio, {frames} frames at {SIZE}: {wall:.1f} s; server RSS baseline "
          f"{baseline / 2**20:.1f} MiB, typical growth {growth / 2**20:+.1f} MiB (bound "
          f"{image_path / 4 / 2**20:.1f}), peak +{(peak - baseline) / 2**20:.1f} MiB (bound "
          f"{2 * image_path / 2**20:.1f}; {len(samples)} samples); the IMAGE path would hold "
          f"+{image_path / 2**20:.1f} MiB more")
    assert growth < image_path / 4
    assert peak < baseline + 2 * image_path
