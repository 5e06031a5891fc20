"""Quality of fp8 KV caches: final block latents with fp8 vs bf16 caches, full-size random weights.

The same random DiT (seeded, `bench.random_model`), the same conditioning and noise, run through
the pipeline's `StepRunner` (sink prefill, 4 steps per block, the Rolling Sink refresh at clip 1,
the ring wrapping after the first clip) twice: caches in the model dtype, then fp8 caches
(`CachePolicy.fp8`). Per block: PSNR of the final latents (peak = max |bf16 latent| of the block),
relative RMS error and cosine similarity; the summary takes the worst block and all blocks pooled.
The error accumulates through the caches, so later blocks are the ones to read.

Run (one H200, about 2 minutes each; appends one JSON line each), bf16 weights, then fp8 weights:
    python -m bench.fp8_kv_quality --blocks 8 --size 704*384 \\
        --out bench/results/$(date -u +%F)_h200_fp8_kv_quality.jsonl
    python -m bench.fp8_kv_quality --blocks 8 --size 704*384 --fp8 \\
        --out bench/results/$(date -u +%F)_h200_fp8_kv_quality.jsonl
CPU smoke run: python -m bench.fp8_kv_quality --tiny --device cpu --blocks 2 --out /tmp/q.jsonl
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch

from bench import benchlib


def block_metrics(ref: torch.Tensor, test: torch.Tensor) -> dict:
    """PSNR (dB, peak = max |ref|), relative RMS error and cosine of two latents of one shape."""
    ref, test = ref.double().flatten(), test.double().flatten()
    mse = (ref - test).pow(2).mean().item()
    peak = ref.abs().max().item()
    return {"psnr_db": math.inf if mse == 0 else 10 * math.log10(peak ** 2 / mse),
            "rel_rmse": math.sqrt(mse / max(ref.pow(2).mean().item(), 1e-30)),
            "cosine": torch.nn.functional.cosine_similarity(ref, test, dim=0).item()}


def final_latents(dit, run, args, device: torch.device, dtype: torch.dtype, kv_fp8: bool) -> tuple[list, dict]:
    """Final latents [16, 3, h, w] (float32, CPU) of every block, and the runner's cache bytes."""
    from liveavatar.media.audio import Audio16k
    from liveavatar.pipeline.conditioning import AudioConditioning, ImageConditioning
    from liveavatar.pipeline.job import make_runner
    from liveavatar.pipeline.model import LiveAvatar, LoadOptions
    from liveavatar.pipeline.plan import block_noise, make_plan
    from liveavatar.pipeline.sampler import BlockInputs

    s = run.stream
    model = LiveAvatar(dit, None, None, None, LoadOptions(device=device, dtype=dtype, attn=args.attn))
    image = ImageConditioning(pixels=torch.zeros(1, 3, 1, run.height, run.width), width=run.width, height=run.height)
    lead = 3
    plan = make_plan(args.blocks * s.frames_per_block - lead, s, lead_in_frames=lead)
    audio = AudioConditioning(features=run.features, num_frames=plan.num_frames,
                              audio=Audio16k(torch.zeros(plan.num_frames * 640)), lead_in_frames=lead)
    runner = make_runner(model, run.context, image, seed=args.seed, steps=args.steps, kv_fp8=kv_fp8)
    runner.prefill(run.ref, run.motion)
    out, t0 = [], time.perf_counter()
    for block in plan.blocks:
        if block.index == s.blocks_per_clip:  # clip 1: the Rolling Sink re-anchors on block 0
            runner.prefill(out[0][:, 0:1].unsqueeze(0), run.motion)
        x = runner.run(block_noise(args.seed, block, run.hw, s), block,
                       BlockInputs(audio=audio.block_features(block)))
        out.append(x.float().cpu())
    benchlib.sync(device)
    info = {"cache_bytes": runner.cache_bytes(), "cache_gib": round(runner.cache_bytes() / 2 ** 30, 3), "seconds": round(time.perf_counter() - t0, 2),
            "kv_offload": runner.kv_offload}
    del runner
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out, info


def main(argv: list[str] | None = None) -> int:
    from bench.random_model import BenchRun, bench_config, build_random_dit

    p = argparse.ArgumentParser(prog="python -m bench.fp8_kv_quality", description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=8, help="blocks generated (>= 8: two clips, the ring wraps)")
    p.add_argument("--size", default="704*384")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--fp8", action="store_true", help="fp8 linear weights too (the 24/48 GB configuration)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="the tiny bench config (CPU smoke runs)")
    p.add_argument("--out", required=True, help="JSON lines file to append to")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16
    cfg = bench_config(args)
    args.warmup, args.scope = 0, "dit"
    run = BenchRun(args, cfg, device, dtype)
    t0 = time.perf_counter()
    dit, _ = build_random_dit(cfg, device, dtype, args.seed)
    if args.fp8:
        from liveavatar.pipeline.speed import apply_speed_options

        apply_speed_options(dit, attn=args.attn, fp8=True, device=device)
    build_s = time.perf_counter() - t0
    ref, ref_info = final_latents(dit, run, args, device, dtype, kv_fp8=False)
    test, test_info = final_latents(dit, run, args, device, dtype, kv_fp8=True)
    per_block = [block_metrics(a, b) for a, b in zip(ref, test)]
    pooled = block_metrics(torch.stack(ref), torch.stack(test))
    row = {
        "bench": "fp8_kv_quality", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m bench.fp8_kv_quality " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "device": benchlib.device_name(device), "torch": torch.__version__,
        "size": f"{run.width}*{run.height}", "blocks": args.blocks, "steps": args.steps, "seed": args.seed,
        "weights": f"random {'fp8 linears' if args.fp8 else 'bf16'} ({'tiny config' if args.tiny else 'full size'})",
        "kv_bf16": ref_info, "kv_fp8": test_info,
        "cache_bytes_ratio": round(test_info["cache_bytes"] / ref_info["cache_bytes"], 4),
        "psnr_db_per_block": [round(m["psnr_db"], 2) for m in per_block],
        "rel_rmse_per_block": [round(m["rel_rmse"], 5) for m in per_block],
        "cosine_per_block": [round(m["cosine"], 6) for m in per_block],
        "psnr_db_min": round(min(m["psnr_db"] for m in per_block), 2),
        "psnr_db_pooled": round(pooled["psnr_db"], 2), "rel_rmse_pooled": round(pooled["rel_rmse"], 5),
        "finite": all(bool(torch.isfinite(x).all()) for x in test), "build_s": round(build_s, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
