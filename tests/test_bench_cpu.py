"""CPU checks of the speed benchmark plumbing and the fp8 linears (no GPU needed).

- `python -m bench` runs the real StepRunner / generate() on a tiny random DiT and
  prints one JSON line with every result key; usage and fp8-on-CPU errors are clean.
- bench/ref_harness.py imports and runs the reference DiT (local copy, skipped when absent) and
  gives it exactly the weights our benchmark gives our DiT.
- fp8: quantisation error bounds, FP8Linear vs the dequantised float32 product and vs the
  original linear, the reference's exclusion list, refusal on CPU / meta, the tiny DiT in fp8.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from bench import benchlib
from liveavatar.models import fp8 as fp8mod

REPO = Path(__file__).resolve().parents[1]


def _ref_dir() -> Path | None:
    for cand in (REPO / "third_party" / "LiveAvatar", REPO.parent / "ref" / "LiveAvatar"):
        if (cand / "liveavatar" / "models" / "wan" / "causal_model_s2v.py").is_file():
            return cand
    return None


def _run(args: list[str], timeout: int = 300) -> tuple[int, dict | None, str]:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return proc.returncode, (json.loads(lines[-1]) if lines else None), proc.stderr


TINY = ["--random-weights", "--tiny", "--device", "cpu", "--blocks", "1", "--warmup", "1"]


# ----------------------------------------------------------------------------- bench CLI
@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory):
    """One tiny fp32 bench run (shared): its JSON line and the saved latents of 2 blocks."""
    lat = tmp_path_factory.mktemp("bench") / "lat32.pt"
    rc, out, err = _run(["-m", "bench", *TINY, "--save-latents", str(lat)])
    assert rc == 0, err[-2000:]
    return out, lat


def test_bench_tiny_prints_one_json_line_with_all_keys(fp32_run):
    out, lat = fp32_run
    missing = [k for k in benchlib.RESULT_KEYS if k not in out]
    assert not missing, missing
    assert out["scope"] == "dit" and out["steps"] == 4 and out["fp8"] is False and out["compile"] is False
    assert out["size"] == benchlib.TINY_SIZE
    assert out["fps"] > 0 and out["block_ms"] > 0 and 0 < out["step_ms"] <= out["block_ms"]
    assert out["fps"] == pytest.approx(12 / (out["block_ms"] / 1000), rel=1e-3)
    assert isinstance(out["peak_mem_gb"], list) and len(out["peak_mem_gb"]) == 1
    assert out["recompiles"] == 0 and out["output_finite"] is True
    assert len(out["block_ms_all"]) == 2 and out["tflops"] > 0
    saved = torch.load(lat, weights_only=True)
    assert len(saved) == 2 and tuple(saved[0].shape) == (16, 3, 16, 24)


@pytest.mark.slow  # over 4 s on 2 cores: left out of the newcomer test's nested run
def test_fp8_bench_on_cpu_stays_close_to_fp32(fp32_run):
    """The tiny DiT with fp8 linears (CPU _scaled_mm or emulation) vs its fp32 run, same seed."""
    _, lat = fp32_run
    rc, out, err = _run(["-m", "bench", *TINY, "--fp8", "--allow-cpu-fp8", "--compare-latents", str(lat)])
    assert rc == 0, err[-2000:]
    cmp = out["vs_saved_latents"]
    assert cmp["blocks"] == 2 and cmp["psnr_db"] > 35 and cmp["rel_l2"] < 0.06, cmp


@pytest.mark.slow  # over 4 s on 2 cores: left out of the newcomer test's nested run
def test_same_seed_is_bitwise_repeatable_and_profile_is_written(fp32_run, tmp_path):
    """A second run (one extra profiled block, so longer audio) reproduces the first 2 blocks."""
    _, lat = fp32_run
    rc, out, err = _run(["-m", "bench", *TINY, "--compare-latents", str(lat), "--profile", str(tmp_path)])
    assert rc == 0, err[-2000:]
    assert out["vs_saved_latents"]["rel_l2"] == 0.0
    assert Path(out["profile"]["table"]).read_text().count("aten::") > 5
    assert Path(out["profile"]["trace"]).stat().st_size > 1000


@pytest.mark.slow  # over 4 s on 2 cores: left out of the newcomer test's nested run
def test_bench_end_to_end_tiny_decodes_frames():
    rc, out, err = _run(["-m", "bench", *TINY, "--scope", "end_to_end", "--size", "128*64"])
    assert rc == 0, err[-2000:]
    assert out["scope"] == "end_to_end" and out["size"] == "128*64"
    assert out["fps"] > 0 and out["decode_ms"] > 0 and out["dit_ms"] > 0
    assert out["block_ms"] >= out["dit_ms"]


@pytest.mark.slow  # over 4 s on 2 cores: left out of the newcomer test's nested run
def test_bench_usage_and_fp8_errors_are_clean():
    rc, out, err = _run(["-m", "bench", "--tiny", "--device", "cpu"])
    assert rc == 2 and out is None and "error: --random-weights" in err
    rc, out, err = _run(["-m", "liveavatar", "bench", *TINY])  # the library's CLI points at the package
    assert rc == 2 and out is None and "python -m bench --random-weights --tiny" in err
    rc, out, err = _run(["-m", "bench", *TINY, "--fp8"])
    assert rc == 3 and out is not None and "sm89" in out["error"] and out["fps"] is None
    assert all(k in out for k in benchlib.RESULT_KEYS)


def test_table_summarises_runs(tmp_path):
    rows = [{"impl": "reference", "fp8": False, "compile": False, "fps": 5.0, "scope": "dit"},
            {"impl": "ours", "fp8": True, "compile": False, "fps": 10.0, "scope": "dit",
             "vs_saved_latents": {"psnr_db": 40.0}},
            {"impl": "ours", "fp8": False, "compile": False, "error": "out of memory", "scope": "dit"}]
    f = tmp_path / "b.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    proc = subprocess.run([sys.executable, "bench/table.py", str(f)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()
    assert "2.00" in lines[3] and "ref bf16" in lines[3] and "40.0" in lines[3]
    assert "out of memory" in lines[4]


# ----------------------------------------------------------------------------- reference harness
@pytest.fixture(scope="module")
def ref_dir():
    d = _ref_dir()
    if d is None:
        pytest.skip("no local reference copy (bash bench/prepare_ref.sh makes third_party/LiveAvatar)")
    pytest.importorskip("diffusers")
    pytest.importorskip("einops")
    return d


@pytest.mark.slow  # over 4 s on 2 cores: left out of the newcomer test's nested run
def test_ref_harness_tiny_runs_and_prints_json(ref_dir):
    rc, out, err = _run(["bench/ref_harness.py", "--ref-dir", str(ref_dir), "--tiny", "--device", "cpu",
                         "--blocks", "1", "--warmup", "1"])
    assert rc == 0, err[-2000:]
    assert out["impl"] == "reference" and all(k in out for k in benchlib.RESULT_KEYS)
    assert out["fps"] > 0 and out["output_finite"] is True and len(out["block_ms_all"]) == 2


@pytest.mark.slow  # over 4 s on 2 cores: left out of the newcomer test's nested run
def test_reference_gets_exactly_our_random_weights(ref_dir):
    from bench.random_model import bench_config, build_random_dit

    rc, ref_sums, err = _run(["bench/ref_harness.py", "--ref-dir", str(ref_dir), "--tiny", "--device", "cpu",
                              "--weights-checksum"])
    assert rc == 0, err[-2000:]
    args = type("A", (), {"tiny": True})()
    dit, _ = build_random_dit(bench_config(args), torch.device("cpu"), torch.float32, seed=0)
    ours = benchlib.weights_checksum(dit)
    assert sorted(ours) == sorted(ref_sums)
    assert all(ours[k] == ref_sums[k] for k in ours), [k for k in ours if ours[k] != ref_sums[k]][:5]


# ----------------------------------------------------------------------------- FLOP / token counting
def test_sink_tokens_and_flops_match_model_and_floor():
    from liveavatar.config import DiTConfig
    from liveavatar.models.dit import CausalS2VDiT

    with torch.device("meta"):
        dit = CausalS2VDiT(DiTConfig(**{k: tuple(v) if isinstance(v, list) else v
                                        for k, v in benchlib.TINY_CONFIG.items()}))
    for hw in ((48, 88), (16, 24), (8, 16), (90, 160)):
        assert benchlib.sink_tokens(hw) == dit.sink_tokens(hw), hw
    cfg = DiTConfig()
    hw = (48, 88)  # 704*384
    fsl = 24 * 44
    per_block = benchlib.dit_block_flops(cfg, hw, 12 * fsl, benchlib.sink_tokens(hw)) * 4
    per_frame = per_block / 12
    assert 2.8e13 < per_frame < 4.6e13  # spec "Floor": about 3.7e13 FLOPs per frame at 4 steps


def test_random_init_is_deterministic_per_name():
    a = benchlib.random_tensor("blocks.0.ffn.0.weight", (64, 32), torch.device("cpu"), torch.float32, seed=3)
    b = benchlib.random_tensor("blocks.0.ffn.0.weight", (64, 32), torch.device("cpu"), torch.float32, seed=3)
    c = benchlib.random_tensor("blocks.1.ffn.0.weight", (64, 32), torch.device("cpu"), torch.float32, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.std().item() == pytest.approx(1 / 32**0.5, rel=0.15)
    norm = benchlib.random_tensor("blocks.0.norm3.weight", (512,), torch.device("cpu"), torch.float32, seed=3)
    assert norm.mean().item() == pytest.approx(1.0, abs=0.05)


# ----------------------------------------------------------------------------- fp8 math
def test_quantize_per_tensor_error_bounds():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(257, 96, generator=g) * 3.0
    q, inv = fp8mod.quantize_per_tensor(x)
    assert q.dtype == torch.float8_e4m3fn and inv.dtype == torch.float32 and inv.dim() == 0
    assert q.float().abs().max().item() == fp8mod.FP8_MAX  # amax maps onto the top of the range
    assert inv.item() == pytest.approx(x.abs().max().item() / fp8mod.FP8_MAX, rel=1e-6)
    back = fp8mod.dequantize(q, inv)
    big = x.abs() > x.abs().max() / 64  # e4m3 normals: 3 mantissa bits -> relative error <= 2^-4
    assert ((back - x).abs()[big] / x.abs()[big]).max().item() <= 2**-4 + 1e-6
    assert (back - x).abs().max().item() <= x.abs().max().item() * 2**-4
    z, zinv = fp8mod.quantize_per_tensor(torch.zeros(4, 16))
    assert torch.equal(z.float(), torch.zeros(4, 16)) and zinv.item() == pytest.approx(1 / fp8mod.FP8_MAX)


def _linear(i, o, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(i, o)
    lin.weight.data.normal_(0, i**-0.5)
    lin.bias.data.normal_(0, 0.02)
    return lin


@pytest.mark.parametrize("scaling", ["tensor", "row"])
@pytest.mark.parametrize("emulate", [True, False])
def test_fp8_linear_matches_dequantised_product(emulate, scaling):
    if not emulate and not fp8mod._cpu_scaled_mm_works(scaling):
        pytest.skip(f"this PyTorch has no CPU _scaled_mm with {scaling} scales")
    lin = _linear(64, 48)
    layer = fp8mod.FP8Linear.from_linear(lin, emulate=emulate, scaling=scaling)
    assert layer.weight_inv_scale.shape == ((1, 48) if scaling == "row" else ())
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    out = layer(x)
    assert out.shape == (2, 5, 48) and out.dtype == x.dtype
    xq, xinv = fp8mod.quantize(x.reshape(-1, 64), scaling)
    w_inv = layer.weight_inv_scale.reshape(-1, 1) if scaling == "row" else layer.weight_inv_scale
    want = (fp8mod.dequantize(xq, xinv) @ fp8mod.dequantize(layer.weight_fp8, w_inv).t()
            + layer.bias.float()).reshape(2, 5, 48)
    assert torch.allclose(out, want, rtol=1e-2, atol=1e-2)  # bf16 output rounding
    exact = lin(x)
    rel = ((out - exact).norm() / exact.norm()).item()
    assert 0 < rel < 0.08  # two e4m3 quantisations: a few percent, never zero


def test_row_scales_confine_an_outlier_token():
    """One token 1e5x larger than the rest: per-tensor scaling pushes the others into e4m3 subnormals,
    row-wise scaling keeps them (what `--fp8-scaling row` is for)."""
    lin = _linear(64, 32)
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    x[3] *= 1e5
    exact = lin(x)
    errs = {}
    for scaling in fp8mod.SCALINGS:
        out = fp8mod.FP8Linear.from_linear(lin, emulate=True, scaling=scaling)(x)
        others = [i for i in range(16) if i != 3]
        errs[scaling] = ((out[others] - exact[others]).norm() / exact[others].norm()).item()
    assert errs["row"] < 0.08 < errs["tensor"], errs


def test_convert_to_fp8_follows_reference_exclusions():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.text_embedding = nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 32))
            self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(32, 64))
            self.blocks = nn.ModuleList([nn.ModuleDict({"q": nn.Linear(32, 32), "ffn": nn.Sequential(
                nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))})])
            self.head = nn.Module()
            self.head.head = nn.Linear(32, 16)
            self.odd = nn.Linear(32, 10)  # out_features not a multiple of 16

    net = Net()
    before = copy.deepcopy(net)
    with pytest.raises(fp8mod.FP8Unsupported, match="sm89|CUDA"):
        fp8mod.convert_to_fp8(net)  # CPU without allow_cpu: refused, nothing changed
    assert isinstance(net.blocks[0]["q"], nn.Linear)
    with pytest.raises(ValueError, match="scaling"):
        fp8mod.convert_to_fp8(net, allow_cpu=True, scaling="block")
    summary = fp8mod.convert_to_fp8(net, allow_cpu=True, scaling="tensor")
    assert summary["converted"] == 3 and summary["scaling"] == "tensor"
    assert sorted(summary["excluded"]) == ["head.head", "text_embedding.0", "text_embedding.2", "time_projection.1"]
    assert summary["skipped"] == ["odd"]
    assert isinstance(net.blocks[0]["ffn"][0], fp8mod.FP8Linear) and isinstance(net.head.head, nn.Linear)
    assert summary["bytes_after"] * 4 == summary["bytes_before"]  # fp32 -> 1 byte per weight
    x = torch.randn(3, 32)
    y, y0 = net.blocks[0]["q"](x), before.blocks[0]["q"](x)
    assert ((y - y0).norm() / y0.norm()).item() < 0.08
    with torch.device("meta"):
        meta_net = Net()
    with pytest.raises(fp8mod.FP8Unsupported, match="meta"):
        fp8mod.convert_to_fp8(meta_net, allow_cpu=True)
    # the layer set and weight count the memory estimate uses are the ones converted (meta: no memory)
    converted = [n for n, m in net.named_modules() if isinstance(m, fp8mod.FP8Linear)]
    assert fp8mod.fp8_linears(meta_net) == converted == ["blocks.0.q", "blocks.0.ffn.0", "blocks.0.ffn.2"]
    assert fp8mod.fp8_weight_numel(meta_net) == (sum(p.numel() for p in before.parameters()), summary["bytes_after"])



@pytest.mark.slow  # over 4 s on 2 cores: left out of the newcomer test's nested run
def test_bench_streamed_layers_same_latents_and_counted_bytes(fp32_run):
    """The product's path with layer streaming (1 resident block, 1 resident KV layer of 4, 2 copy
    slots each): the
    same latents as the resident run, bit for bit, and per timed block every streamed block and
    paged cache layer copied once per step."""
    _, lat = fp32_run
    rc, out, err = _run(["-m", "bench", *TINY, "--weights", "stream", "--resident-layers", "1,1",
                         "--stream-buffers", "2", "--compare-latents", str(lat)])
    assert rc == 0, err
    assert out["vs_saved_latents"]["psnr_db"] == 999.0 and out["vs_saved_latents"]["rel_l2"] == 0.0
    assert out["weights"] == "stream" and out["resident_layers"] == 1 and out["resident_kv_layers"] == 1
    from bench.random_model import bench_config
    from liveavatar.pipeline.memory import block_bytes, kv_layer_bytes
    from liveavatar.sizes import parse_size

    cfg = bench_config(type("A", (), {"tiny": True})())
    w, h = parse_size(benchlib.TINY_SIZE)
    streamed = 3 * (block_bytes(cfg, torch.float32, False) + kv_layer_bytes(cfg, w, h, torch.float32))
    assert out["h2d_bytes_per_block"] == 4 * streamed
    assert out["copy_gbps"] > 0 and out["estimate_gib"] > 0


@pytest.mark.slow  # over 4 s on 2 cores: left out of the newcomer test's nested run
def test_bench_diagonal_same_latents(fp32_run):
    """--diagonal (one batched pass per tick over the blocks in flight): the sequential run's
    latents up to float32 rounding, with streamed blocks (every cache layer resident)."""
    _, lat = fp32_run
    rc, out, err = _run(["-m", "bench", *TINY, "--diagonal", "--weights", "stream", "--resident-layers", "1,4",
                         "--stream-buffers", "2", "--compare-latents", str(lat)])
    assert rc == 0, err
    assert out["diagonal"] is True and out["vs_saved_latents"]["rel_l2"] < 1e-4
