"""Command line: `python -m liveavatar {generate,make-tiny-checkpoint,demo} ...`.

User errors (bad size, missing file, wrong checkpoint...) exit with status 2 and one line
`error: <cause>` on stderr, before any model is loaded.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("liveavatar")

REPO = Path(__file__).resolve().parents[1]
DEMO_IMAGE = REPO / "assets" / "avatar.png"
DEMO_AUDIO = REPO / "assets" / "speech.wav"
DEMO_PROMPT = "A friendly cartoon person talking to the camera, plain background."
from liveavatar.options import DEFAULT_FP8_SCALING, FP8_SCALINGS, GPU_MODES, WEIGHTS_MODES
from liveavatar.options import ATTENTION_BACKENDS, AUTO_ON_OFF, auto_on_off  # noqa: F401 (bench)
from liveavatar.options import DEFAULT_KV_DTYPE, KV_DTYPES
from liveavatar.options import LORA_STRENGTH_RANGE, SEED_MAX, lora_strength, seed
from liveavatar.sizes import DEFAULT_MODE as DEFAULT_SIZE_MODE
from liveavatar.sizes import MODES as SIZE_MODES


def _option(check):
    """argparse type from an `options` check (ValueError "name: problem" -> one argparse error line)."""
    def parse(text: str):
        try:
            return check(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc).partition(": ")[2] or str(exc)) from None
    parse.__name__ = check.__name__
    return parse


class UserError(Exception):
    """An input problem the user can fix; printed as one line."""


def _user_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [UserError, FileNotFoundError, ValueError, IsADirectoryError,
                                         NotADirectoryError, PermissionError]
    return tuple(types)


def _add_generate_args(p: argparse.ArgumentParser, demo: bool = False) -> None:
    req = not demo
    p.add_argument("--image", required=req, help="reference image (any format PIL reads)")
    p.add_argument("--audio", required=req, help="speech audio (wav/mp3/flac/ogg/m4a, any rate)")
    p.add_argument("--prompt", default=DEMO_PROMPT if demo else None, required=req, help="scene description")
    p.add_argument("--size", default="704*384",
                   help="output size 'W*H' or 'WxH' (both multiples of 64), e.g. 704*384; or auto: the largest "
                        "of the reference's sizes whose memory estimate fits the free memory of the GPU(s)")
    p.add_argument("--size-mode", choices=SIZE_MODES, default=DEFAULT_SIZE_MODE,
                   help="area (default, the reference rule and the nodes' default): W*H is an area budget, the image keeps its aspect ratio, sides snap to multiples of 64; exact: output is exactly WxH (image scaled to cover, centre-cropped)")
    p.add_argument("--ckpt-dir", required=req, help="Wan2.2-S2V-14B folder (official layout)")
    p.add_argument("--lora", default=None, help="Live Avatar LoRA (liveavatar.safetensors); default: look beside the checkpoint")
    p.add_argument("--lora-strength", type=_option(lora_strength), default=1.0,
                   help=f"LoRA scale, {LORA_STRENGTH_RANGE[0]} to {LORA_STRENGTH_RANGE[1]} (1.0 by default)")
    p.add_argument("--pose-video", default=None, help="optional pose (DW-pose) video driving the body, as the reference's --pose_video")
    p.add_argument("--num-clip", type=int, default=None, help="max 48-frame clips (default: until the audio ends)")
    p.add_argument("--steps", type=int, default=4, choices=(3, 4, 5))
    p.add_argument("--seed", type=_option(seed), default=42, help=f"noise seed, 0 to {SEED_MAX}")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (one device, in-process)")
    p.add_argument("--gpus", default=None,
                   help="several GPUs, e.g. 0,1,2,3,4: runs a worker group (timestep-forcing pipeline parallelism)")
    p.add_argument("--gpu-mode", choices=GPU_MODES, default="auto",
                   help="with --gpus: tpp (each GPU owns a group of denoising steps; a 5th GPU decodes), layers "
                        "(the DiT's layers split over the GPUs, for cards too small for the whole model), "
                        "single, or auto (tpp when whole copies fit, else layers)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--fp8", choices=AUTO_ON_OFF, nargs="?", const="on", default="off",
                   help="fp8 linears in the DiT (Hopper/Ada GPUs): --fp8 (on), off (default), or auto (on when the "
                        "job does not fit otherwise; the cheapest memory option, see --size auto)")
    p.add_argument("--fp8-scaling", choices=FP8_SCALINGS, default=DEFAULT_FP8_SCALING,
                   help="with --fp8: tensor (one scale per tensor, the reference's scheme, default) or row "
                        "(one scale per token and per output channel: robust to outlier tokens)")
    p.add_argument("--attn", default="sdpa", choices=ATTENTION_BACKENDS,
                   help="attention backend (default sdpa: PyTorch picks the kernel; flash and sage need their "
                        "packages installed)")
    p.add_argument("--compile", action="store_true", help="torch.compile the DiT blocks (GPU)")
    p.add_argument("--kv-offload", choices=AUTO_ON_OFF, default="auto",
                   help="keep the denoising steps' KV caches in host memory, one on the GPU at a time: "
                        "auto (only when they do not fit), on, off")
    p.add_argument("--kv-prefetch", choices=AUTO_ON_OFF, nargs="?", const="on", default="auto",
                   help="with KV offload: page the next step's cache in while this one computes (one more "
                        "cache-sized GPU buffer): auto (whenever that buffer fits), on, off")
    p.add_argument("--kv-dtype", choices=KV_DTYPES + ("auto",), default=DEFAULT_KV_DTYPE,
                   help="KV cache storage: bf16 (the model dtype, default), fp8 (one scale per token and head: "
                        "about half the cache memory), or auto (fp8 only when bf16 caches do not fit)")
    p.add_argument("--weights", choices=WEIGHTS_MODES, default="auto",
                   help="where the DiT's layers live: auto (all on the GPU when they and the KV caches fit, "
                        "else as many as fit, the rest streamed layer by layer from pinned host memory), "
                        "resident (all on the GPU), stream (as many as fit, every KV layer paged)")
    p.add_argument("--out", default=None if req else str(REPO / "output" / "demo.mp4"), required=req,
                   help="output .mp4 path")
    p.add_argument("--check", action="store_true",
                   help="check every input (options, files, size, audio length, checkpoint headers), print "
                        "what would be made, and exit without loading the model")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m liveavatar", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate_args(sub.add_parser("generate", help="generate an avatar video (mp4 with audio)"))
    tiny = sub.add_parser("make-tiny-checkpoint", help="write a tiny random checkpoint in the official layout")
    tiny.add_argument("dir")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--config", default=None, help="optional DiT config.json to use instead of the default tiny one")
    demo = sub.add_parser("demo", help="tiny checkpoint + shipped example image and speech -> mp4")
    _add_generate_args(demo, demo=True)
    demo.set_defaults(device="cpu", dtype="fp32", size="256*128")
    return parser


def _resolve_placement(args: argparse.Namespace) -> tuple[str, tuple[str, ...] | None]:
    """(device of the in-process model or of the first worker, the --gpus devices or None)."""
    import torch

    from liveavatar.options import parse_gpus
    from liveavatar.pipeline.model import resolve_device

    if args.gpus is None:
        if args.gpu_mode in ("tpp", "layers"):
            raise UserError(f"--gpu-mode {args.gpu_mode}: needs --gpus with at least 2 GPUs, e.g. --gpus 0,1")
        return str(resolve_device(args.device)), None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    try:
        gpus = parse_gpus(args.gpus, count)
    except ValueError as exc:
        raise UserError(f"--{exc}") from None
    if args.gpu_mode in ("tpp", "layers") and len(gpus) < 2:
        raise UserError(f"--gpu-mode {args.gpu_mode}: needs at least 2 GPUs, --gpus gives {len(gpus)}")
    return gpus[0], gpus


def _fit_to_devices(args: argparse.Namespace, devices, image_wh, ckpt, dtype, size, fp8, cache):
    """`--size auto` / `--fp8 auto` / `--kv-dtype auto`: `pipeline.fit.fit_job` on the devices' free
    memory (before loading), beside the wav2vec2 encoder each DiT GPU holds, with layer streaming
    as an option on one device unless `--weights resident`. Returns (OutputSize, Precision,
    CachePolicy), resolved; raises NoFitError (a MemoryError: estimate, free memory, cheapest
    fitting options) when nothing fits."""
    import dataclasses

    from liveavatar.models.wav2vec import AudioFeatureExtractor

    from liveavatar.options import precision_from_flags
    from liveavatar.pipeline.fit import fit_job, fp8_capable, measure_free
    from liveavatar.sizes import resolve_size

    free, host = measure_free(devices)
    on_cuda = any(str(d).startswith("cuda") for d in devices)
    streaming = len(devices) == 1 and args.weights != "resident"  # worker groups keep their layers resident
    fit = fit_job(ckpt.config, free, size=None if size is None else (size.width, size.height), image_wh=image_wh,
                  size_mode=args.size_mode, steps=args.steps, weights_fp8=fp8,
                  kv_fp8=None if args.kv_dtype == "auto" else cache.fp8, kv_offload=cache.offload,
                  resident_layers="auto" if streaming else None,
                  host_free=host, dtype=dtype, devices=[str(d) for d in devices], fp8_possible=fp8_capable(devices),
                  beside_dit=AudioFeatureExtractor.device_bytes(ckpt.wav2vec_config(), dtype) if on_cuda else 0)
    if size is None:
        size = resolve_size(image_wh, fit.size_key, args.size_mode)  # logs the effective size once
    precision = precision_from_flags(args.dtype, fit.options.weights_fp8, args.fp8_scaling)
    cache = dataclasses.replace(cache, fp8=fit.options.kv_fp8, offload=True if fit.options.kv_offload else cache.offload)
    return size, precision, cache


def _input_file(flag: str, text: str) -> Path:
    """The file an option names, checked to exist, be a file and be readable (else `UserError`
    naming the option and the path)."""
    p = Path(text).expanduser()
    shown = str(p) if p.is_absolute() else f"{p} (= {p.resolve()})"
    if not p.exists():
        raise UserError(f"{flag}: no file at {shown}")
    if p.is_dir():
        raise UserError(f"{flag}: {shown} is a directory; name a file")
    try:
        with open(p, "rb"):
            pass
    except OSError as exc:
        raise UserError(f"{flag}: cannot read {shown} ({exc.strerror}); make it readable, e.g. chmod a+r") from None
    return p


def _check_writable(out: Path) -> None:
    """Make `out`'s folder and check a file can be created there (an unnamed temporary file: nothing
    is left behind), so a read-only or missing output folder is refused before the model loads."""
    import tempfile

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as exc:
        raise _out_error(out, exc) from None


def _out_error(out: Path, exc: OSError) -> UserError:
    return UserError(f"--out: cannot write {out} ({exc.strerror}); choose a folder you can write to")


def run_generate(args: argparse.Namespace) -> dict:
    """Validate every input, load the model, stream blocks to the mp4. Returns a summary dict."""
    import torch

    from liveavatar.config import DEFAULT_STREAM
    from liveavatar.loading.official import find_official_checkpoint
    from liveavatar.loading.placement import PlacementTarget
    from liveavatar.media.audio import open_audio
    from liveavatar.media.image import load_image
    from liveavatar.media.video_writer import VideoWriter
    from liveavatar.options import CachePolicy, precision_from_flags
    from liveavatar.pipeline.fit import fp8_weights_choice
    from liveavatar.pipeline.model import LiveAvatar, resolve_dtype
    from liveavatar.pipeline.plan import audio_frames
    from liveavatar.pipeline.speed import fp8_scaling_for
    from liveavatar.sizes import parse_size, resolve_size

    # --- every option resolved and checked first: no model is loaded until every input is good
    if args.size != "auto":
        parse_size(args.size)
    out = Path(args.out).expanduser()
    if out.suffix.lower() != ".mp4":
        raise UserError(f"--out: {out} must end in .mp4")
    try:
        taken = out.is_dir()
    except OSError as exc:  # a folder on the way that cannot be searched
        raise _out_error(out, exc) from None
    if taken:
        raise UserError(f"--out: {out.resolve()} is a directory; name the .mp4 file to write")
    if args.num_clip is not None and args.num_clip < 1:
        raise UserError("--num-clip: must be >= 1")
    device, gpus = _resolve_placement(args)
    if gpus and args.weights == "stream":
        raise UserError("--weights stream: one device only for now (worker groups keep their layers resident); "
                        "drop --gpus or use --weights auto")
    dtype = resolve_dtype(args.dtype)
    fp8 = fp8_weights_choice(args.fp8, gpus or [device])  # None: auto
    precision = precision_from_flags(args.dtype, bool(fp8), args.fp8_scaling)
    fp8_scaling_for(precision.fp8, torch.device(device))
    cache = CachePolicy.from_choices(args.kv_offload, args.kv_prefetch,
                                     "bf16" if args.kv_dtype == "auto" else args.kv_dtype)
    image = load_image(_input_file("--image", args.image))
    audio = open_audio(_input_file("--audio", args.audio))  # long clips spooled to disk: flat memory
    frames = audio_frames(audio, DEFAULT_STREAM)
    if args.pose_video is not None:
        _input_file("--pose-video", args.pose_video)
    if args.lora not in (None, "none") and not Path(args.lora).expanduser().exists():
        raise UserError(f"--lora: no file at {Path(args.lora).expanduser().resolve()}; give the Live Avatar LoRA "
                        "(liveavatar.safetensors, or its folder), or none for the base model")
    ckpt = find_official_checkpoint(Path(args.ckpt_dir).expanduser(), lora=args.lora)
    size = None if args.size == "auto" else resolve_size(image.size, args.size, args.size_mode)  # resolved once
    if size is None or fp8 is None or args.kv_dtype == "auto":  # fitted to the free memory, before loading
        size, precision, cache = _fit_to_devices(args, gpus or (device,), image.size, ckpt, dtype,
                                                 size, fp8, cache)
    _check_writable(out)
    if args.check:
        return {"check": True, "size": f"{size.width}x{size.height}", "frames": frames, "fps": DEFAULT_STREAM.fps,
                "ckpt": str(ckpt.root), "lora": str(ckpt.lora_path or "none"),
                "path": str(out.resolve())}

    t0 = time.perf_counter()
    if gpus:
        from parallel.handle import open_worker_group

        model = open_worker_group("checkpoint", list(gpus), mode=args.gpu_mode,
                                  ckpt_dir=str(Path(args.ckpt_dir).expanduser().resolve()), lora=args.lora,
                                  lora_strength=args.lora_strength, dtype=precision.dtype, fp8=precision.fp8,
                                  attn=args.attn, compile=args.compile)
    else:
        model = LiveAvatar.from_checkpoint(Path(args.ckpt_dir).expanduser(), lora=args.lora,
                                           lora_strength=args.lora_strength, device=device,
                                           dtype=precision.dtype, fp8=precision.fp8, attn=args.attn,
                                           compile=args.compile, weights=args.weights,
                                           target=PlacementTarget(size.width, size.height, args.steps))
    t_load = time.perf_counter() - t0
    img = model.prepare_image(image, size)
    ctx = model.encode_prompt(args.prompt)
    aud = model.encode_audio(audio)
    pose = None
    if args.pose_video is not None:
        pose = model.encode_pose(Path(args.pose_video).expanduser(), img, aud.num_frames)
    t1 = time.perf_counter()
    first = writer = None
    fps = model.stream.fps
    try:
        with VideoWriter(out, img.width, img.height, fps=fps, audio_rate=audio.sample_rate) as writer:
            for blk in model.generate(ctx, aud, img, seed=args.seed, steps=args.steps,
                                      num_clip=args.num_clip, pose_cond=pose,
                                      kv_offload=cache.offload, kv_prefetch=cache.prefetch,
                                      kv_fp8=cache.fp8):
                if first is None:
                    first = time.perf_counter() - t1
                writer.write_frames(blk.frames)
                writer.write_audio(blk.audio)
                log.info("block %d/%d: %d frames (dit %.2fs, decode %.2fs)", blk.index + 1, blk.total_blocks,
                         blk.frames.shape[0], blk.timings.get("dit", 0), blk.timings.get("decode", 0))
            info = writer.close()
    except BaseException:
        if first is None and writer is not None:  # no block written: leave no file that could pass for a video
            out.unlink(missing_ok=True)
        raise
    finally:
        if hasattr(model, "close"):
            model.close()
    gen_s = time.perf_counter() - t1
    frames = int(info.get("frames", 0))
    return {"path": str(out.resolve()), "size": f"{img.width}x{img.height}", "fps": fps,
            "frames": frames, "seconds": round(frames / fps, 3),
            "load_s": round(t_load, 2), "generate_s": round(gen_s, 2),
            "first_block_s": round(first or 0.0, 2),
            "device": f"gpus {args.gpus}" if gpus else str(model.device),
            "torch": torch.__version__}


def _print_summary(summary: dict) -> None:
    if summary.get("check"):
        print(f"inputs ok: effective size {summary['size']}, {summary['frames']} frames "
              f"({summary['frames'] / summary['fps']:.2f} s at {summary['fps']} fps), checkpoint {summary['ckpt']} "
              f"(LoRA {summary['lora']}), would write {summary['path']}")
        return
    print(f"wrote {summary['path']}")
    print(f"effective size {summary['size']}, {summary['fps']} fps, {summary['frames']} frames "
          f"({summary['seconds']} s of video), generated in {summary['generate_s']} s "
          f"(model load {summary['load_s']} s) on {summary['device']}")


def cmd_demo(args: argparse.Namespace) -> int:
    from liveavatar.loading.tiny import make_tiny_checkpoint

    ckpt = REPO / ".cache" / "tiny-ckpt"
    if args.ckpt_dir is None:
        if not (ckpt / "config.json").is_file():
            make_tiny_checkpoint(ckpt, seed=0)
        args.ckpt_dir = str(ckpt)
    args.image = args.image or str(DEMO_IMAGE)
    args.audio = args.audio or str(DEMO_AUDIO)
    _print_summary(run_generate(args))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":  # the benchmarks live outside the library (bench/)
        print("error: the benchmark is not part of the library; from the repository root run "
              "`python -m bench " + " ".join(argv[1:]) + "` (bench/README.md)", file=sys.stderr)
        return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "generate":
            _print_summary(run_generate(args))
            return 0
        if args.command == "demo":
            return cmd_demo(args)
        if args.command == "make-tiny-checkpoint":
            from liveavatar.loading.tiny import make_tiny_checkpoint

            kwargs = {}
            if args.config:
                from liveavatar.config import DiTConfig

                kwargs["dit"] = DiTConfig.from_json(args.config)
            path = make_tiny_checkpoint(Path(args.dir).expanduser(), seed=args.seed, **kwargs)
            print(f"tiny checkpoint written to {Path(path).resolve()}")
            return 0
    except (KeyboardInterrupt, Exception) as exc:
        code = _report_error(exc, args.verbose)
        if code is None:
            raise
        return code
    return 1


def _out_of_memory(exc: BaseException) -> bool:
    memory = sys.modules.get("liveavatar.pipeline.memory")  # loaded with the model: no import at error time
    return memory is not None and memory.is_out_of_memory(exc) or isinstance(exc, MemoryError)


def _report_error(exc: BaseException, verbose: bool) -> int | None:
    """Print one `error:` line for a failure the user can act on and return the exit status (130
    interrupted, 2 bad input or a memory preflight refusal, 1 a fault: file system, worker group); None lets the traceback through
    (a bug, or --verbose)."""
    if isinstance(exc, KeyboardInterrupt):
        print("error: interrupted", file=sys.stderr)
        return 130
    if verbose:
        return None
    group = sys.modules.get("parallel.group")  # a worker-group fault can only come once it is imported
    if isinstance(exc, _user_error_types()):
        code, text = 2, str(exc)
    elif isinstance(exc, MemoryError) and str(exc):  # a preflight refusal (estimate, free memory, remedies)
        code, text = 2, str(exc)
    elif isinstance(exc, OSError):  # disk full, read-only or vanished output folder, I/O error
        code, text = 1, exc.strerror or str(exc)
        if exc.filename and str(exc.filename) not in text:
            text += f": {exc.filename}"
    elif group is not None and isinstance(exc, group.GroupError):
        code, text = 1, str(exc).partition("; its last traceback:")[0]
    elif _out_of_memory(exc):  # in this process (the single-device path); a rank's comes as a GroupError
        from liveavatar.pipeline.memory import OOM_REMEDY

        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        code, text = 1, f"{type(exc).__name__}: {first} [{OOM_REMEDY}]"
    else:
        return None
    text = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    sys.stdout.flush()
    logging.disable(logging.CRITICAL)  # nothing after the error line (e.g. teardown at exit)
    print(f"error: {text}", file=sys.stderr, flush=True)
    return code
