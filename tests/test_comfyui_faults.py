"""The ComfyUI server stopped mid-job while our worker group runs (issue 17): SIGTERM, then SIGKILL,
of a real headless server whose loader put the model on a 2-rank CPU worker group (`devices
cpu,cpu`, gloo). Each time: no worker process is left within 30 s (checked by pid), the streamed mp4
plays with the blocks written, and a server started again on the same folders runs a job through a
fresh group. Needs COMFYUI_DIR; three server starts, so it is slow."""

from __future__ import annotations

import json
import signal
import time
import uuid

import psutil
import pytest

from comfy_server import LONG_AUDIO, Server, needs_server, prepare_base
from liveavatar.media.video_writer import probe_video
from test_nodes_support import AUDIO_NAME

pytestmark = [pytest.mark.comfyui, pytest.mark.slow, needs_server()]


def _group_prompt(audio: str, prefix: str) -> dict:
    """The tiny workflow on a `cpu,cpu` worker group, streamed to an mp4 by LiveAvatar Save MP4."""
    from test_comfyui_integration import _api

    prompt = _api("liveavatar_tiny_cpu")
    prompt["10"]["inputs"].update(devices="cpu,cpu", gpu_mode="tpp")
    prompt["2"]["inputs"]["audio"] = audio
    for key in ("20", "21", "22"):
        prompt.pop(key)
    prompt["40"] = {"class_type": "LiveAvatarSaveMP4", "inputs": {
        "model": ["10", 0], "text": ["11", 0], "audio": ["12", 0], "reference": ["13", 0],
        "seed": 1, "steps": 4, "num_clip": 0, "filename_prefix": f"LiveAvatar/{prefix}"}}
    return prompt


def _workers(pid: int) -> list[int]:
    return [c.pid for c in psutil.Process(pid).children(recursive=True)
            if any("parallel.worker" in part for part in c.cmdline())]


def _alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def test_server_stopped_mid_job_leaves_no_worker_and_a_playable_mp4(tmp_path):
    from test_comfyui_integration import WebSocket, _ok

    base = prepare_base(tmp_path / "base")
    for sig in (signal.SIGTERM, signal.SIGKILL):
        srv = Server(base)
        try:
            srv.wait_ready()
            client = str(uuid.uuid4())
            ws = WebSocket(srv.port, client)
            srv.queue(_group_prompt(LONG_AUDIO, sig.name), client)
            ws.wait_for(lambda m: m[0] == "binary" and m[1] in (1, 4), timeout=600)  # a block is in the mp4
            workers = _workers(srv.proc.pid)
            assert len(workers) == 2, workers
            srv.proc.send_signal(sig)
            t0 = time.monotonic()
            srv.proc.wait(30)
            while _alive(workers) and time.monotonic() - t0 < 30:
                time.sleep(0.2)
            assert not _alive(workers), f"{sig.name}: workers {_alive(workers)} outlived the server"
            ws.close()
        finally:
            srv.stop()
        part = sorted((base / "output" / "LiveAvatar").glob(f"{sig.name}_*.mp4"))
        assert len(part) == 1, part
        info = probe_video(part[0], decode=True)
        assert not info["truncated"] and 9 <= info["frames"] < 90, info
    # started again on the same folders: a job runs through a fresh group to its end
    srv = Server(base)
    try:
        srv.wait_ready()
        hist = srv.wait_history(srv.queue(_group_prompt(AUDIO_NAME, "after"), str(uuid.uuid4())), timeout=600)
        _ok(hist)
        done = sorted((base / "output" / "LiveAvatar").glob("after_*.mp4"))
        assert len(done) == 1 and probe_video(done[0])["frames"] == 11, json.dumps(hist["status"])[:2000]
    finally:
        srv.stop()
