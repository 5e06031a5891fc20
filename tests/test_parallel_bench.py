"""Worker-group benchmark (`python -m bench --devices cpu,cpu,cpu`): real worker
subprocesses over gloo running the TPP schedule with the bench's random tiny weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCH = [sys.executable, "-m", "bench", "--random-weights", "--tiny"]


def _run(*extra: str, timeout: float = 300) -> tuple[int, dict | None, str]:
    proc = subprocess.run(BENCH + list(extra), cwd=REPO, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return proc.returncode, (json.loads(lines[-1]) if lines else None), proc.stderr


@pytest.mark.slow
def test_tpp_group_bench_on_cpu_ranks():
    code, out, err = _run("--devices", "cpu,cpu,cpu", "--blocks", "1", "--warmup", "1")
    assert code == 0, err[-2000:]
    assert out["schedule"] == "tpp" and out["num_ranks"] == 3 and out["num_gpus"] == 0
    assert out["status"] == "ok" and out["blocks"] == 2 and out["timed_blocks"] == 1
    assert out["scope"] == "end_to_end" and out["fps"] > 0 and out["block_ms"] > 0 and out["ttff_s"] > 0
    assert len(out["peak_mem_gb"]) == 3 and len(out["step_ms_per_rank"]) == 3
    stats = out["rank_stats"]
    assert sorted(stats) == ["0", "1", "2"]
    assert all(stats[r]["blocks"] == 2 for r in stats)
    # 3 ranks, 4 steps: the last DiT rank also decodes (no spare device)
    assert stats["2"]["decode_s"] > 0 and stats["0"]["decode_s"] == 0 and stats["1"]["decode_s"] == 0
    assert "rank 2: steps [3] + decode" in out["schedule_detail"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_group_bench_without_gpus_names_the_fix():
    code, out, _ = _run("--gpus", "2", "--blocks", "1", "--warmup", "1", timeout=120)
    assert code == 3 and "--devices cpu" in out["error"]


def test_group_bench_refuses_reference_options():
    code, out, err = _run("--devices", "cpu,cpu", "--ref", "third_party/LiveAvatar", timeout=120)
    assert code == 2 and out is None and "--gpus/--devices" in err
