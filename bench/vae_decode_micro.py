"""Micro-benchmark: streaming VAE decode of one block (3 latent frames -> 12 video frames).

Random-weight Wan2.1 VAE (real shapes) on CUDA, 704*384 by default. Variants: as the pipeline
runs it (bf16), + cudnn.benchmark, + torch.compile of the decoder.
Each variant: 2 warm-up blocks, then the median of 4 timed blocks (CUDA events). Optional
--profile prints the top kernels of one baseline block. One JSON line per variant.
    python -m bench.vae_decode_micro [--size 704*384] [--profile]     # from the repo root
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bench import benchlib
from liveavatar.config import VAEConfig
from liveavatar.models.vae import WanVAE, build_autoencoder
from liveavatar.sizes import parse_size


def build(device, dtype):
    cfg = VAEConfig()
    model = build_autoencoder(cfg)
    benchlib.materialize_random_(model, device, dtype, seed=7)
    return WanVAE(model, cfg, device=device, dtype=dtype)


def time_blocks(vae, h, w, warm=2, timed=4):
    dec = vae.streaming_decoder()
    g = torch.Generator(device="cpu").manual_seed(0)
    lat = [torch.randn(1, 16, 3, h, w, generator=g).cuda() for _ in range(warm + timed)]
    ms = []
    t0 = time.perf_counter()
    for i, z in enumerate(lat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        out = dec.decode(z)
        b.record(); b.synchronize()
        if i >= warm:
            ms.append(a.elapsed_time(b))
        if i == warm - 1:
            first_s = time.perf_counter() - t0
    return sorted(ms)[len(ms) // 2], first_s, tuple(out.shape)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="704*384")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--variants", default="base,compile")
    args = p.parse_args()
    w, h = parse_size(args.size)
    lh, lw = h // 8, w // 8
    device = torch.device("cuda")
    vae = build(device, torch.bfloat16)
    for name in args.variants.split(","):
        if name == "benchmark":
            torch.backends.cudnn.benchmark = True
        if name == "compile":
            vae.model.decoder = torch.compile(vae.model.decoder, dynamic=False)
        try:
            blk, first_s, shape = time_blocks(vae, lh, lw)
            print(json.dumps({"variant": name, "block_ms": blk, "frames_per_s": 12 / (blk / 1000),
                              "warmup_s": first_s, "out": shape,
                              "peak_gib": torch.cuda.max_memory_allocated() / 2**30}), flush=True)
        except Exception as exc:
            print(json.dumps({"variant": name, "error": f"{type(exc).__name__}: {exc}"[:400]}), flush=True)
        if name == "base" and args.profile:
            dec = vae.streaming_decoder()
            z = torch.randn(1, 16, 3, lh, lw, device=device)
            dec.decode(z)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                                    torch.profiler.ProfilerActivity.CPU]) as prof:
                dec.decode(z)
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60))


if __name__ == "__main__":
    main()
