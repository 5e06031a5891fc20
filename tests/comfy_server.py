"""Real ComfyUI as a headless server on the CPU, for the integration and browser tests (no tests here).

`COMFYUI_DIR` names the ComfyUI checkout (see `test_nodes_support`). The server runs under
`$COMFYUI_DIR/.venv/bin/python` when that exists (what `shared/tools/comfyui-headless.sh` makes;
`.ci/run` links it to the pack's own .venv), else under this interpreter. Its base directory
(`--base-directory`) is a throw-away folder made by `prepare_base`: custom_nodes/ComfyUI-LiveAvatar
(a link to this repository), models/liveavatar/liveavatar-tiny (the tiny checkpoint), input/ (the
image and audio names the shipped workflows load) and output/.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from test_nodes_support import AUDIO_NAME, COMFYUI_DIR, IMAGE_NAME, REPO, TINY_NAME, make_tiny, write_wav

PACK = "ComfyUI-LiveAvatar"  # the folder name ComfyUI's docs use for this pack
SHORT_S = 0.44  # input/speech.wav: 11 frames at 25 fps, 2 blocks
LONG_AUDIO = "speech_long.wav"  # assets/speech.wav: 3.6 s, 90 frames, 8 blocks


def comfy_python() -> str:
    """The interpreter that runs ComfyUI's main.py."""
    venv_py = Path(COMFYUI_DIR or ".") / ".venv" / "bin" / "python"
    return str(venv_py) if venv_py.is_file() else sys.executable


def server_problem() -> str | None:
    """Why a ComfyUI server cannot be started here (None when it can).

    Checks that COMFYUI_DIR holds main.py and that `comfy_python()` has every distribution of
    ComfyUI's requirements.txt (a user's ComfyUI may run under another interpreter than the pack's
    .venv; then say so instead of failing inside ComfyUI's startup).
    """
    if not COMFYUI_DIR:
        return "COMFYUI_DIR is not set (./dev.sh test sets it when the pack sits in ComfyUI/custom_nodes)"
    root = Path(COMFYUI_DIR)
    if not (root / "main.py").is_file():
        return f"COMFYUI_DIR={COMFYUI_DIR} has no main.py"
    names = [m.group(0) for line in (root / "requirements.txt").read_text().splitlines()
             if (m := re.match(r"[A-Za-z0-9][A-Za-z0-9_.-]*", line.strip()))]
    probe = ("import importlib.metadata as md, sys\n"
             "missing = []\n"
             "for n in sys.argv[1:]:\n"
             "    try: md.version(n)\n"
             "    except md.PackageNotFoundError: missing.append(n)\n"
             "print(' '.join(missing))\n")
    out = subprocess.run([comfy_python(), "-c", probe, *names], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        return f"{comfy_python()} does not run: {out.stderr[-500:]}"
    if out.stdout.strip():
        return (f"{comfy_python()} lacks ComfyUI's requirements {out.stdout.strip()}: install "
                f"{root / 'requirements.txt'} into it, or make {root / '.venv'} the interpreter that has them")
    return None


def needs_server():
    """pytest mark: skip unless a ComfyUI server can be started (CI turns such skips into failures)."""
    problem = server_problem()
    return pytest.mark.skipif(problem is not None, reason=problem or "")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`main.py --cpu` on a free loopback port, its output in `<base>/comfyui.log`."""

    def __init__(self, base: Path):
        self.base = base
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "comfyui.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [comfy_python(), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
             "--disable-auto-launch", "--base-directory", str(base)],
            cwd=COMFYUI_DIR, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 240) -> None:
        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise TimeoutError(f"ComfyUI did not start in {timeout} s:\n{self.tail()}")

    def tail(self, n: int = 4000) -> str:
        self.log.flush()
        return self.log_path.read_bytes()[-n:].decode(errors="replace")

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict | None = None):
        data = json.dumps(body or {}).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                raw = r.read()
                return r.status, (json.loads(raw) if raw else None)
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def clear_cache(self) -> None:
        """Forget every cached node output (POST /free: the worker resets its executor when it next
        wakes), so the next prompt runs every node again, whatever an earlier test ran."""
        status, _ = self.post("/free", {"unload_models": True, "free_memory": True})
        assert status == 200, f"/free answered {status}"
        time.sleep(2.0)  # the worker wakes on the flag and resets before it takes the next prompt

    def queue(self, prompt: dict, client_id: str) -> str:
        status, body = self.post("/prompt", {"prompt": prompt, "client_id": client_id})
        assert status == 200, f"/prompt refused it: {body}"
        return body["prompt_id"]

    def wait_history(self, prompt_id: str, timeout: float = 300) -> dict:
        end = time.time() + timeout
        while time.time() < end:
            hist = self.get(f"/history/{prompt_id}")
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                if hist[prompt_id]["status"].get("status_str") in ("success", "error"):
                    return hist[prompt_id]
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died:\n{self.tail()}")
            time.sleep(0.3)
        raise TimeoutError(f"prompt {prompt_id} did not finish:\n{self.tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


def prepare_base(base: Path) -> Path:
    """Fill a ComfyUI base directory: the pack linked in, the tiny checkpoint, the workflows' inputs."""
    (base / "custom_nodes").mkdir(parents=True)
    os.symlink(REPO, base / "custom_nodes" / PACK)
    make_tiny(base / "models" / "liveavatar" / TINY_NAME)
    (base / "input").mkdir()
    shutil.copy(REPO / "assets" / "avatar.png", base / "input" / IMAGE_NAME)
    write_wav(base / "input" / AUDIO_NAME, SHORT_S, rate=44100, channels=2)
    shutil.copy(REPO / "assets" / "speech.wav", base / "input" / LONG_AUDIO)
    return base


@contextlib.contextmanager
def running_server(base: Path) -> Iterator[Server]:
    """A started, answering server on a prepared base directory; stopped on exit."""
    srv = Server(prepare_base(base))
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()
