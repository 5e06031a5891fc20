"""fp8 KV caches (`CachePolicy.fp8`, `--kv-dtype fp8`): storage, bookkeeping, estimate, frames.

Rows are stored as float8_e4m3fn with one power-of-two bf16 scale per (token, head), packed into
`head_dim + 2` bytes (liveavatar/models/kv_cache.py). On the tiny checkpoint the frames of fp8
caches are compared with those of full-precision caches (PSNR printed and bounded); the full-size
measurement is bench/fp8_kv_quality.py (GPU).
"""

from __future__ import annotations

import math

import pytest
import torch

from liveavatar.config import DiTConfig
from liveavatar.models.kv_cache import kv_row_width, pack_rows, unpack_rows
from tiny_support import job_fixture, model_fixture  # noqa: F401 (the module's `model` and `job` fixtures)
from liveavatar.pipeline.memory import _kv_bytes_per_token, estimate_memory, host_cache_bytes


def psnr(a: torch.Tensor, b: torch.Tensor, peak: float) -> float:
    mse = (a.double() - b.double()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(peak ** 2 / mse)


def test_rows_round_trip_within_the_e4m3_step():
    """pack/unpack: every value within half an e4m3 step (2^-4 relative) of its row's scale grid,
    rows of very different magnitudes each keep their precision, zeros stay zeros."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 50, 4, 16, generator=g) * torch.logspace(-6, 4, 50).view(1, 50, 1, 1)
    x[0, 3] = 0
    packed = pack_rows(x, torch.uint8)
    assert packed.dtype == torch.uint8 and packed.shape == (1, 50, 4, kv_row_width(16, True)) == (1, 50, 4, 18)
    back = unpack_rows(packed, torch.float32)
    assert torch.equal(back[0, 3], torch.zeros(4, 16))
    amax = x.abs().amax(-1, keepdim=True)
    # e4m3: 3 mantissa bits -> relative rounding error <= 2^-4 for normals; tiny values relative to
    # the row's max land in subnormals (absolute error <= amax * 2^-9 / 448 * 448 ... bounded by amax/2^8)
    err = (back - x).abs()
    assert (err <= torch.maximum(x.abs() * 2 ** -4, amax * 2 ** -8)).all()
    assert torch.equal(unpack_rows(pack_rows(x, torch.float32), torch.float32), x)  # plain storage: a cast


def test_fp8_caches_halve_the_bytes_and_the_estimate_follows():
    """Step, sink and working-buffer storage of fp8 caches: (head_dim + 2) / (2 head_dim) of bf16
    (0.508 for the 14B's head_dim 128); the memory estimate and the host bytes count the same."""
    ckpt_cfg = DiTConfig(dim=64, ffn_dim=128, freq_dim=32, num_heads=4, num_layers=2, text_len=512, audio_dim=32,
                         audio_inject_layers=(0, 1), text_dim=32, audio_num_layers=3)
    from liveavatar.models.dit import CausalS2VDiT

    with torch.device("meta"):
        dit = CausalS2VDiT(ckpt_cfg)
    hw = (16, 24)
    for make in (lambda **k: dit.new_step_cache(hw, device="cpu", dtype=torch.bfloat16, **k),
                 lambda **k: dit.new_sink_cache(hw, device="cpu", dtype=torch.bfloat16, **k),
                 lambda **k: dit.new_working_buffer(hw, device="cpu", dtype=torch.bfloat16, **k)):
        bf16, fp8 = make(), make(fp8=True)
        assert fp8.nbytes * 2 * 16 == bf16.nbytes * 18  # head_dim 16: 18 bytes per head-row vs 32
    step = dit.new_step_cache(hw, device="cpu", dtype=torch.bfloat16, fp8=True)
    assert step.nbytes == host_cache_bytes(ckpt_cfg, hw[1] * 8, hw[0] * 8, 1, torch.bfloat16, kv_fp8=True)
    big = DiTConfig()
    assert _kv_bytes_per_token(big, torch.bfloat16, kv_fp8=True) / _kv_bytes_per_token(big, torch.bfloat16) == 130 / 256
    a, b = (estimate_memory(big, 704, 384, param_counts=(0, 0), kv_fp8=f) for f in (False, True))
    assert b.step_caches / a.step_caches == b.sink_cache / a.sink_cache == 130 / 256
    assert (a.weights, a.text_state) == (b.weights, b.text_state)
    from liveavatar.config import DEFAULT_STREAM
    from liveavatar.models.tokens import clip_tokens, sink_tokens

    rows = clip_tokens((48, 88), big.patch_size, DEFAULT_STREAM) + sink_tokens((48, 88), big.patch_size, DEFAULT_STREAM)
    assert b.working - a.working == 2 * rows * big.dim * 2  # one layer's rows dequantized for attention


def _frames(model, job, blocks: int = 2, **kw) -> torch.Tensor:
    """The frames of the first `blocks` blocks (the 5-block run is the runner test's)."""
    import itertools

    gen = model.generate(job["ctx"], job["aud"], job["img"], reference=job["ref"], seed=3, **kw)
    return torch.cat([b.frames for b in itertools.islice(gen, blocks)])


def test_fp8_runner_keeps_ring_and_sink_positions(model, job):
    """Block by block (5 blocks: the ring wraps, the sink is refilled at clip 1), the fp8 runner's
    caches have the same fill levels, sink positions and slot bookkeeping as the full-precision one,
    at about half the bytes; the latents stay close."""
    from liveavatar.pipeline.job import make_runner
    from liveavatar.pipeline.plan import make_plan
    from liveavatar.pipeline.sampler import BlockInputs

    runners = [make_runner(model, job["ctx"], job["img"], seed=3, steps=4, kv_fp8=f) for f in (False, True)]
    plain, fp8 = runners
    assert fp8.kv_fp8 and not plain.kv_fp8
    assert fp8.cache_bytes() * 64 == plain.cache_bytes() * 18  # fp32 model, head_dim 16: 18 of 64 bytes
    for r in runners:
        r.prefill(job["ref"].ref, job["ref"].motion)
    plan = make_plan(job["aud"].num_frames, model.stream, lead_in_frames=3)
    for block in plan.blocks:
        if block.index == 4:  # clip 1: the rolling sink refresh (same anchor for both)
            for r in runners:
                r.prefill(xs[0][:, 0:1].unsqueeze(0), job["ref"].motion)
        inputs = BlockInputs(audio=job["aud"].block_features(block))
        noise = torch.randn(16, 3, *job["img"].latent_hw, generator=torch.Generator().manual_seed(block.index))
        xs = [r.run(noise, block, inputs) for r in runners]
        assert plain.sink.length == fp8.sink.length and torch.equal(plain.sink.positions, fp8.sink.positions)
        for s in range(4):
            a, b = plain.caches[s], fp8.caches[s]
            assert (a.length, a.ring, a.sink_slot) == (b.length, b.ring, b.sink_slot)
            assert (a._sink_key, a._sink_val) == (b._sink_key, b._sink_val) or a.sink_slot == 0
        assert psnr(xs[1], xs[0], peak=float(xs[0].abs().max())) > 25


def test_fp8_kv_frames_close_to_full_precision_and_offload_exact(model, job):
    """The tiny checkpoint's frames with fp8 caches vs full-precision caches: PSNR reported, at least
    30 dB; with fp8 the KV offload (paging packed rows) gives bitwise the resident fp8 frames."""
    ref = _frames(model, job)
    fp8 = _frames(model, job, kv_fp8=True)
    value = psnr(fp8.float(), ref.float(), peak=255.0)
    print(f"tiny checkpoint, 2 blocks, 64x64: fp8 KV vs fp32 KV frames PSNR {value:.2f} dB")
    assert fp8.shape == ref.shape and not torch.equal(fp8, ref)
    assert value > 30
    assert torch.equal(_frames(model, job, kv_fp8=True, kv_offload=True), fp8)


def test_kv_dtype_option():
    from liveavatar.options import CachePolicy, resolve_kv_dtype

    assert CachePolicy.from_choices("auto", "auto", "fp8") == CachePolicy(None, None, True)
    assert CachePolicy.from_choices() == CachePolicy(None, None, False)
    assert resolve_kv_dtype("bf16") is False
    with pytest.raises(ValueError, match="kv_dtype: 'fp16'"):
        resolve_kv_dtype("fp16")


@pytest.mark.slow  # over 4 s on 2 cores: left out of the newcomer test's nested run
def test_quality_bench_script_appends_a_json_line(tmp_path):
    """bench/fp8_kv_quality.py (the GPU measurement) on the tiny config on CPU: one JSON line with
    the per-block PSNR, the cache bytes ratio and the command/device/date fields."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "q.jsonl"
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "bench.fp8_kv_quality", "--tiny", "--device", "cpu", "--blocks", "1",
                    "--size", "128*64", "--out", str(out)], cwd=root, check=True, capture_output=True, timeout=600)
    row = json.loads(out.read_text().splitlines()[-1])
    assert row["bench"] == "fp8_kv_quality" and row["device"].startswith("cpu") and row["date"] and row["command"]
    assert len(row["psnr_db_per_block"]) == 1 and row["psnr_db_min"] > 30 and row["finite"]
    assert 0.5 < row["cache_bytes_ratio"] < 0.6  # tiny head_dim 32: 34 of 64 bytes
