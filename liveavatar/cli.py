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
from liveavatar.options import DEFAULT_FP8_SCALING, FP8_SCALINGS, WEIGHTS_MODES
from liveavatar.options import ATTENTION_BACKENDS, AUTO_ON_OFF, auto_on_off, finite_float  # noqa: F401 (bench)
from liveavatar.sizes import DEFAULT_MODE as DEFAULT_SIZE_MODE
from liveavatar.sizes import MODES as SIZE_MODES


def _finite(text: str) -> float:
    """argparse type: a finite float (nan / inf are refused with one error line)."""
    try:
        return finite_float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc) if "finite" in str(exc) else f"{text!r} is not a number") from None


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
                   help="output size 'W*H' or 'WxH' (both multiples of 64), e.g. 704*384")
    p.add_argument("--size-mode", choices=SIZE_MODES, default=DEFAULT_SIZE_MODE,
                   help="area (default, the reference rule and the nodes' default): W*H is an area budget, the image keeps its aspect ratio, sides snap to multiples of 64; exact: output is exactly WxH (image scaled to cover, centre-cropped)")
    p.add_argument("--ckpt-dir", required=req, help="Wan2.2-S2V-14B folder (official layout)")
    p.add_argument("--lora", default=None, help="Live Avatar LoRA (liveavatar.safetensors); default: look beside the checkpoint")
    p.add_argument("--lora-strength", type=_finite, default=1.0, help="LoRA scale (a finite number, 1.0 by default)")
    p.add_argument("--pose-video", default=None, help="optional pose (DW-pose) video driving the body, as the reference's --pose_video")
    p.add_argument("--num-clip", type=int, default=None, help="max 48-frame clips (default: until the audio ends)")
    p.add_argument("--steps", type=int, default=4, choices=(3, 4, 5))
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (one device, in-process)")
    p.add_argument("--gpus", default=None,
                   help="several GPUs, e.g. 0,1,2,3,4: runs a worker group (timestep-forcing pipeline parallelism)")
    p.add_argument("--gpu-mode", choices=("auto", "tpp", "single"), default="auto",
                   help="with --gpus: tpp (each GPU owns a group of denoising steps; a 5th GPU decodes), single, or auto")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--fp8", action="store_true", help="fp8 linears in the DiT (Hopper/Ada GPUs)")
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
    p.add_argument("--weights", choices=WEIGHTS_MODES, default="auto",
                   help="where the DiT's layers live: auto (all on the GPU when they and the KV caches fit, "
                        "else as many as fit, the rest streamed layer by layer from pinned host memory), "
                        "resident (all on the GPU), stream (as many as fit, every KV layer paged)")
    p.add_argument("--out", default=None if req else str(REPO / "output" / "demo.mp4"), required=req,
                   help="output .mp4 path")


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
        if args.gpu_mode == "tpp":
            raise UserError("--gpu-mode tpp: needs --gpus with at least 2 GPUs, e.g. --gpus 0,1")
        return str(resolve_device(args.device)), None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    try:
        gpus = parse_gpus(args.gpus, count)
    except ValueError as exc:
        raise UserError(f"--{exc}") from None
    if args.gpu_mode == "tpp" and len(gpus) < 2:
        raise UserError(f"--gpu-mode tpp: needs at least 2 GPUs, --gpus gives {len(gpus)}")
    return gpus[0], gpus


def run_generate(args: argparse.Namespace) -> dict:
    """Validate every input, load the model, stream blocks to the mp4. Returns a summary dict."""
    import torch

    from liveavatar.loading.official import find_official_checkpoint
    from liveavatar.loading.placement import PlacementTarget
    from liveavatar.media.audio import open_audio
    from liveavatar.media.image import load_image
    from liveavatar.media.video_writer import VideoWriter
    from liveavatar.options import CachePolicy, precision_from_flags
    from liveavatar.pipeline.model import LiveAvatar, resolve_dtype
    from liveavatar.pipeline.speed import fp8_scaling_for
    from liveavatar.sizes import parse_size, resolve_size

    # --- every option resolved and checked first: no model is loaded until every input is good
    parse_size(args.size)
    out = Path(args.out).expanduser()
    if out.suffix.lower() != ".mp4":
        raise UserError(f"--out: {out} must end in .mp4")
    if out.is_dir():
        raise UserError(f"--out: {out.resolve()} is a directory; name the .mp4 file to write")
    if args.num_clip is not None and args.num_clip < 1:
        raise UserError("--num-clip: must be >= 1")
    device, gpus = _resolve_placement(args)
    if gpus and args.weights == "stream":
        raise UserError("--weights stream: one device only for now (worker groups keep their layers resident); "
                        "drop --gpus or use --weights auto")
    resolve_dtype(args.dtype)
    precision = precision_from_flags(args.dtype, args.fp8, args.fp8_scaling)
    fp8_scaling_for(precision.fp8, torch.device(device))
    cache = CachePolicy.from_choices(args.kv_offload, args.kv_prefetch)
    image = load_image(Path(args.image).expanduser())
    size = resolve_size(image.size, args.size, args.size_mode)  # the output size, resolved once
    audio = open_audio(Path(args.audio).expanduser())  # long clips spooled to disk: flat memory
    if args.pose_video is not None and not Path(args.pose_video).expanduser().is_file():
        raise UserError(f"--pose-video: no file at {Path(args.pose_video).expanduser().resolve()}")
    find_official_checkpoint(Path(args.ckpt_dir).expanduser(), lora=args.lora)
    out.parent.mkdir(parents=True, exist_ok=True)

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
    first = None
    fps = model.stream.fps
    try:
        with VideoWriter(out, img.width, img.height, fps=fps, audio_rate=audio.sample_rate) as writer:
            for blk in model.generate(ctx, aud, img, seed=args.seed, steps=args.steps,
                                      num_clip=args.num_clip, pose_cond=pose,
                                      kv_offload=cache.offload, kv_prefetch=cache.prefetch):
                if first is None:
                    first = time.perf_counter() - t1
                writer.write_frames(blk.frames)
                writer.write_audio(blk.audio)
                log.info("block %d/%d: %d frames (dit %.2fs, decode %.2fs)", blk.index + 1, blk.total_blocks,
                         blk.frames.shape[0], blk.timings.get("dit", 0), blk.timings.get("decode", 0))
            info = writer.close()
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


def _report_error(exc: BaseException, verbose: bool) -> int | None:
    """Print one `error:` line for a failure the user can act on and return the exit status (130
    interrupted, 2 bad input, 1 a fault: file system, worker group); None lets the traceback through
    (a bug, or --verbose)."""
    if isinstance(exc, KeyboardInterrupt):
        print("error: interrupted", file=sys.stderr)
        return 130
    if verbose:
        return None
    group = sys.modules.get("parallel.group")  # a worker-group fault can only come once it is imported
    if isinstance(exc, _user_error_types()):
        code, text = 2, str(exc)
    elif isinstance(exc, OSError):  # disk full, read-only or vanished output folder, I/O error
        code, text = 1, exc.strerror or str(exc)
        if exc.filename and str(exc.filename) not in text:
            text += f": {exc.filename}"
    elif group is not None and isinstance(exc, group.GroupError):
        code, text = 1, str(exc).partition("; its last traceback:")[0]
    else:
        return None
    text = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    sys.stdout.flush()
    logging.disable(logging.CRITICAL)  # nothing after the error line (e.g. teardown at exit)
    print(f"error: {text}", file=sys.stderr, flush=True)
    return code
