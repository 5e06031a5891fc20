"""Layer-sharded ranks, each capped, on one GPU vs one rank: `python -m bench.sharded`.

    python -m bench.sharded --ranks 5 --cap-gib 22 --size 704*384 --fp8 --blocks 8 \
        --json-out bench/results/$(date -u +%F)_h200_sharded_5x22.jsonl
    python -m bench.sharded --tiny --devices cpu --ranks 3       # CPU plumbing check (gloo)

Two worker groups run the same job, one after the other, on the same device, with the bench's
full-size seeded random weights (`bench.group_engine.RandomWeightsEngine`; each slice builds only
its layers): (1) one rank holding the whole DiT (uncapped: the reference frames), (2) `--ranks`
DiT ranks of schedule "layers" on that one GPU (`shared_devices`: gloo for everything), each
process capped with `torch.cuda.set_per_process_memory_fraction` at `--cap-gib`. The frames of
every block are hashed (sha256 of the uint8 frames in order): `frames_equal` says whether the
sharded group gave the very frames of one rank. Per rank: the estimate of `pipeline.memory`
(its layers, all steps' caches, the sink slot the preflight takes when it fits, the decoder on the
last slice) and the measured peak (`torch.cuda.max_memory_allocated` since the process started).
Several ranks on one GPU prove the memory, not the speed (they share one GPU's compute).
Prints one JSON line; `--json-out` appends it to a file.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import sys
import time
from typing import Any, Mapping

import torch

from bench.group_engine import RandomWeightsEngine
from parallel.schedule import Role

GIB = 2 ** 30


class CappedEngine(RandomWeightsEngine):
    """`RandomWeightsEngine` in a process capped at `memory_cap_gib` of its GPU (engine config)."""

    def load(self, config: Mapping[str, Any], role: Role) -> None:
        cap = config.get("memory_cap_gib")
        if cap and role.device.startswith("cuda"):
            dev = torch.device(role.device)
            total = torch.cuda.get_device_properties(dev).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap * GIB / total), dev)
        super().load(config, role)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.sharded", description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, default=5, help="layer slices (DiT ranks), all on one device")
    p.add_argument("--cap-gib", type=float, default=22.0, help="memory cap of each sharded rank (GiB)")
    p.add_argument("--devices", default="cuda:0", help="the one device (cuda:0, or cpu with --tiny)")
    p.add_argument("--size", default="704*384")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--blocks", type=int, default=8, help="blocks (8 = 2 clips: the sink refresh runs too)")
    p.add_argument("--fp8", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="tiny DiT (CPU plumbing check)")
    p.add_argument("--skip-single", action="store_true", help="only the sharded group (no reference)")
    p.add_argument("--json-out", default=None)
    return p.parse_args(argv)


def _run(sched: Any, bench_argv: list[str], cap: float | None, frames: list) -> dict:
    """One group, one job: frames hash, blocks, per-rank stats, seconds (load, job); the uint8
    frames of every block are appended to `frames`."""
    from parallel.group import GroupConfig, WorkerGroup
    from parallel.stall import StallLimit

    config = GroupConfig(schedule=sched, engine="bench.sharded:CappedEngine",
                         engine_config={"bench_argv": bench_argv, "memory_cap_gib": cap},
                         load_timeout_s=900.0, stall=StallLimit(first_block_s=900.0))
    digest, blocks, t0 = hashlib.sha256(), 0, time.perf_counter()
    with WorkerGroup(config) as group:
        load_s = time.perf_counter() - t0
        handle = group.submit({})
        t1 = time.perf_counter()
        for bf in handle.frames():
            digest.update(bf.frames.frames.contiguous().numpy().tobytes())
            frames.append(bf.frames.frames)
            blocks += 1
        result = handle.result
    stats = result.stats if result else {}
    return {"hash": digest.hexdigest(), "blocks": blocks, "status": result.status if result else None,
            "load_s": round(load_s, 1), "job_s": round(time.perf_counter() - t1, 1),
            "peak_gib": [stats.get(r, {}).get("extra", {}).get("peak_mem_gib") for r in sorted(stats)]}


def _estimates(cfg: Any, width: int, height: int, steps: int, fp8: bool, ranks: int) -> list[dict]:
    """pipeline.memory's estimate of each rank (GiB): whole model (ranks == 1) or its slice."""
    from liveavatar.pipeline.memory import estimate_memory
    from parallel.schedule import split_layers

    slices = [None] if ranks == 1 else list(split_layers(cfg.num_layers, ranks))
    out = []
    for k, layers in enumerate(slices):
        est = estimate_memory(cfg, width, height, steps_owned=steps, dtype=torch.bfloat16, fp8=fp8,
                              decode_here=k == len(slices) - 1, layers=layers, sink_slot=True)
        out.append({"layers": [0, cfg.num_layers] if layers is None else [layers.start, layers.stop],
                    "estimate_gib": round(est.total / GIB, 2), "parts": est.table()})
    return out


def main(argv: list[str] | None = None) -> int:
    from bench import benchlib
    from bench.random_model import bench_config
    from liveavatar.sizes import parse_size
    from parallel import schedule

    args = _parse(argv)
    dev = args.devices
    gpu = dev.startswith("cuda")
    bench_argv = ["--random-weights", "--size", args.size, "--steps", str(args.steps), "--blocks", str(args.blocks),
                  "--warmup", "0", "--seed", str(args.seed)] + (["--fp8"] if args.fp8 else []) + \
                 (["--tiny"] if args.tiny else []) + ([] if gpu else ["--dtype", "fp32"])
    cfg = bench_config(argparse.Namespace(tiny=args.tiny))
    size = benchlib.TINY_SIZE if args.tiny and args.size == "704*384" else args.size
    width, height = parse_size(size)
    sharded_sched = schedule.layers(args.steps, args.ranks, devices=[dev] * args.ranks, num_layers=cfg.num_layers,
                                    shared_devices=True)
    row: dict[str, Any] = {
        "command": "python -m bench.sharded " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": benchlib.device_name(torch.device(dev)) if gpu else "cpu", "torch": torch.__version__,
        "size": f"{width}*{height}", "steps": args.steps, "fp8": args.fp8, "blocks": args.blocks,
        "num_ranks": args.ranks, "schedule": sharded_sched.kind, "schedule_detail": sharded_sched.describe(),
        "memory_cap_gb": args.cap_gib, "random_weights": True, "tiny": args.tiny,
    }
    single, want, got = None, [], []
    if not args.skip_single:
        single = _run(schedule.single(args.steps, dev), bench_argv, None, want)
        single["ranks"] = _estimates(cfg, width, height, args.steps, args.fp8, 1)
        single["ranks"][0]["peak_gib"] = single.pop("peak_gib")[0]
    sharded = _run(sharded_sched, bench_argv, args.cap_gib if gpu else None, got)
    sharded["ranks"] = _estimates(cfg, width, height, args.steps, args.fp8, args.ranks)
    for r, peak in zip(sharded["ranks"], sharded.pop("peak_gib")):
        r["peak_gib"] = None if peak is None else round(peak, 2)
        r["peak_over_estimate"] = None if peak is None else round(peak / r["estimate_gib"], 3)
        r["fits_cap"] = None if peak is None else peak <= args.cap_gib
    row.update(single=single, sharded=sharded,
               frames_equal=None if single is None else single["hash"] == sharded["hash"] and single["blocks"] > 0)
    if single is not None and not row["frames_equal"] and len(want) == len(got) and want:
        diff = [(a.float() - b.float()).abs() for a, b in zip(want, got)]
        mse = sum(float((d ** 2).mean()) for d in diff) / len(diff)
        row["frames_max_abs_diff"] = max(float(d.max()) for d in diff)
        row["frames_psnr_db"] = None if mse == 0 else round(10 * math.log10(255.0 ** 2 / mse), 2)
    line = json.dumps(row)
    print(line, flush=True)
    if args.json_out:
        with open(args.json_out, "a") as fh:
            fh.write(line + "\n")
    ok = sharded["status"] == "ok" and (single is None or row["frames_equal"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
