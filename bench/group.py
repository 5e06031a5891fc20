"""Worker-group benchmark: `python -m bench --random-weights --gpus N [--gpu-mode tpp]`.

Starts a worker group (NCCL on GPUs, gloo on CPU with `--devices cpu,cpu,...`) whose ranks run
`bench.group_engine.RandomWeightsEngine`: the bench's seeded random weights on every rank, the
real TPP schedule (each DiT rank owns a step group, a spare device decodes) and the real frame
path back to this process. Timing is what a user sees: the host clock between decoded blocks
arriving here (scope `end_to_end`: DiT, hand-offs, VAE decode, uint8 frames through the control
channel). Per-rank compute / wait shares and peak GPU memory come from the ranks' job stats.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench import benchlib
from bench.random_model import BenchRun, bench_config
from parallel.group import GroupConfig, WorkerGroup
from parallel.handle import schedule_for


def group_devices(args: argparse.Namespace) -> list[str]:
    """`--devices 0,1,cpu` style list, or the first `--gpus` CUDA devices."""
    if args.devices:
        out = []
        for d in (x.strip() for x in args.devices.split(",") if x.strip()):
            out.append(f"cuda:{d}" if d.isdigit() else d)
        return out
    if not torch.cuda.is_available():
        raise ValueError(f"--gpus {args.gpus}: no CUDA GPU here; for a CPU (gloo) group pass --devices cpu,cpu,...")
    if args.gpus > torch.cuda.device_count():
        raise ValueError(f"--gpus {args.gpus}: only {torch.cuda.device_count()} GPUs are visible")
    return [f"cuda:{i}" for i in range(args.gpus)]


def run_group_bench(args: argparse.Namespace, argv: list[str]) -> dict:
    """Benchmark a worker group; returns the JSON-ready result dict (keys of `benchlib.RESULT_KEYS`)."""
    devices = group_devices(args)
    mode = args.gpu_mode or ("tpp" if len(devices) > 1 else "single")
    if mode == "auto":
        raise ValueError("--gpu-mode: pass tpp or single for a benchmark (auto depends on free memory)")
    sched = schedule_for(mode, devices, args.steps, None)
    cfg = bench_config(args)
    run = BenchRun(args, cfg, torch.device("cpu"), torch.float32)  # only sizes and block counts are used here
    config = GroupConfig(schedule=sched, engine="bench.group_engine:RandomWeightsEngine",
                         engine_config={"bench_argv": list(argv)}, load_timeout_s=1800.0)
    t0 = time.perf_counter()
    arrivals: list[float] = []
    with WorkerGroup(config) as group:  # entering starts the ranks and loads the engine
        load_s = time.perf_counter() - t0
        handle = group.submit({})
        t_submit = time.perf_counter()
        for _ in handle.frames():
            arrivals.append(time.perf_counter())
        result = handle.result
    gaps = [(b - a) * 1000.0 for a, b in zip([t_submit] + arrivals, arrivals)]
    timed = gaps[run.warmup:] or gaps[-1:]
    block_ms = statistics.median(timed) if timed else None
    s = run.stream
    fsl = (run.hw[0] // 2) * (run.hw[1] // 2)
    flops = benchlib.dit_block_flops(cfg, run.hw, s.latent_frames_per_clip * fsl, benchlib.sink_tokens(run.hw),
                                     frames=s.frames_per_block_latent) * args.steps
    tflops = flops / (block_ms / 1000.0) / 1e12 if block_ms else None
    ranks = sorted(result.stats) if result else []
    stats = {r: result.stats[r] for r in ranks}
    dit_ranks = [r for r in ranks if r < sched.num_dit_ranks]
    step_ms = []  # per DiT rank: median compute of a timed block / steps it owns
    for r in dit_ranks:
        owned = len(sched.role(r).steps) or 1
        per_block = stats[r].get("block_compute_s") or []
        timed_blocks = per_block[run.warmup:] or per_block[-1:]
        if timed_blocks:
            step_ms.append(statistics.median(timed_blocks) * 1000.0 / owned)
    out = {
        "impl": "ours",
        "device": benchlib.device_name(torch.device(devices[0])) if devices[0].startswith("cuda") else "cpu",
        "torch": torch.__version__, "num_gpus": sum(d.startswith("cuda") for d in devices),
        "num_ranks": len(devices), "schedule": sched.kind, "schedule_detail": sched.describe(),
        "size": f"{run.width}*{run.height}", "steps": args.steps, "fp8": args.fp8, "compile": args.compile,
        "attn": args.attn, "scope": "end_to_end",
        "fps": s.frames_per_block / (block_ms / 1000.0) if block_ms else None,
        "ttff_s": gaps[0] / 1000.0 if gaps else None, "block_ms": block_ms,
        "step_ms": statistics.median(step_ms) if step_ms else None, "step_ms_per_rank": step_ms,
        "peak_mem_gb": [stats[r].get("extra", {}).get("peak_mem_gib") for r in ranks],
        "tflops": tflops,
        "mfu": (tflops / (args.peak_tflops * sched.num_dit_ranks)) if tflops and args.peak_tflops else None,
        "compile_s": max(0.0, sum(gaps[:run.warmup]) / 1000.0 - run.warmup * block_ms / 1000.0)
        if block_ms and run.warmup else None,
        "recompiles": None,  # compiled in the worker processes; see their logs
        "load_s": load_s, "status": result.status if result else None,
        "blocks": len(arrivals), "warmup_blocks": run.warmup, "timed_blocks": len(gaps) - run.warmup,
        "block_ms_all": gaps, "flops_per_block": flops, "tiny": args.tiny, "seed": args.seed,
        "rank_stats": {str(r): {k: stats[r].get(k) for k in ("compute_s", "decode_s", "recv_wait_s",
                                                              "send_wait_s", "wait_share", "wall_s", "blocks")}
                       for r in ranks},
    }
    return benchlib.rounded(out)


__all__ = ["group_devices", "run_group_bench"]
