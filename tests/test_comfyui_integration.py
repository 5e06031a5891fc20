"""Real ComfyUI, headless on the CPU, with this pack linked into custom_nodes (needs COMFYUI_DIR).

The server and its throw-away base directory come from `comfy_server` (pack linked in, tiny
checkpoint, input media). It is driven only through its HTTP + websocket API:
/object_info, /workflow_templates, POST /prompt (the shipped API-format tiny workflow), /history,
/ws (progress + block previews), POST /interrupt.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import socket
import struct
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from comfy_server import LONG_AUDIO, PACK, SHORT_S, Server, needs_server
from test_nodes_support import REPO, TINY_NAME

pytestmark = [pytest.mark.comfyui, pytest.mark.slow, needs_server()]

OUR_NODES = {"LiveAvatarModelLoader", "LiveAvatarModelLoaderFiles", "LiveAvatarTextEncode", "LiveAvatarAudioEncode",
             "LiveAvatarReferenceImage", "LiveAvatarSampler", "LiveAvatarSaveMP4"}


class WebSocket:
    """Minimal RFC 6455 client (stdlib): reads ComfyUI's /ws messages on a thread."""

    def __init__(self, port: int, client_id: str):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /ws?clientId={client_id} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                           f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                           "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)
        assert b" 101 " in head.split(b"\r\n")[0], head
        self.sock.settimeout(None)
        self.messages: queue.Queue = queue.Queue()
        threading.Thread(target=self._run, daemon=True).start()

    def _read(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("websocket closed")
            buf += chunk
        return buf

    def _run(self) -> None:
        try:
            while True:
                b0, b1 = self._read(2)
                n = b1 & 0x7F
                if n == 126:
                    n = struct.unpack(">H", self._read(2))[0]
                elif n == 127:
                    n = struct.unpack(">Q", self._read(8))[0]
                mask = self._read(4) if b1 & 0x80 else None
                data = self._read(n)
                if mask:
                    data = bytes(c ^ mask[i % 4] for i, c in enumerate(data))
                op = b0 & 0x0F
                if op == 1:
                    self.messages.put(("text", json.loads(data)))
                elif op == 2:  # (event type, payload): 1/4 previews, 3 progress text (node id length, id, text)
                    self.messages.put(("binary", struct.unpack(">I", data[:4])[0], data[4:]))
                elif op == 8:
                    return
        except (OSError, ConnectionError, ValueError):
            return

    def wait_for(self, pred, timeout: float = 300):
        end = time.time() + timeout
        seen = []
        while time.time() < end:
            try:
                msg = self.messages.get(timeout=max(0.05, end - time.time()))
            except queue.Empty:
                break
            seen.append(msg)
            if pred(msg):
                return msg, seen
        raise TimeoutError(f"no matching websocket message; last: {seen[-5:]}")

    def drain(self) -> None:
        while True:
            try:
                self.messages.get_nowait()
            except queue.Empty:
                return

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


@pytest.fixture(scope="module")
def server(comfyui_server):
    return comfyui_server


def _api(name: str) -> dict:
    return json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text())


def _node(prompt: dict, class_type: str) -> tuple[str, dict]:
    return next((k, v) for k, v in prompt.items() if v["class_type"] == class_type)


def _ok(hist: dict) -> None:
    err = dict(hist["status"]["messages"]).get("execution_error")
    assert hist["status"]["status_str"] == "success", json.dumps(err, indent=1)[:6000]


def _saved_file(srv: Server, hist: dict, node_id: str) -> Path:
    item = hist["outputs"][node_id]["images"][0]
    assert item["type"] == "output"
    return srv.base / "output" / item["subfolder"] / item["filename"]


def test_pack_loads_and_lists_nodes_and_templates(server):
    info = server.get("/object_info")
    assert OUR_NODES <= set(info)
    assert TINY_NAME in info["LiveAvatarModelLoader"]["input"]["required"]["checkpoint"][1]["options"]
    templates = server.get("/workflow_templates")
    assert {"liveavatar_tiny_cpu", "liveavatar_single_gpu", "liveavatar_multi_gpu_tpp",
            "liveavatar_long_streaming"} <= set(templates[PACK])
    ui = server.get(f"/api/workflow_templates/{PACK}/liveavatar_tiny_cpu.json")
    assert "nodes" in ui and "links" in ui
    # the checkpoint combo holds checkpoints only (not the tiny checkpoint's wav2vec2 sub-folder), so a
    # workflow naming an absent checkpoint is refused at queue time, naming the input and the value
    assert info["LiveAvatarModelLoader"]["input"]["required"]["checkpoint"][1]["options"] == [TINY_NAME]
    status, body = server.post("/prompt", {"prompt": _api("liveavatar_single_gpu"), "client_id": "x"})
    assert status == 400 and "checkpoint" in json.dumps(body) and "Wan2.2-S2V-14B" in json.dumps(body)
    for name in templates[PACK]:  # the thumbnail the template browser asks for
        with urllib.request.urlopen(f"{server.url}/api/workflow_templates/{PACK}/{name}.jpg", timeout=30) as r:
            assert r.status == 200 and r.headers["Content-Type"] == "image/jpeg" and r.read(3) == b"\xff\xd8\xff"


def test_tiny_workflow_twice_then_interrupt(server):
    from liveavatar.media.video_writer import probe_video

    client = str(uuid.uuid4())
    ws = WebSocket(server.port, client)
    prompt = _api("liveavatar_tiny_cpu")
    save_id, _ = _node(prompt, "SaveVideo")
    loader_id, _ = _node(prompt, "LiveAvatarModelLoader")
    sampler_id, sampler = _node(prompt, "LiveAvatarSampler")
    frames = int(SHORT_S * 25)

    def run_and_time(p: dict) -> tuple[dict, float, float, list]:
        """-> (history, seconds until the sampler's first step, seconds in all, ws messages)."""
        t0 = time.time()
        pid = server.queue(p, client)
        _, seen = ws.wait_for(lambda m: m[0] == "text" and m[1]["type"] == "progress"
                              and m[1]["data"]["node"] == sampler_id)
        t_step = time.time() - t0
        _, rest = ws.wait_for(lambda m: m[0] == "text" and m[1]["type"] == "executing"
                              and m[1]["data"].get("node") is None and m[1]["data"].get("prompt_id") == pid)
        return server.wait_history(pid), t_step, time.time() - t0, seen + rest

    # 1st run: loads the model, encodes prompt, audio and reference (the session's server may have
    # run this workflow for another test: start from an empty cache)
    server.clear_cache()
    first, step1, wall1, seen = run_and_time(prompt)
    _ok(first)
    info = probe_video(_saved_file(server, first, save_id))
    assert info["frames"] == frames and (info["width"], info["height"]) == (64, 64)
    assert info["audio_duration_s"] == pytest.approx(frames / 25, abs=0.05) and info["audio_rate"] == 16000
    progress = [m[1]["data"] for m in seen if m[0] == "text" and m[1]["type"] == "progress"
                and m[1]["data"]["node"] == sampler_id]
    assert progress and progress[-1]["value"] == progress[-1]["max"] == 2 * 5  # 2 blocks x (4 steps + decode)
    assert sum(1 for m in seen if m[0] == "binary" and m[1] in (1, 4)) >= 2  # a preview per block
    # what the nodes show: drawn inside them by the frontend (progress text), kept in /history (ui text)
    texts = {}
    for m in seen:
        if m[0] == "binary" and m[1] == 3:
            n = struct.unpack(">I", m[2][:4])[0]
            texts.setdefault(m[2][4:4 + n].decode(), []).append(m[2][4 + n:].decode())
    ids = {t: _node(prompt, t)[0] for t in ("LiveAvatarReferenceImage", "LiveAvatarAudioEncode")}
    history_text = {k: v["text"][0] for k, v in first["outputs"].items() if "text" in v}
    assert history_text[ids["LiveAvatarReferenceImage"]].startswith("effective size 64x64")
    assert history_text[ids["LiveAvatarAudioEncode"]] == f"{frames} frames ({frames / 25:.2f} s at 25 fps)"
    assert history_text[sampler_id].startswith(f"{frames} frames ({frames / 25:.2f} s at 25 fps), 2 blocks in ")
    for node_id, shown in history_text.items():
        assert texts[node_id][-1] == shown, node_id  # the node's last drawn text is the final one
    assert texts[sampler_id][0].startswith("writing ") and texts[sampler_id][0].endswith(".mp4")  # its mp4
    assert texts[sampler_id][1].startswith("block 1/2: ")  # and a line per block while it runs
    assert history_text[sampler_id].endswith(f"{frames} frames as IMAGE: about 0.00 GB of RAM")

    # 2nd run, new seed: the loader (and encoders) are cached, the model is not reloaded
    sampler["inputs"]["seed"] = 7
    second, step2, wall2, _ = run_and_time(prompt)
    _ok(second)
    cached = dict(second["status"]["messages"])["execution_cached"]["nodes"]
    assert loader_id in cached and sampler_id not in cached
    assert probe_video(_saved_file(server, second, save_id))["frames"] == frames
    print(f"\nto the first denoising step: 1st run {step1:.1f} s, 2nd {step2:.1f} s; "
          f"whole run: 1st {wall1:.1f} s, 2nd {wall2:.1f} s")
    assert step2 < step1  # nothing to load or encode: the cached model and reference latents

    # a bad size is refused at queue time, naming the input; the server stays up
    bad = json.loads(json.dumps(prompt))
    _node(bad, "LiveAvatarReferenceImage")[1]["inputs"]["size"] = "700*400"
    status, body = server.post("/prompt", {"prompt": bad, "client_id": client})
    assert status == 400 and "'size'" in json.dumps(body)

    # streaming mp4 of a longer audio, interrupted after its first block reached the file
    long = json.loads(json.dumps(prompt))
    _node(long, "LoadAudio")[1]["inputs"]["audio"] = LONG_AUDIO
    for key in (save_id, _node(long, "CreateVideo")[0], sampler_id):
        long.pop(key)
    long["40"] = {"class_type": "LiveAvatarSaveMP4", "inputs": {
        "model": [loader_id, 0], "text": ["11", 0], "audio": ["12", 0], "reference": ["13", 0],
        "seed": 1, "steps": 4, "num_clip": 0, "filename_prefix": "LiveAvatar/interrupted"}}
    ws.drain()
    pid = server.queue(long, client)
    ws.wait_for(lambda m: m[0] == "binary" and m[1] in (1, 4))  # first decoded block's preview: it is in the mp4 now
    assert server.post("/interrupt")[0] == 200
    hist = server.wait_history(pid)
    events = [ev for ev, _ in hist["status"]["messages"]]
    assert hist["status"]["status_str"] == "error" and "execution_interrupted" in events
    part = sorted((server.base / "output" / "LiveAvatar").glob("interrupted_*.mp4"))
    assert len(part) == 1
    got = probe_video(part[0])
    assert 9 <= got["frames"] < 90, got

    # still serving, model still loaded: the short workflow runs again
    sampler["inputs"]["seed"] = 8
    again = server.wait_history(server.queue(prompt, client))
    _ok(again)
    assert loader_id in dict(again["status"]["messages"])["execution_cached"]["nodes"]
    ws.close()
