"""The two timed scopes of `python -m bench` (see `bench.cli` for the method).

- `run_dit_scope`: the pipeline's StepRunner (sink prefill, warm-up, timed blocks; CUDA events
  per step), optionally one extra block under torch.profiler (`profile_block`).
- `run_end_to_end`: the pipeline's generate() iterator with a random-weight VAE (decode and
  uint8 frames included; `--write` also encodes an mp4), host clock between yielded blocks.
Both return a dict of raw timings that `bench.cli.bench` turns into the JSON line.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from bench import benchlib
from bench.placement import memory_mark
from bench.random_model import BenchRun, build_random_vae

PROCESS_START = time.perf_counter()


def _cache_plan(model, image, args, decode_here: bool):
    """The job's cache placement, decided as the job will decide it a moment later (no allocation)."""
    from liveavatar.options import CachePolicy
    from liveavatar.pipeline.job import plan_rank_caches

    policy = CachePolicy(getattr(args, "kv_offload_opt", None), getattr(args, "kv_prefetch_opt", None))
    return plan_rank_caches(model, image, args.steps, policy, decode_here)


def _stream_mark(res: dict, dit, key: str) -> None:
    """Layer stream byte counters at this point (`stream_warm_end`, `stream_end`)."""
    stream = getattr(dit, "layer_stream", None)
    if stream is not None:
        res[key] = stream.stats.snapshot()


def over_time_limit(args) -> bool:
    """True once `--time-limit` seconds have passed since this module was imported."""
    limit = getattr(args, "time_limit", None)
    return bool(limit) and time.perf_counter() - PROCESS_START > limit


def run_dit_scope(args, cfg, dit, device, dtype, run: BenchRun) -> dict:
    """Sink prefill + warm-up + timed blocks through the pipeline's StepRunner."""
    from liveavatar.pipeline.conditioning import AudioConditioning, ImageConditioning
    from liveavatar.pipeline.job import make_runner
    from liveavatar.pipeline.model import LiveAvatar, LoadOptions
    from liveavatar.pipeline.plan import block_noise, make_plan
    from liveavatar.pipeline.sampler import BlockInputs
    from liveavatar.media.audio import Audio16k

    s = run.stream
    model = LiveAvatar(dit, None, None, None, LoadOptions(device=device, dtype=dtype, attn=args.attn,
                                                          fp8=args.fp8, compile=args.compile))
    image = ImageConditioning(pixels=torch.zeros(1, 3, 1, run.height, run.width), width=run.width, height=run.height)
    lead = 3
    plan = make_plan((run.total_blocks + run.profile) * s.frames_per_block - lead, s, lead_in_frames=lead)
    audio = AudioConditioning(features=run.features, num_frames=plan.num_frames,
                              audio=Audio16k(torch.zeros(plan.num_frames * 640)), lead_in_frames=lead)
    noise = [block_noise(args.seed, b, run.hw, s).to(device) for b in plan.blocks]
    inputs = [BlockInputs(audio=audio.block_features(b).to(device, dtype)) for b in plan.blocks]
    graphs0 = benchlib.dynamo_graphs()
    res: dict = {"block_ms": [], "step_ms": [], "warm_ms": [], "latents": []}
    res["cache_plan"] = _cache_plan(model, image, args, decode_here=False)
    benchlib.sync(device)
    t_start = time.perf_counter()
    runner = make_runner(model, run.context, image, seed=args.seed, steps=args.steps,
                         kv_offload=getattr(args, "kv_offload_opt", None),
                         kv_prefetch=getattr(args, "kv_prefetch_opt", None) is not False,  # auto: on
                         kv_fp8=getattr(args, "kv_fp8_opt", False))
    runner.prefill(run.ref, run.motion)
    blocks = (_diagonal_blocks if getattr(args, "diagonal", False) else _runner_blocks)(
        args, device, run, runner, plan, noise, inputs, res)
    for b, x, timer, marks in blocks:
        if b == 0:
            res["ttff_s"] = time.perf_counter() - t_start
            res["graphs_after_first"] = benchlib.dynamo_graphs()
            from liveavatar.compile_cache import save_compiled

            res["precompile_save_s"] = save_compiled()  # as RankJob.emit does in the pipeline
        if b < 2:
            res["latents"].append(x.detach().float().cpu())
        total = timer.elapsed_ms(marks[0], marks[-1])
        if b < run.warmup:
            res["warm_ms"].append(total)
            res["graphs_after_warmup"] = benchlib.dynamo_graphs()
            res["warm_end"] = time.perf_counter()
            _stream_mark(res, dit, "stream_warm_end")
        else:
            res["block_ms"].append(total)
            if len(marks) > 2:  # per step (the diagonal has one mark per block)
                res["step_ms"] += [timer.elapsed_ms(marks[i], marks[i + 1]) for i in range(len(marks) - 1)]
        if over_time_limit(args):
            res["truncated"] = f"--time-limit {args.time_limit}s reached after {b + 1} blocks"
            break
    res.setdefault("graphs_after_warmup", graphs0)
    res["warmup_s"] = res.get("warm_end", t_start) - t_start
    res["graphs0"] = graphs0
    res["finite"] = bool(torch.isfinite(x).all())
    _stream_mark(res, dit, "stream_end")
    res["cache_gib"] = runner.cache_bytes() / 2**30
    res["kv_offload"] = runner.kv_offload
    res["kv_prefetch"] = runner.kv_prefetch
    return res


def _runner_blocks(args, device, run: BenchRun, runner, plan, noise, inputs, res):
    """(b, final latents, timer, marks) per block from `StepRunner.run` (a mark per step); one
    extra block under the profiler with --profile (not yielded)."""
    for b, block in enumerate(plan.blocks):
        if b == run.total_blocks:  # one extra block under the profiler (not timed)
            try:
                res["profile"] = profile_block(args, device, lambda: runner.run(noise[b], block, inputs[b]))
            except Exception as exc:  # the timings above stay valid
                res["profile"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            return
        timer = benchlib.Timer(device)
        marks = [timer.mark()]
        x = runner.run(noise[b], block, inputs[b], on_step=lambda _s: marks.append(timer.mark()))
        timer.sync()
        yield b, x, timer, marks


def _diagonal_blocks(args, device, run: BenchRun, runner, plan, noise, inputs, res):
    """--diagonal: (b, final latents, timer, [start, end]) per block from `pipeline.diagonal`
    (one batched pass per tick; in steady state a block leaves every tick)."""
    from liveavatar.pipeline.diagonal import diagonal_blocks

    timer = benchlib.Timer(device)
    prev = timer.mark()
    blocks = plan.blocks[: run.total_blocks]
    for blk, x in diagonal_blocks(runner, blocks, lambda b: noise[b.index], lambda b: inputs[b.index],
                                  sink_refresh=False):
        now = timer.mark()
        timer.sync()
        yield blk.index, x, timer, [prev, now]
        prev = now


def profile_block(args, device: torch.device, fn) -> dict:
    """Run fn() under torch.profiler; write the kernel table and a Chrome trace into args.profile."""
    from torch.profiler import ProfilerActivity, profile

    folder = Path(args.profile)
    folder.mkdir(parents=True, exist_ok=True)
    tag = ("fp8" if args.fp8 else "bf16") + ("_compile" if args.compile else "") + f"_{args.attn}"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        benchlib.sync(device)
    key = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=40)
    (folder / f"profile_{tag}.txt").write_text(table + "\n")
    trace = folder / f"trace_{tag}.json"
    prof.export_chrome_trace(str(trace))
    import gzip
    import shutil

    with open(trace, "rb") as src, gzip.open(str(trace) + ".gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    trace.unlink()
    busy = None
    if device.type == "cuda":
        busy = sum(getattr(e, "self_device_time_total", 0) for e in prof.key_averages()) / 1000.0
    return {"table": str(folder / f"profile_{tag}.txt"), "trace": str(trace) + ".gz", "device_busy_ms": busy}


def run_end_to_end(args, cfg, dit, device, dtype, run: BenchRun) -> dict:
    """The pipeline's generate() iterator with a random VAE; host-clock time between blocks."""
    import tempfile

    from liveavatar.media.audio import Audio16k
    from liveavatar.pipeline.conditioning import AudioConditioning, ImageConditioning, ReferenceLatents
    from liveavatar.pipeline.model import LiveAvatar, LoadOptions

    s = run.stream
    vae = build_random_vae(device, dtype, args.seed, args.tiny)
    if args.compile and device.type == "cuda" and not getattr(args, "no_compile_vae", False):
        vae.compile_decoder()  # as LiveAvatar's loaders do with compile=True
    model = LiveAvatar(dit, vae, None, None, LoadOptions(device=device, dtype=dtype, attn=args.attn,
                                                         fp8=args.fp8, compile=args.compile))
    image = ImageConditioning(pixels=torch.zeros(1, 3, 1, run.height, run.width), width=run.width, height=run.height)
    lead = 3
    n_frames = run.total_blocks * s.frames_per_block - lead
    wave = Audio16k(torch.zeros(n_frames * s.sample_rate // s.fps))
    audio = AudioConditioning(features=run.features, num_frames=n_frames, audio=wave, lead_in_frames=lead)
    writer = None
    if args.write:
        from liveavatar.media.video_writer import VideoWriter

        writer = VideoWriter(Path(tempfile.mkdtemp()) / "bench.mp4", run.width, run.height, fps=s.fps,
                             audio_rate=s.sample_rate)
    graphs0 = benchlib.dynamo_graphs()
    res: dict = {"block_ms": [], "step_ms": [], "warm_ms": [], "latents": []}
    memory_mark("vae_loaded", device)
    res["cache_plan"] = _cache_plan(model, image, args, decode_here=True)  # the re-fit, if any, happens here
    memory_mark("caches_planned", device)
    benchlib.sync(device)
    t_start = t_prev = time.perf_counter()
    from liveavatar.pipeline.generate import OVERLAP_DEFAULT_CUDA

    overlap = True if getattr(args, "overlap", False) else False if getattr(args, "no_overlap", False) else None
    res_overlap = overlap if overlap is not None else (device.type == "cuda" and OVERLAP_DEFAULT_CUDA)
    for blk in model.generate(run.context, audio, image, seed=args.seed, steps=args.steps,
                              kv_offload=getattr(args, "kv_offload_opt", None),
                              kv_prefetch=getattr(args, "kv_prefetch_opt", None),
                              kv_fp8=getattr(args, "kv_fp8_opt", False),
                              reference=ReferenceLatents(ref=run.ref, motion=run.motion), overlap_decode=overlap):
        if writer is not None:
            writer.write_frames(blk.frames)
            writer.write_audio(blk.audio)
        now = time.perf_counter()
        ms = (now - t_prev) * 1000.0
        t_prev = now
        if blk.index == 0:
            res["ttff_s"] = now - t_start
            res["graphs_after_first"] = benchlib.dynamo_graphs()
        if blk.index < run.warmup:
            res["warm_ms"].append(ms)
            res["graphs_after_warmup"] = benchlib.dynamo_graphs()
            res["warm_end"] = now
            _stream_mark(res, dit, "stream_warm_end")
        else:
            res["block_ms"].append(ms)
            res.setdefault("dit_ms", []).append(blk.timings.get("dit", 0.0) * 1000.0)
            res.setdefault("decode_ms", []).append(blk.timings.get("decode", 0.0) * 1000.0)
        if over_time_limit(args):
            res["truncated"] = f"--time-limit {args.time_limit}s reached after {blk.index + 1} blocks"
            break
    if writer is not None:
        writer.close()
    _stream_mark(res, dit, "stream_end")
    res.setdefault("graphs_after_warmup", graphs0)
    res["warmup_s"] = res.get("warm_end", t_start) - t_start
    res["graphs0"] = graphs0
    res["finite"] = True
    res["overlap_decode"] = res_overlap
    return res
