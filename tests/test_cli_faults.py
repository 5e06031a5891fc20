"""Faults around a real CLI run (subprocesses, tiny checkpoint on the CPU): what is on disk after a
SIGKILL, and what the user sees when the output cannot be written."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from test_cli_e2e import REPO, run_cli, write_wav

from liveavatar.media.video_writer import probe_video

pytestmark = pytest.mark.slow

BLOCK_LINE = re.compile(r"block (\d+)/(\d+): (\d+) frames")
BLOCK_FRAMES = 12  # frames of a block of the tiny model (the first block: 9, its lead-in dropped)


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("faults")
    Image.new("RGB", (160, 96), (200, 150, 120)).save(d / "face.png")
    write_wav(d / "speech.wav", 3.0)
    write_wav(d / "long.wav", 130.0)  # > IN_MEMORY_S: spooled to disk, wav2vec2 features in windows
    res = run_cli("make-tiny-checkpoint", str(d / "ckpt"), "--seed", "3")
    assert res.returncode == 0, res.stderr
    return {"dir": d, "args": ["generate", "--image", str(d / "face.png"), "--audio", str(d / "speech.wav"),
                               "--prompt", "a person talking", "--ckpt-dir", str(d / "ckpt"), "--device", "cpu",
                               "--dtype", "fp32", "--size", "128x64", "--size-mode", "exact"]}


def _popen_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "liveavatar", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.parametrize("kill_after,audio", [(1, "speech.wav"), (2, "speech.wav"), (1, "long.wav")])
def test_sigkill_after_a_block_keeps_every_written_block(job, tmp_path, kill_after, audio):
    """The CLI logs `block k/n` after writing block k; SIGKILL as soon as that line appears: the mp4
    plays and holds every frame of every block logged (and at most the block being written next).
    long.wav (130 s) takes the long-audio path: spooled samples, windowed wav2vec2 features."""
    out = tmp_path / "killed.mp4"
    proc = _popen_cli(*job["args"], "--audio", str(job["dir"] / audio), "--out", str(out))
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
    assert sum(seen) <= info["frames"] <= sum(seen) + BLOCK_FRAMES
    assert info["audio_duration_s"] >= sum(seen) / 25 - 3 * 1024 / 16000


# --------------------------------------------------------------------------- file-system faults


@pytest.fixture()
def tmpfs(tmp_path):
    """mount(options) -> a fresh tmpfs folder (root only). Skipped where mounting is not permitted,
    except under CI=true, where that is a failure."""
    mounted: list[Path] = []

    def mount(options: str) -> Path:
        where = tmp_path / f"mnt{len(mounted)}"
        where.mkdir()
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            why = f"cannot mount a tmpfs here ({res.stderr.strip() or res.returncode}); run as root"
            if os.environ.get("CI") == "true":
                pytest.fail(why)
            pytest.skip(why)
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _one_error_line(res: subprocess.CompletedProcess) -> str:
    lines = res.stderr.strip().splitlines()
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert lines and lines[-1].startswith("error: "), res.stderr[-3000:]
    assert sum(ln.startswith("error: ") for ln in lines) == 1
    return lines[-1]


def test_read_only_out_is_one_error_line_naming_the_path(job, tmpfs):
    """Refused at the edge (a file is created and dropped in --out's folder first): exit 2, before
    any model load."""
    out = tmpfs("ro,size=64k") / "video.mp4"
    res = run_cli(*job["args"], "--out", str(out))
    assert res.returncode == 2
    line = _one_error_line(res)
    assert line.startswith(f"error: --out: cannot write {out}") and "Read-only file system" in line
    assert "loading" not in res.stderr.lower() and not out.exists()


def test_disk_full_is_one_error_line_and_the_partial_mp4_plays(job, tmpfs):
    """A 96 KiB tmpfs holds the first blocks of the 3 s job, then the disk is full."""
    out = tmpfs("size=96k") / "video.mp4"
    res = run_cli(*job["args"], "--out", str(out))
    assert res.returncode == 1
    line = _one_error_line(res)
    assert str(out) in line and "No space left on device" in line
    blocks = [int(m.group(3)) for m in BLOCK_LINE.finditer(res.stderr)]
    info = probe_video(out, decode=True)
    assert (info["width"], info["height"]) == (128, 64)
    # every block logged (written whole) plays, and the frames of the one whose audio no longer fitted
    assert blocks and sum(blocks) <= info["frames"] <= sum(blocks) + BLOCK_FRAMES


# --------------------------------------------------------------------------- worker faults


def _worker_pid(cli: subprocess.Popen, rank: int) -> int:
    import psutil

    for child in psutil.Process(cli.pid).children(recursive=True):
        cmd = child.cmdline()
        if "parallel.worker" in cmd and cmd[cmd.index("--rank") + 1] == str(rank):
            return child.pid
    raise AssertionError(f"no worker of rank {rank} under the CLI")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "stopped"])
def test_killed_or_stopped_worker_is_one_error_line_naming_the_rank(job, tmp_path, sig):
    """A 2-rank CPU worker group (gloo); rank 1 (the decode rank) is killed or frozen after the first
    block: the CLI ends within 30 s with exactly one `error:` line, last, naming rank 1, no traceback,
    no worker left, and the mp4 plays with the blocks written."""
    import psutil

    out = tmp_path / "video.mp4"
    proc = _popen_cli(*job["args"], "--out", str(out), "--gpus", "cpu,cpu", "--gpu-mode", "tpp")
    lines: list[str] = []
    victim = None
    try:
        for line in proc.stdout:
            lines.append(line)
            if BLOCK_LINE.search(line):
                victim = _worker_pid(proc, 1)
                workers = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
                os.kill(victim, sig)
                t0 = time.monotonic()
                break
        lines += proc.stdout.readlines()
        proc.wait(60)
    finally:
        if victim is not None and sig == signal.SIGSTOP:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGCONT)
        proc.kill()
    text = "".join(lines)
    assert victim is not None, text[-3000:]
    assert time.monotonic() - t0 < 30.0
    assert proc.returncode == 1 and "Traceback" not in text, text[-3000:]
    last = text.strip().splitlines()[-1]
    assert last.startswith("error: rank 1 ") and sum(ln.startswith("error: ") for ln in lines) == 1, text[-3000:]
    assert ("SIGKILL" if sig == signal.SIGKILL else "heartbeat") in last
    assert not [p for p in workers if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    blocks = [int(m.group(3)) for m in BLOCK_LINE.finditer(text)]
    assert probe_video(out, decode=True)["frames"] >= sum(blocks) >= 1


# --------------------------------------------------------------------------- interrupts, out of memory

LOAD_LINE = {"single": "liveavatar.loading", "group": "group of 2 ready"}  # logged while the model loads


@pytest.mark.parametrize("phase", ["load", "generation"])
@pytest.mark.parametrize("placement", ["single", "group"])
def test_ctrl_c_ends_the_job_with_one_line_and_no_process_left(job, tmp_path, placement, phase):
    """Ctrl-C (SIGINT to the CLI's whole process group, as a terminal sends it) while the model loads
    or after the first block: exit 130 within 30 s, `error: interrupted` last and alone, no
    traceback, no process of the job left (`--gpus cpu,cpu`: both workers); interrupted during load
    there is no mp4 at all (nor when the interrupt lands before the first block), during generation
    it plays and holds every logged block."""
    import psutil

    out = tmp_path / "video.mp4"
    extra = ["--gpus", "cpu,cpu", "--gpu-mode", "tpp"] if placement == "group" else []
    # A terminal's foreground job has SIGINT at its default; a test run started in the background by
    # a non-interactive shell inherits it ignored (and Python then keeps ignoring it): restore it.
    proc = subprocess.Popen([sys.executable, "-m", "liveavatar", *job["args"], "--out", str(out), *extra],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: list[str] = []
    family: list[int] = []
    t0 = None
    try:
        for line in proc.stdout:
            lines.append(line)
            if (LOAD_LINE[placement] in line) if phase == "load" else BLOCK_LINE.search(line):
                family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
                os.killpg(proc.pid, signal.SIGINT)
                t0 = time.monotonic()
                break
        lines += proc.stdout.readlines()
        proc.wait(60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    text = "".join(lines)
    assert t0 is not None, text[-3000:]
    assert time.monotonic() - t0 < 30.0
    assert proc.returncode == 130 and "Traceback" not in text, text[-3000:]
    assert text.strip().splitlines()[-1] == "error: interrupted" and text.count("error:") == 1, text[-3000:]
    alive = [p for p in family if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, alive
    if phase == "load":
        assert not out.exists()
    else:
        blocks = [int(m.group(3)) for m in BLOCK_LINE.finditer(text)]
        info = probe_video(out, decode=True)
        assert not info["truncated"] and sum(blocks) <= info["frames"] <= sum(blocks) + BLOCK_FRAMES


def test_the_next_job_after_faults_succeeds(job, tmp_path):
    """After the faults above (same checkpoint, same folders), a plain job writes its whole video."""
    out = tmp_path / "after.mp4"
    write_wav(tmp_path / "short.wav", 0.38)  # 9 frames: one block
    res = run_cli(*job["args"], "--audio", str(tmp_path / "short.wav"), "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    assert probe_video(out, decode=True)["frames"] == 9


def test_out_of_memory_in_the_cli_process_is_one_error_line_with_the_remedy(capsys):
    """The single-device path runs the model in the CLI's own process: an allocation failure there
    (the CPU allocator's real error; CUDA's `torch.OutOfMemoryError`, which a CPU cannot raise for
    real, by its type) is one `error:` line, exit status 1, with what to do about it."""
    import logging

    import torch

    from liveavatar import cli
    from liveavatar.pipeline.memory import OOM_REMEDY

    try:
        torch.empty(2**60, dtype=torch.uint8)
    except RuntimeError as exc:
        cpu = exc
    cuda = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total "
                                  "capacity of 79.11 GiB of which 3.12 GiB is free.\nOf the allocated memory ...")
    try:
        for exc, words in ((cpu, "can't allocate memory"), (cuda, "Tried to allocate 20.00 GiB")):
            assert cli._report_error(exc, verbose=False) == 1
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith(f"error: {type(exc).__name__}: "), err
            assert words in err[0] and err[0].endswith(f"[{OOM_REMEDY}]")
        assert cli._report_error(RuntimeError("a bug"), verbose=False) is None  # a bug keeps its traceback
    finally:
        logging.disable(logging.NOTSET)
