"""Worker groups over NCCL on several GPUs (skipped with fewer than 2; run on a multi-GPU device):

- TPP over all visible GPUs (decode on a spare GPU when there are more than 4) gives the frames of
  one in-process GPU (same GPU model, fp32, same kernels);
- a worker killed mid-job: the controller gets a WorkerError naming the rank, and no process
  keeps GPU memory afterwards (no NCCL hang);
- the worker-group benchmark runs end to end and reports per-rank peak memory.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

N = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = pytest.mark.skipif(N < 2, reason="needs 2+ CUDA GPUs")
REPO = Path(__file__).resolve().parents[1]
DEVICES = [f"cuda:{i}" for i in range(min(N, 5))]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from liveavatar.loading.tiny import make_tiny_checkpoint
    from liveavatar.media.audio import audio_from_waveform
    from PIL import Image

    ckpt = make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=1)
    t = torch.arange(int(2.5 * 16000)) / 16000
    audio = audio_from_waveform((0.3 * torch.sin(2 * math.pi * 200 * t))[None], 16000)  # 2 clips
    return ckpt, audio, Image.new("RGB", (128, 64), (170, 120, 100))


def _gpu_pids() -> set[int]:
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout
    return {int(x) for x in out.split() if x.strip().isdigit()}


def test_tpp_on_gpus_equals_one_gpu(tiny):
    from liveavatar.pipeline import LiveAvatar
    from parallel import open_worker_group

    ckpt, audio, img = tiny
    local = LiveAvatar.from_checkpoint(ckpt, device="cuda:0", dtype="fp32")
    want = list(local.generate(local.encode_prompt("hi"), local.encode_audio(audio),
                               local.prepare_image(img, "128*64"), seed=4))
    del local
    torch.cuda.empty_cache()
    group = open_worker_group("checkpoint", DEVICES, mode="tpp", ckpt_dir=str(ckpt), dtype="fp32")
    try:
        got = list(group.generate(group.encode_prompt("hi"), group.encode_audio(audio),
                                  group.prepare_image(img, "128*64"), seed=4))
    finally:
        group.close()
    assert [b.index for b in got] == [b.index for b in want]
    worst = max(int((g.frames.int() - w.frames.int()).abs().max()) for g, w in zip(got, want))
    print(f"TPP on {len(DEVICES)} GPUs vs one GPU: max pixel difference {worst}")
    assert worst <= 1


def test_killed_worker_is_reported_and_nothing_is_left(tiny):
    from parallel import GroupConfig, WorkerGroup, schedule
    from parallel.engine import make_job
    from parallel.group import WorkerError

    ckpt, _, img = tiny
    from liveavatar.media.audio import audio_from_waveform

    t = torch.arange(16000 * 30) / 16000
    long_audio = audio_from_waveform((0.3 * torch.sin(2 * math.pi * 200 * t))[None], 16000)
    sched = schedule.tpp(4, min(len(DEVICES), 4), separate_decode=len(DEVICES) > 4, devices=DEVICES)
    cfg = GroupConfig(sched, "parallel.engine:LiveAvatarEngine", {"ckpt_dir": str(ckpt), "dtype": "fp32"},
                      pg_timeout_s=60.0)
    before = _gpu_pids()
    group = WorkerGroup(cfg).start()
    try:
        workers = set(group.pids.values())
        handle = group.submit(make_job(img, long_audio, "hi", size="128*64", seed=1))
        t0 = time.time()
        with pytest.raises(WorkerError) as err:
            for i, _ in enumerate(handle.frames()):
                if i == 1:
                    os.kill(group.pids[1], signal.SIGKILL)
        print(f"error after {time.time() - t0:.1f} s: {err.value}")
        assert err.value.rank == 1 and "SIGKILL" in str(err.value)
        assert time.time() - t0 < 60, "the controller waited for the NCCL timeout instead of the dead rank"
    finally:
        group.close()
    deadline = time.time() + 30
    while (_gpu_pids() - before) & workers and time.time() < deadline:
        time.sleep(0.5)
    assert not ((_gpu_pids() - before) & workers), "worker processes keep GPU memory after a rank died"


def test_group_bench_on_gpus():
    res = subprocess.run([sys.executable, "-m", "liveavatar", "bench", "--random-weights", "--tiny",
                          "--gpus", str(len(DEVICES)), "--blocks", "2", "--warmup", "4"],
                         capture_output=True, text=True, cwd=REPO, timeout=600)
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("{")][-1]
    out = json.loads(line)
    print(json.dumps({k: out.get(k) for k in ("schedule_detail", "fps", "block_ms", "peak_mem_gb")}))
    assert res.returncode == 0 and out["status"] == "ok" and out["num_gpus"] == len(DEVICES)
    assert all(isinstance(m, float) and m > 0 for m in out["peak_mem_gb"])
