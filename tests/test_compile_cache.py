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


VAE_SCRIPT = r"""
import json, sys, torch
from liveavatar import compile_cache
from liveavatar.config import VAEConfig
from liveavatar.loading.tiny import draw_state_dict, vae_key_shapes
from liveavatar.models.vae import WanVAE
from torch._dynamo.utils import counters

compile_cache.use_cache_dir(sys.argv[1], precompile=sys.argv[2] == "1")
# a tiny decoder with every kind of layer of the real one (mid attention, shortcut convs, a temporal
# and a spatial upsampler): compiling it on the CPU stays short
cfg = VAEConfig(base_dim=4, dim_mult=(1, 2), num_res_blocks=0, temperal_downsample=(True,))
vae = WanVAE.from_official_state_dict(draw_state_dict(vae_key_shapes(cfg), torch.Generator().manual_seed(0)), cfg)
latents = torch.randn(1, 16, 5, 2, 2, generator=torch.Generator().manual_seed(1))
eager = vae.decode(latents)
vae.compile_decoder()
dec = vae.streaming_decoder()
first = dec.decode(latents[:, :, :3])  # the first block: the first latent frame, then two later ones
graphs_first_block = counters["stats"]["unique_graphs"]
compile_cache.save_compiled()  # as RankJob.emit does at block 1
out = torch.cat([first, dec.decode(latents[:, :, 3:])], dim=2)  # a block of another length
res = {"out": out.flatten().tolist(), "max_diff": (out - eager).abs().max().item(),
       "graphs_first_block": graphs_first_block, "graphs": counters["stats"]["unique_graphs"],
       "recompiles": sum(counters["recompiles"].values()), "graph_breaks": sum(counters["graph_break"].values()),
       "cache": dict(counters["dynamo_cache"])}
if sys.argv[3] == "new_size":  # another frame size in the same process, after saving: compiles, runs
    res["new_size"] = list(vae.streaming_decoder().decode(torch.randn(1, 16, 1, 3, 3)).shape)
print(json.dumps(res))
"""


def _run(cache: Path, precompile: bool, script: str = SCRIPT, *extra: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    out = subprocess.run([sys.executable, "-c", script, str(cache), "1" if precompile else "0", *extra], env=env,
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
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


@pytest.mark.slow
def test_vae_decoder_regions_precompile_and_load_in_a_second_process(tmp_path):
    """The streaming VAE decoder's two frame steps (models/vae_stream.py) are full graphs: compiled
    they give the eager frames, two graphs by the end of the first block and no recompile after;
    a second process loads both from dynamo's precompile cache without tracing them."""
    cache = tmp_path / "compile-cache"
    cold = _run(cache, True, VAE_SCRIPT, "same_size")
    assert cold["max_diff"] < 1e-5  # inductor's fp32 convolutions and reductions; observed 6e-7
    assert cold["graphs_first_block"] == 2 and cold["graphs"] == 2  # first_frame, next_frame
    assert cold["recompiles"] == 0 and cold["graph_breaks"] == 0
    assert cold["cache"] == {"dynamo_cache_miss": 2}
    warm = _run(cache, True, VAE_SCRIPT, "new_size")
    assert warm["cache"] == {"dynamo_cache_hit": 2}
    assert warm["graphs_first_block"] == 0 and warm["recompiles"] == 0  # nothing traced: both loaded
    assert warm["out"] == cold["out"]
    assert warm["new_size"] == [1, 3, 1, 6, 6]  # a new size after saving traces, in the same mode
