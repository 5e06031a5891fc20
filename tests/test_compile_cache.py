"""torch.compile caches: a second process starts warm from `liveavatar.compile_cache` (issue 16).

Real torch.compile (inductor on the CPU, C++ codegen) in two fresh processes sharing one folder:
the first compiles and writes dynamo's precompile cache, the second loads it (a dynamo cache hit,
no tracing) and computes the same numbers. A folder of compiled artifacts holds pickles, so it is
created private to the user.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, sys, torch
from liveavatar import compile_cache

compile_cache.use_cache_dir(sys.argv[1], precompile=sys.argv[2] == "1")

def region(scale):  # a closure over a constant, as the DiT's fused regions are
    def body(x, w):
        return torch.tanh(x @ w) * scale
    return body

with compile_cache.precompile_scope():  # as FusedLayers creates and first calls its regions
    fn = torch.compile(region(0.5), fullgraph=True, dynamic=False)
g = torch.Generator().manual_seed(0)
x, w = torch.randn(4, 8, generator=g), torch.randn(8, 8, generator=g)
with compile_cache.precompile_scope():
    y = fn(x, w)
compile_cache.save_compiled()
assert not compile_cache.recording()
from torch._dynamo.utils import counters
print(json.dumps({"y": y.tolist(), "cache": dict(counters["dynamo_cache"]), "state": compile_cache.state()}))
"""


def _run(cache: Path, precompile: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(cache), "1" if precompile else "0"], env=env,
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_second_process_loads_the_precompiled_region(tmp_path):
    cache = tmp_path / "compile-cache"
    first = _run(cache, precompile=True)
    assert first["cache"] == {"dynamo_cache_miss": 1}
    assert first["state"] == {"dir": str(cache), "precompile": True, "saved": True}
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    assert any((cache / "dynamo").iterdir())  # the traced graph and its guards are on disk
    second = _run(cache, precompile=True)
    assert second["cache"] == {"dynamo_cache_hit": 1}
    assert second["y"] == first["y"]


@pytest.mark.slow
def test_precompile_off_writes_no_dynamo_cache(tmp_path):
    cache = tmp_path / "compile-cache"
    got = _run(cache, precompile=False)
    assert got["cache"] == {}
    assert got["state"]["saved"] is False
    assert not (cache / "dynamo").exists()
    assert (cache / "fxgraph").is_dir()  # inductor's own cache went to the chosen folder
