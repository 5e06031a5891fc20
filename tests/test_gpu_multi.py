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
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_support import gpu_pids, inprocess_blocks, max_pixel_difference, tiny_job, wait_gone_from_gpu  # noqa: E402
DEVICES = [f"cuda:{i}" for i in range(min(N, 5))]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_job(tmp_path_factory.mktemp("ckpt"), 2.5)  # 2 clips


def test_tpp_on_gpus_equals_one_gpu(tiny):
    from parallel import open_worker_group

    ckpt, audio, img = tiny
    want = inprocess_blocks(ckpt, audio, img, seed=4)
    group = open_worker_group("checkpoint", DEVICES, mode="tpp", ckpt_dir=str(ckpt), dtype="fp32")
    try:
        got = list(group.generate(group.encode_prompt("hi"), group.encode_audio(audio),
                                  group.prepare_image(img, "128*64"), seed=4))
    finally:
        group.close()
    assert [b.index for b in got] == [b.index for b in want]
    worst = max_pixel_difference(got, want)
    print(f"TPP on {len(DEVICES)} GPUs vs one GPU: max pixel difference {worst}")
    assert worst <= 1


def test_killed_worker_is_reported_and_nothing_is_left(tiny):
    from parallel import GroupConfig, WorkerGroup, schedule
    from parallel.engine import make_job
    from parallel.faults import WorkerError

    ckpt, _, img = tiny
    from liveavatar.media.audio import audio_from_waveform

    t = torch.arange(16000 * 30) / 16000
    long_audio = audio_from_waveform((0.3 * torch.sin(2 * math.pi * 200 * t))[None], 16000)
    sched = schedule.tpp(4, min(len(DEVICES), 4), separate_decode=len(DEVICES) > 4, devices=DEVICES)
    cfg = GroupConfig(sched, "parallel.engine:LiveAvatarEngine", {"ckpt_dir": str(ckpt), "dtype": "fp32"},
                      pg_timeout_s=60.0)
    before = gpu_pids()
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
    assert not wait_gone_from_gpu(workers - before, 30), "worker processes keep GPU memory after a rank died"


def test_group_bench_on_gpus():
    res = subprocess.run([sys.executable, "-m", "bench", "--random-weights", "--tiny",
                          "--gpus", str(len(DEVICES)), "--blocks", "2", "--warmup", "4"],
                         capture_output=True, text=True, cwd=REPO, timeout=600)
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("{")][-1]
    out = json.loads(line)
    print(json.dumps({k: out.get(k) for k in ("schedule_detail", "fps", "block_ms", "peak_mem_gb")}))
    assert res.returncode == 0 and out["status"] == "ok" and out["num_gpus"] == len(DEVICES)
    assert all(isinstance(m, float) and m > 0 for m in out["peak_mem_gb"])
