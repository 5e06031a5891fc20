"""`python -m bench` (from the repo root): speed of the streaming DiT (or the whole loop) with random weights.

    python -m bench --random-weights --size 704*384 --steps 4 --blocks 8 \
        [--fp8] [--compile] [--attn sdpa] [--scope dit|end_to_end [--overlap|--no-overlap]] [--ref third_party/LiveAvatar]
    python -m bench --random-weights --tiny --device cpu      # CPU plumbing check
    python -m bench --random-weights --gpus 5 [--gpu-mode tpp] [--fp8] [--compile]   # worker group

Prints ONE JSON line (keys: `benchlib.RESULT_KEYS` and more). Method:
- The DiT is built on the meta device and every weight is created directly on the GPU from a
  generator seeded by (seed, parameter name) (`benchlib.materialize_random_`): full 14B shapes
  and FLOPs, no checkpoint, no CPU copy. The reference harness gives the reference DiT the
  very same values.
- scope `dit`: the real `StepRunner` (all step caches resident, one shared sink), sink prefill,
  then `--warmup` blocks (default one clip = 4, so the timed blocks see the full KV window), then
  `--blocks` timed blocks. CUDA events around every step; block_ms/step_ms are medians over the
  timed blocks; fps = 12 video frames / block time.
- scope `end_to_end`: the real `generate()` iterator (runner + streaming VAE decode with a
  random-weight VAE + uint8 frames on the CPU, `--write` also encodes an mp4), timed between
  yielded blocks with the host clock.
- ttff_s: from the start of generation (prefill included, compile included) to the first block.
  compile_s: warm-up wall time beyond `warmup * block_ms`. recompiles: torch.compile graphs
  made after the first block (recompiles_timed: during the timed blocks; must be 0).
- tflops: model FLOPs (`benchlib.dit_block_flops`, steady-state window) per second of block
  time; mfu: tflops over a bf16 8192^3 matmul measured in the same process.
- `--ref DIR` runs bench/ref_harness.py (the reference DiT, same weights/size/steps, fp8 and
  compile as ours unless `--ref-mode bf16`) in a subprocess after ours and adds ref_fps and
  ratio_vs_reference = fps / ref_fps. `--ref-json FILE` reads a stored harness line instead.
- memory, the product's way (bench/placement.py): `--memory-cap-gb X` leaves X GiB free on the
  device (filler tensor + allocator cap: the preflight sees the smaller card); the weight
  placement (`--weights auto|stream|resident`, `memory.place_layers`) and the loading preflight
  run before the random DiT is built part by part (fp8 per block, streamed blocks packed into
  pinned host memory), so a run that cannot fit ends with the preflight's message (rc 3).
  estimate_gib (the memory estimate of the job as placed) is printed beside peak_gib (the
  filler left out); with streaming: h2d_bytes_per_block, copy_gbps, projected_fps_pcie4.
- `--gpus N` (N > 1) or `--devices 0,1,..|cpu,cpu,..`: a worker group (bench/group.py): every
  rank builds the same random weights, the TPP schedule runs as in generation (K = min(N, steps)
  DiT ranks, a spare device decodes), timed end to end by the arrival of decoded blocks here;
  peak_mem_gb per rank, per-rank compute / wait shares in `rank_stats`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

from bench import benchlib
from bench.random_model import BenchRun, BenchUsageError, apply_options, bench_config, build_random_dit
from bench.placement import (TRACE, cap_device_memory, job_estimate, memory_mark, placement_fields, preflight,
                             stream_fields)
from liveavatar.options import WEIGHTS_MODES
from bench.scopes import run_dit_scope, run_end_to_end
from liveavatar.cli import AUTO_ON_OFF, auto_on_off
from liveavatar.options import DEFAULT_KV_DTYPE, KV_DTYPES, resolve_kv_dtype

REPO = Path(__file__).resolve().parents[1]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--random-weights", action="store_true", help="full-size random weights (required for now)")
    p.add_argument("--size", default="704*384", help="video W*H")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--blocks", type=int, default=6, help="timed blocks (12 frames each)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up blocks (default: one clip)")
    p.add_argument("--fp8", action="store_true")
    p.add_argument("--fp8-scaling", default=None, choices=("row", "tensor"),
                   help="with --fp8: activation/weight scales (default: the library's, tensor)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--cuda-graphs", dest="cuda_graphs", action="store_true", default=None,
                   help="with --compile: replay steady-state calls from CUDA graphs (default: the library's)")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false")
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None, choices=("bf16", "fp16", "fp32"), help="default bf16 (fp32 on CPU)")
    p.add_argument("--scope", default="dit", choices=("dit", "end_to_end"))
    p.add_argument("--gpus", type=int, default=1,
                   help="GPUs: > 1 benchmarks a worker group (bench/group.py; TPP by default)")
    p.add_argument("--devices", default=None,
                   help="worker-group devices instead of --gpus, e.g. 0,1,2 or cpu,cpu,cpu (gloo, tests)")
    p.add_argument("--gpu-mode", default=None, choices=("tpp", "single"),
                   help="worker-group schedule (default: tpp for 2+ devices; a 5th device decodes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="tiny DiT config and size (CPU tests)")
    p.add_argument("--write", action="store_true", help="end_to_end: also encode an mp4 (needs PyAV)")
    p.add_argument("--overlap", action="store_true",
                   help="end_to_end: overlap each block's decode with the next DiT block (CUDA only)")
    p.add_argument("--kv-offload", choices=AUTO_ON_OFF, default="auto",
                   help="step KV caches in host RAM, one on the GPU at a time (default: only if they do not fit)")
    p.add_argument("--kv-prefetch", choices=AUTO_ON_OFF, nargs="?", const="on", default="auto",
                   help="with KV offload: a second GPU buffer, the next step's page-in overlaps compute "
                        "(auto: as the pipeline, whenever it fits; scope dit: on)")
    p.add_argument("--kv-dtype", choices=KV_DTYPES, default=DEFAULT_KV_DTYPE,
                   help="KV cache storage: bf16 (the model dtype) or fp8 (per token-head scales, about half the bytes)")
    p.add_argument("--no-compile-vae", action="store_true",
                   help="end_to_end with --compile: keep the VAE decoder eager (default: compiled, as the pipeline)")
    p.add_argument("--no-overlap", action="store_true",
                   help="end_to_end: serial decode after each block's DiT (forced; default: the library's)")
    p.add_argument("--ref", default=None, metavar="DIR", help="time the reference DiT from this local copy too")
    p.add_argument("--ref-mode", default="same", choices=("same", "bf16"),
                   help="reference options: same fp8/compile as ours, or plain bf16 eager")
    p.add_argument("--ref-json", default=None, help="stored reference harness JSON line (instead of --ref)")
    p.add_argument("--peak-tflops", type=float, default=None, help="skip the matmul peak measurement")
    p.add_argument("--save-latents", default=None, help="save the final latents of the first 2 blocks")
    p.add_argument("--compare-latents", default=None, help="PSNR of our first 2 blocks vs this saved file")
    p.add_argument("--json-out", default=None, help="also append the JSON line to this file")
    p.add_argument("--time-limit", type=float, metavar="S",
                   default=float(os.environ.get("LIVEAVATAR_BENCH_TIME_LIMIT", 0)) or None,
                   help="stop after the block that passes S seconds since start and report what was measured "
                        "(default: $LIVEAVATAR_BENCH_TIME_LIMIT)")
    p.add_argument("--rope-dtype", default=None, choices=("float64", "float32"),
                   help="RoPE rotation dtype of our DiT (default: the DiT's, float64 as the reference)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="scope dit: profile one extra block; kernel table + Chrome trace into DIR")
    p.add_argument("--memory-cap-gb", type=float, default=None, metavar="X",
                   help="emulate a card with X GiB free: occupy the rest of the device memory and cap the process")
    p.add_argument("--weights", default="auto", choices=WEIGHTS_MODES,
                   help="DiT blocks resident on the device, streamed per layer from pinned host memory, or "
                        "auto (resident when the weights and every step cache fit, else streaming)")
    p.add_argument("--resident-layers", default=None, metavar="W[,KV]",
                   help="with streaming: force W resident blocks (and KV resident layers) instead of the fit")
    p.add_argument("--stream-buffers", type=int, default=3,
                   help="device slots per streamed kind (prefetch depth + 1)")
    p.add_argument("--diagonal", action="store_true",
                   help="scope dit: the TPP diagonal, one batched pass per tick (step caches resident)")
    p.add_argument("--allow-cpu-fp8", action="store_true",
                   help="tests only: fp8 linears on the CPU (PyTorch's CPU _scaled_mm or an emulation)")
    return p


# ----------------------------------------------------------------------------- reporting
def latents_psnr(ours: list[torch.Tensor], ref_path: str) -> dict:
    """PSNR (dB, peak = value range of the stored latents) and relative L2 over the first blocks."""
    stored = torch.load(ref_path, weights_only=True)
    a = torch.cat([t.flatten() for t in ours[: len(stored)]])
    b = torch.cat([t.flatten() for t in stored[: len(ours)]])
    mse = float(((a - b) ** 2).mean())
    rng = float(b.max() - b.min())
    psnr = float("inf") if mse == 0 else 10.0 * math.log10(rng * rng / mse)
    rel = float((a - b).norm() / b.norm().clamp(min=1e-12))
    return {"psnr_db": psnr if math.isfinite(psnr) else 999.0, "rel_l2": rel, "blocks": len(stored)}


def run_reference(args, peak: float | None) -> dict:
    """bench/ref_harness.py in a subprocess; returns its JSON line as a dict."""
    cmd = [sys.executable, str(REPO / "bench" / "ref_harness.py"), "--ref-dir", args.ref,
           "--size", args.size, "--steps", str(args.steps), "--blocks", str(args.blocks),
           "--seed", str(args.seed), "--device", args.device]
    if args.warmup is not None:
        cmd += ["--warmup", str(args.warmup)]
    if args.tiny:
        cmd.append("--tiny")
    if args.ref_mode == "same":
        cmd += ["--fp8"] if args.fp8 else []  # the reference's own fp8 scheme (per-tensor)
        cmd += ["--compile"] if args.compile else []
    if peak:
        cmd += ["--peak-tflops", str(peak)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(REPO))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"reference harness failed (exit {proc.returncode}): " + " | ".join(tail))
    return json.loads(lines[-1])


def resolve(args) -> tuple[torch.device, torch.dtype]:
    from liveavatar.pipeline.model import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype or ("bf16" if device.type == "cuda" else "fp32"))
    return device, dtype


def _precompile_state() -> dict:
    """Where torch.compile's caches were and what dynamo's precompile cache did (hits / misses)."""
    from liveavatar import compile_cache

    try:
        from torch._dynamo.utils import counters
        hits = dict(counters["dynamo_cache"])
    except Exception:  # pragma: no cover
        hits = {}
    return {**compile_cache.state(), **hits}


def bench(args) -> dict:
    """Run the benchmark described by `args`; returns the result dict (JSON-ready)."""
    if not args.random_weights:
        raise BenchUsageError("--random-weights: the benchmark runs on full-size random weights; add --random-weights")
    if args.gpus != 1 or args.devices:
        if args.ref or args.ref_json or args.save_latents or args.compare_latents:
            raise BenchUsageError("--gpus/--devices: the worker-group bench times end to end only "
                                  "(no --ref, --save-latents, --compare-latents)")
        from bench.group import run_group_bench  # the CLI's --gpus does the same (worker groups)

        return run_group_bench(args, getattr(args, "argv", []))
    if args.blocks < 1 or args.steps < 1:
        raise BenchUsageError("--blocks and --steps must be >= 1")
    device, dtype = resolve(args)
    cfg = bench_config(args)
    from liveavatar.options import precision_from_flags
    from liveavatar.pipeline.speed import fp8_scaling_for

    scaling = precision_from_flags("bf16", args.fp8, args.fp8_scaling).fp8
    if scaling and not (device.type == "cpu" and args.allow_cpu_fp8):
        fp8_scaling_for(scaling, device)  # before anything is built (sm89+)
    peak = args.peak_tflops
    if peak is None and device.type == "cuda":
        peak = benchlib.matmul_peak_tflops(device)
    filler = cap_device_memory(device, args.memory_cap_gb) if args.memory_cap_gb else 0
    memory_mark("capped", device)
    run = BenchRun(args, cfg, device, dtype)
    residency = preflight(args, cfg, run.width, run.height, device, dtype, bool(scaling))
    placed = placement_fields(cfg, residency, run.width, run.height, args, dtype, bool(scaling))
    memory_mark("placed", device, **placed)
    benchlib.reset_peak_mem(device)
    dit, winfo = build_random_dit(cfg, device, dtype, args.seed, fp8=scaling, allow_cpu_fp8=args.allow_cpu_fp8,
                                  residency=residency)
    memory_mark("dit_loaded", device)
    opt = apply_options(dit, args, device)
    with torch.no_grad():
        res = (run_dit_scope if args.scope == "dit" else run_end_to_end)(args, cfg, dit, device, dtype, run)
    peak_mem = benchlib.peak_mem_gib(device) - filler / 2**30

    from_warmup = not res["block_ms"]
    if from_warmup and not res["warm_ms"]:
        raise RuntimeError(res.get("truncated") or "no block finished")
    blk = benchlib.median(res["block_ms"]) if res["block_ms"] else res["warm_ms"][-1]
    s = run.stream
    fsl = (run.hw[0] // 2) * (run.hw[1] // 2)
    ring = s.latent_frames_per_clip * fsl
    flops = benchlib.dit_block_flops(cfg, run.hw, ring, benchlib.sink_tokens(run.hw),
                                     frames=s.frames_per_block_latent) * args.steps
    tflops = flops / (blk / 1000.0) / 1e12
    out = {
        "impl": "ours",
        "device": benchlib.device_name(device), "torch": torch.__version__, "num_gpus": benchlib.num_gpus(),
        "schedule": "single", "size": f"{run.width}*{run.height}", "steps": args.steps,
        "fp8": args.fp8, "fp8_scaling": opt["fp8_scaling"], "compile": args.compile,
        "compile_vae": args.scope == "end_to_end" and args.compile and device.type == "cuda" and not args.no_compile_vae,
        "attn": args.attn,
        "scope": args.scope,
        "fps": s.frames_per_block / (blk / 1000.0),
        "ttff_s": res.get("ttff_s"), "block_ms": blk,
        "step_ms": benchlib.median(res["step_ms"]) if res["step_ms"] else blk / args.steps,
        "peak_mem_gb": [peak_mem], "tflops": tflops, "mfu": (tflops / peak) if peak else None,
        "matmul_peak_tflops": peak,
        "compile_s": max(0.0, res["warmup_s"] - run.warmup * blk / 1000.0),
        "warmup_s": res["warmup_s"],
        "recompiles": benchlib.dynamo_graphs() - res.get("graphs_after_first", res["graphs0"]),
        "recompiles_timed": benchlib.dynamo_graphs() - res["graphs_after_warmup"],
        "graphs": benchlib.dynamo_graphs() - res["graphs0"],
        "compile_phases_s": benchlib.compile_phases(),
        "precompile": _precompile_state(),
        "cuda_graphs": getattr(dit, "cuda_graphs", None) is not None,
        "graph_captures": getattr(getattr(dit, "cuda_graphs", None), "captures", 0),
        "graph_replays": getattr(getattr(dit, "cuda_graphs", None), "replays", 0),
        "compile_impl": opt["compile_impl"], "fp8_convert_s": opt["fp8_convert_s"], "rope_dtype": opt["rope_dtype"],
        "warmup_blocks": run.warmup, "timed_blocks": args.blocks, "block_ms_all": res["warm_ms"] + res["block_ms"],
        "weights_gib": winfo["bytes"] / 2**30, "weights_init_s": winfo["seconds"],
        "flops_per_block": flops, "output_finite": res["finite"], "tiny": args.tiny, "seed": args.seed,
        "dtype": str(dtype).replace("torch.", ""), "diagonal": bool(getattr(args, "diagonal", False)),
    }
    if "profile" in res:
        out["profile"] = res["profile"]
    if res.get("truncated"):
        out["truncated"] = res["truncated"]
        out["fps_from_last_warmup_block"] = from_warmup
    if "cache_gib" in res:
        out["cache_gib"] = res["cache_gib"]
    out["kv_offload"] = res.get("kv_offload", getattr(args, "kv_offload_opt", None))
    out["kv_prefetch"] = res.get("kv_prefetch")
    out["kv_dtype"] = getattr(args, "kv_dtype", DEFAULT_KV_DTYPE)
    if "decode_ms" in res:
        out["dit_ms"] = benchlib.median(res["dit_ms"])
        out["decode_ms"] = benchlib.median(res["decode_ms"])
    if "overlap_decode" in res:
        out["overlap_decode"] = res["overlap_decode"]
    out["est_mem_gb"] = _estimate(cfg, run, args, dtype)
    out["memory_cap_gb"] = args.memory_cap_gb
    out["alloc_conf"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or None  # None: PyTorch's default segments
    out["weights"] = args.weights
    out["peak_gib"] = peak_mem
    out["estimate_gib"] = job_estimate(cfg, dit, run.width, run.height, args, dtype, bool(scaling),
                                       res.get("cache_plan"))
    out["estimate_vs_peak"] = out["estimate_gib"] / peak_mem if peak_mem > 0 and device.type == "cuda" else None
    stream = dit.layer_stream
    res["resident_kv_layers"] = stream.attached_kv if stream is not None else None
    out.update(stream_fields(dit, res, args.blocks, blk, s.frames_per_block))
    out.update(placed, demoted_layers=placed["resident_layers_placed"] - out["resident_layers"], memory_trace=TRACE)
    if args.save_latents and res["latents"]:
        torch.save(res["latents"], args.save_latents)
    if args.compare_latents and res["latents"]:
        out["vs_saved_latents"] = latents_psnr(res["latents"], args.compare_latents)
    del dit, res
    if device.type == "cuda":
        torch.cuda.empty_cache()
    ref = None
    try:
        if args.ref_json:
            lines = [ln for ln in Path(args.ref_json).read_text().splitlines() if ln.strip().startswith("{")]
            ref = json.loads(lines[-1])
        elif args.ref:
            ref = run_reference(args, peak)
    except (OSError, IndexError, json.JSONDecodeError, RuntimeError) as exc:  # keep our own numbers
        out["ref_error"] = f"{type(exc).__name__}: {exc}"[:300]
    if ref is not None and ref.get("error"):
        out["ref_error"] = ref["error"]
    if ref is not None:
        out["ref_fps"] = ref.get("fps")
        out["ratio_vs_reference"] = out["fps"] / ref["fps"] if ref.get("fps") else None
        out["ref"] = {k: ref.get(k) for k in ("fps", "block_ms", "step_ms", "peak_mem_gb", "fp8", "compile",
                                              "attn", "compile_s", "recompiles", "ttff_s", "device")}
    return benchlib.rounded(out)


def _estimate(cfg, run: BenchRun, args, dtype) -> float | None:
    """The lead's memory preflight estimate for this job (GiB), for comparison with the peak."""
    from liveavatar.pipeline.memory import estimate_memory

    try:
        est = estimate_memory(cfg, run.width, run.height, steps_owned=args.steps, dtype=dtype, fp8=args.fp8,
                              decode_here=args.scope == "end_to_end", kv_fp8=args.kv_fp8_opt)
        return est.total / 2**30
    except Exception:
        return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # a worker-group bench hands the same command line to every rank
    args.kv_offload_opt = auto_on_off(args.kv_offload)
    args.kv_prefetch_opt = auto_on_off(args.kv_prefetch)
    args.kv_fp8_opt = resolve_kv_dtype(args.kv_dtype)
    try:
        result = bench(args)
        code = 0
    except torch.cuda.OutOfMemoryError as exc:  # still one JSON line, so a device script keeps going
        result = failure_record(args, "out of memory: " + str(exc).splitlines()[0])
        code = 3
    except BenchUsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except MemoryError as exc:  # the preflight: nothing fits (numbers and remedies)
        result = failure_record(args, f"preflight: {exc}")
        code = 3
    except (ValueError, RuntimeError) as exc:
        result = failure_record(args, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        code = 3
    line = json.dumps(result)
    print(line, flush=True)
    if args.json_out:
        with open(args.json_out, "a") as fh:
            fh.write(line + "\n")
    return code


def failure_record(args, error: str) -> dict:
    """The JSON line of a run that failed (all result keys present, measurements null)."""
    device = torch.device("cuda" if torch.cuda.is_available() and args.device in ("auto", "cuda") else "cpu")
    out = {k: None for k in benchlib.RESULT_KEYS}
    out.update(impl="ours", error=error, device=benchlib.device_name(device), torch=torch.__version__,
               num_gpus=benchlib.num_gpus(), schedule="tpp" if (args.gpus > 1 or args.devices) else "single",
               size=args.size, steps=args.steps, fp8=args.fp8,
               compile=args.compile, attn=args.attn, scope=args.scope,
               peak_mem_gb=[benchlib.peak_mem_gib(device)], tiny=args.tiny,
               memory_cap_gb=getattr(args, "memory_cap_gb", None), weights=getattr(args, "weights", None),
               memory_trace=TRACE)
    return benchlib.rounded(out)
