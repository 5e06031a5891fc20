"""Process helpers for worker groups: launching from a long-lived thread, reading worker logs."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any


class _Launcher:
    """Starts workers from one long-lived thread: PR_SET_PDEATHSIG fires when the thread that
    forked a child ends, so forking from a short-lived caller thread would kill the workers."""

    def __init__(self) -> None:
        self._q: queue.Queue = queue.Queue()
        threading.Thread(target=self._loop, name="parallel-launcher", daemon=True).start()

    def _loop(self) -> None:
        while True:
            args, kwargs, box, done = self._q.get()
            try:
                box.append(subprocess.Popen(*args, **kwargs))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
                box.append(exc)
            done.set()

    def popen(self, *args: Any, **kwargs: Any) -> subprocess.Popen:
        box: list = []
        done = threading.Event()
        self._q.put((args, kwargs, box, done))
        done.wait()
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]


_launcher: _Launcher | None = None
_launcher_lock = threading.Lock()


def popen(*args: Any, **kwargs: Any) -> subprocess.Popen:
    global _launcher
    with _launcher_lock:
        if _launcher is None:
            _launcher = _Launcher()
    return _launcher.popen(*args, **kwargs)


def tail(path: Path | None, chars: int = 6000) -> str:
    if path is None or not path.exists():
        return ""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - chars))
        return f.read().decode("utf-8", "replace")


def last_traceback(text: str) -> str:
    for marker in ("Traceback (most recent call last)", "Fatal Python error", "Thread 0x",
                   "Current thread"):
        i = text.rfind(marker)
        if i >= 0:
            return text[i:]
    return text[-2000:]


def innermost_frames(text: str, n: int = 3) -> str:
    """From a faulthandler dump in a log: where the thread that took the signal ("Current
    thread"; else the last thread dumped) stands, as "file:line in func; ...": its innermost
    frame, then its next `n - 1` frames outside installed packages (torch, the stdlib), i.e. in
    this pack or the engine. "" when the text holds no dump."""
    i = text.rfind("Current thread")
    if i < 0:
        i = text.rfind("Thread 0x")
    if i < 0:
        return ""
    frames: list[tuple[str, str]] = []  # (path, "name:line in func")
    for line in text[i:].splitlines()[1:]:
        line = line.strip()
        if not line.startswith("File "):
            break
        path, _, rest = line[5:].partition(", line ")
        path = path.strip('"')
        frames.append((path, f"{Path(path).name}:{rest}"))
    if not frames:
        return ""
    ours = [f for p, f in frames[1:] if "-packages" not in p and "/lib/python" not in p]
    return "; ".join([frames[0][1], *ours[: n - 1]])


def exit_text(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
