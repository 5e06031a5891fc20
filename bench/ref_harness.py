"""Time the REFERENCE Live Avatar DiT (`CausalWanModel_S2V`) exactly as its streaming pipeline
drives it, with the same random weights our benchmark gives our DiT.

Run in its own process (the reference's package is also called `liveavatar`):

    python bench/ref_harness.py --ref-dir third_party/LiveAvatar --size 704*384 --steps 4 --blocks 8
    python bench/ref_harness.py --ref-dir third_party/LiveAvatar --tiny --device cpu   # CPU check

`--ref-dir` is a local, git-ignored copy of the official repository (bench/prepare_ref.sh makes
one); nothing of it is committed. Prints one JSON line with the keys of `python -m bench`
plus "impl": "reference".

What is reproduced from the official single-GPU pipeline (`causal_s2v_pipeline.py`):
- the model built from the checkpoint's config.json values (ours: `DiTConfig()`), all weights in
  bf16, `num_frame_per_block = 3`;
- one KV cache per denoising step, all resident on the GPU: per layer `k`, `v` of one clip
  (12 latent frames) and a `cond_k`/`cond_v`/`cond_end` sink cache of 2800 tokens shared by the
  four step caches; an (unused) cross-attention cache list;
- the sink prefill (`sink_flag=True`, t = 0) run once per step cache before block 0;
- per block and step: `model([x], t=[1,3], context=[ctx], cond_states, motion_latents,
  ref_latents, audio_input [1,25,1024,12], motion_frames=[73,19], drop_motion_frames=(clip 0),
  kv_cache=cache[step], current_start, current_end)`, then the Euler update in float32, all under
  `torch.amp.autocast('cuda', bf16)` and `torch.no_grad()`;
- `--fp8`: the reference's own `replace_linear_with_scaled_fp8` with its ignore list;
  `--compile`: `ENABLE_COMPILE=true` (its inductor compile of `_forward_inference` and RoPE).

Runtime shims (applied here by monkeypatching; the files on disk stay unmodified):
- `flash_attention` (text and audio cross-attention; needs the flash-attn package, absent on
  the benchmark machine) -> PyTorch SDPA on bf16 inputs. Every streaming call site passes full
  key lengths, so no mask is needed.
- CPU only: cuDNN attention -> SDPA; the RoPE table's hard-coded "cuda" -> "cpu" while the
  model is built; `_forward_sink`'s hard-coded width 5120 for its empty token tensor -> the
  model width (only for configs whose dim is not 5120).
- GPU: if cuDNN attention refuses a probe call, it is replaced by SDPA (reported as ref_attn).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
TEXT_TOKENS = 128  # prompt length before the model pads to text_len (same in bench/random_model.py)
PROCESS_START = time.perf_counter()


def _load_by_path(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


benchlib = _load_by_path("_la_benchlib", REPO / "bench" / "benchlib.py")
la_config = _load_by_path("_la_config", REPO / "liveavatar" / "config.py")


# ----------------------------------------------------------------------------- importing the reference
_STUB_PACKAGES = (
    "liveavatar", "liveavatar.models", "liveavatar.models.wan", "liveavatar.models.wan.wan_2_2",
    "liveavatar.models.wan.wan_2_2.modules", "liveavatar.models.wan.wan_2_2.modules.s2v",
    "liveavatar.models.wan.wan_2_2.distributed", "liveavatar.utils",
)


def import_reference(ref_dir: Path, compile_: bool) -> dict[str, types.ModuleType]:
    """Import the reference DiT modules without running the packages' heavy __init__ files."""
    root = Path(ref_dir).resolve()
    if not (root / "liveavatar" / "models" / "wan" / "causal_model_s2v.py").is_file():
        raise SystemExit(f"error: --ref-dir {root} does not hold the reference repository "
                         "(liveavatar/models/wan/causal_model_s2v.py); run bench/prepare_ref.sh")
    if "liveavatar" in sys.modules and not getattr(sys.modules["liveavatar"], "_ref_stub", False):
        raise SystemExit("error: our liveavatar package is already imported in this process; "
                         "run the harness as its own process")
    os.environ["ENABLE_COMPILE"] = "true" if compile_ else "false"
    for name in _STUB_PACKAGES:
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(root.joinpath(*name.split(".")))]
        pkg._ref_stub = True
        sys.modules[name] = pkg
    sys.path.insert(0, str(root))
    mods = {}
    for short, name in (("model", "liveavatar.models.wan.wan_2_2.modules.model"),
                        ("attention", "liveavatar.models.wan.wan_2_2.modules.attention"),
                        ("causal", "liveavatar.models.wan.causal_model_s2v")):
        mods[short] = importlib.import_module(name)
    return mods


def sdpa_flash_attention(q, k, v, q_lens=None, k_lens=None, dropout_p=0.0, softmax_scale=None,
                         q_scale=None, causal=False, window_size=(-1, -1), deterministic=False,
                         dtype=torch.bfloat16, version=None):
    """Stand-in for the reference's `flash_attention`: q/k/v [B, L, N, D] -> [B, Lq, N, D]."""
    out_dtype = q.dtype
    if q.device.type == "cuda":  # the official kernel casts to half first
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if q_scale is not None:
        q = q * q_scale
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=causal, scale=softmax_scale)
    return out.transpose(1, 2).to(out_dtype)


def sdpa_self_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
    """Stand-in for `cudnn_attention_forward_with_lse` (same [B, L, N, D] contract)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=attn_mask, is_causal=is_causal, scale=scale)
    return out.transpose(1, 2).contiguous()


def cudnn_probe(attn_mod, device: torch.device, heads: int, head_dim: int) -> bool:
    try:
        q = torch.randn(1, 256, heads, head_dim, device=device, dtype=torch.bfloat16)
        attn_mod.cudnn_attention_forward_with_lse(q, q, q)
        torch.cuda.synchronize(device)
        return True
    except Exception as exc:  # pragma: no cover - GPU only
        print(f"ref_harness: cuDNN attention failed a probe ({exc}); using SDPA", file=sys.stderr)
        return False


class _TorchWithWidth(types.ModuleType):
    """`torch` as seen by causal_model_s2v, except that zeros([1, 5120, 0, ...]) uses `width`."""

    def __init__(self, width: int):
        super().__init__("torch")
        self._width = width

    def __getattr__(self, name):
        return getattr(torch, name)

    def zeros(self, *args, **kwargs):
        if args and isinstance(args[0], (list, tuple)) and len(args[0]) == 5 and args[0][1] == 5120 \
                and args[0][2] == 0:
            args = ([args[0][0], self._width, *args[0][2:]],) + args[1:]
        return torch.zeros(*args, **kwargs)


def apply_shims(mods: dict, device: torch.device, dim: int, heads: int, head_dim: int) -> str:
    mods["model"].flash_attention = sdpa_flash_attention
    mods["causal"].flash_attention = sdpa_flash_attention
    attn = "cudnn"
    if device.type != "cuda" or not cudnn_probe(mods["attention"], device, heads, head_dim):
        mods["attention"].cudnn_attention_forward_with_lse = sdpa_self_attention
        attn = "sdpa"
    if dim != 5120:
        mods["causal"].torch = _TorchWithWidth(dim)
    return attn


def build_reference(mods: dict, cfg, device: torch.device, dtype: torch.dtype, seed: int):
    """The reference model with our random weights (same names, same generator rule)."""
    kwargs = {k: v for k, v in cfg.to_dict().items() if not k.startswith("_")}
    kwargs.update(patch_size=tuple(cfg.patch_size), text_dim=cfg.text_dim, qk_norm=cfg.qk_norm,
                  cross_attn_norm=cfg.cross_attn_norm)
    cls = mods["causal"].CausalWanModel_S2V
    original_to = torch.Tensor.to

    def to_cpu(self, *args, **kw):  # the RoPE table is sent to "cuda" unconditionally
        args = tuple("cpu" if a == "cuda" else a for a in args)
        if kw.get("device") == "cuda":
            kw["device"] = "cpu"
        return original_to(self, *args, **kw)

    if device.type != "cuda":
        torch.Tensor.to = to_cpu
    try:
        with benchlib.params_on_meta():
            model = cls(**kwargs)
    finally:
        torch.Tensor.to = original_to
    model.eval().requires_grad_(False)
    model.num_frame_per_block = 3
    info = benchlib.materialize_random_(model, device, dtype, seed=seed, dim_hint=cfg.dim)
    model.freqs = model.freqs.to(device)
    return model, info


def make_caches(cfg, steps: int, ring_tokens: int, device, dtype, sink_capacity: int = 2800):
    """As the pipeline: per step a per-layer list of dicts; the cond (sink) part shared."""
    heads, hd = cfg.num_heads, cfg.dim // cfg.num_heads
    shared = [{"cond_k": torch.zeros([1, sink_capacity, heads, hd], dtype=dtype, device=device),
               "cond_v": torch.zeros([1, sink_capacity, heads, hd], dtype=dtype, device=device),
               "cond_end": torch.tensor([0], dtype=torch.long, device=device)}
              for _ in range(cfg.num_layers)]
    caches = []
    for _ in range(steps):
        layers = []
        for li in range(cfg.num_layers):
            layers.append({"k": torch.zeros([1, ring_tokens, heads, hd], dtype=dtype, device=device),
                           "v": torch.zeros([1, ring_tokens, heads, hd], dtype=dtype, device=device),
                           **shared[li]})
        caches.append(layers)
    cross = [{"k": torch.zeros([1, 0, heads, hd], dtype=dtype, device=device),
              "v": torch.zeros([1, 0, heads, hd], dtype=dtype, device=device), "is_init": False}
             for _ in range(cfg.num_layers)]
    return caches, cross


def flow_schedule(steps: int):
    """Timesteps and sigmas of the pipeline's sampler (diffusers FlowMatchEuler, shift 3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sch = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3)
    sch.set_timesteps(steps)
    return [float(t) for t in sch.timesteps], [float(s) for s in sch.sigmas]


# ----------------------------------------------------------------------------- the run
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ref-dir", default=str(REPO / "third_party" / "LiveAvatar"))
    p.add_argument("--size", default="704*384", help="W*H in pixels")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--blocks", type=int, default=6, help="timed blocks")
    p.add_argument("--warmup", type=int, default=None, help="warm-up blocks (default: one clip = 4)")
    p.add_argument("--device", default="auto")
    p.add_argument("--fp8", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="tiny config (CPU checks)")
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 matmul peak; measured if absent")
    p.add_argument("--time-limit", type=float, metavar="S",
                   default=float(os.environ.get("LIVEAVATAR_BENCH_TIME_LIMIT", 0)) or None,
                   help="stop after the block that passes S seconds since start (default: $LIVEAVATAR_BENCH_TIME_LIMIT)")
    p.add_argument("--weights-checksum", action="store_true",
                   help="print {param name: [sum, sum of squares]} of the built model and exit (tests)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Run; on failure still print one JSON line (with "error") so a device script keeps going."""
    args = parse_args(argv)
    try:
        return run(args)
    except (SystemExit, RuntimeError, ValueError, ImportError, torch.cuda.OutOfMemoryError) as exc:
        if isinstance(exc, SystemExit) and not isinstance(exc.code, str):
            raise
        msg = str(exc.code if isinstance(exc, SystemExit) else exc).splitlines()
        out = {k: None for k in benchlib.RESULT_KEYS}
        out.update(impl="reference", error=f"{type(exc).__name__}: {msg[0] if msg else ''}"[:300],
                   torch=torch.__version__, num_gpus=benchlib.num_gpus(), size=args.size, steps=args.steps,
                   fp8=args.fp8, compile=args.compile, scope="dit", tiny=args.tiny,
                   peak_mem_gb=[benchlib.peak_mem_gib(torch.device("cuda"))] if torch.cuda.is_available() else None)
        print(json.dumps(out), flush=True)
        return 3


def run(args) -> int:
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    cfg = la_config.DiTConfig()
    size = args.size
    if args.tiny:
        cfg = la_config.DiTConfig(**{k: (tuple(v) if isinstance(v, list) else v)
                                     for k, v in benchlib.TINY_CONFIG.items()})
        size = benchlib.TINY_SIZE if args.size == "704*384" else args.size
    stream = la_config.StreamConfig()
    width, height = (int(v) for v in size.replace("x", "*").split("*"))
    h, w = height // stream.vae_stride_hw, width // stream.vae_stride_hw
    fsl = (h // 2) * (w // 2)
    nfb = stream.frames_per_block_latent
    ring = stream.latent_frames_per_clip * fsl
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.fp8 and device.type != "cuda":
        raise SystemExit("error: --fp8 needs a CUDA GPU (the reference's fp8 layers are CUDA-only)")
    warmup = stream.blocks_per_clip if args.warmup is None else args.warmup
    random.seed(args.seed)  # the reference draws its sink offset from Python's random per call

    mods = import_reference(Path(args.ref_dir), args.compile)
    ref_attn = apply_shims(mods, device, cfg.dim, cfg.num_heads, cfg.dim // cfg.num_heads)
    peak = args.peak_tflops
    if peak is None and device.type == "cuda":
        peak = benchlib.matmul_peak_tflops(device)
    benchlib.reset_peak_mem(device)
    model, winfo = build_reference(mods, cfg, device, dtype, args.seed)
    if args.weights_checksum:
        print(json.dumps(benchlib.weights_checksum(model)), flush=True)
        return 0
    if args.fp8:
        from liveavatar.utils.fp8_linear import replace_linear_with_scaled_fp8

        replace_linear_with_scaled_fp8(model, ignore_keys=[
            "text_embedding", "time_embedding", "time_projection", "head.head",
            "casual_audio_encoder.encoder.final_linear"])
        torch.cuda.empty_cache()
    timesteps, sigmas = flow_schedule(args.steps)
    caches, cross = make_caches(cfg, args.steps, ring, device, dtype)

    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    rnd = lambda *shape: torch.randn(*shape, generator=gen, device=device, dtype=torch.float32)  # noqa: E731
    context = rnd(TEXT_TOKENS, cfg.text_dim).to(dtype)
    ref_lat = rnd(1, 16, 1, h, w).to(dtype)
    motion = rnd(1, 16, stream.motion_frames_latent, h, w).to(dtype)
    cond = torch.zeros(1, 16, nfb, h, w, device=device, dtype=dtype)
    total_blocks = warmup + args.blocks
    noise = [rnd(16, nfb, h, w).to(dtype) for _ in range(total_blocks)]
    audio = [rnd(1, cfg.audio_num_layers, cfg.audio_dim, stream.frames_per_block).to(dtype)
             for _ in range(total_blocks)]
    motion_frames = [stream.motion_frames, stream.motion_frames_latent]

    def call(x, t, block_audio, cache, start, drop, sink=False):
        kw = dict(context=[context], seq_len=None, cond_states=cond, motion_latents=motion,
                  ref_latents=ref_lat, audio_input=block_audio, motion_frames=motion_frames,
                  drop_motion_frames=drop, kv_cache=cache, crossattn_cache=cross,
                  current_start=start, current_end=start + nfb * fsl)
        if sink:
            kw["sink_flag"] = True
        else:
            kw["mask"] = None
        tt = torch.full([1, nfb], float(t), device=device, dtype=torch.float32)
        return model([x], t=tt, **kw)

    autocast = torch.amp.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" \
        else torch.autocast("cpu", enabled=False)
    graphs0 = benchlib.dynamo_graphs()
    block_ms, step_ms, warm_ms = [], [], []
    graphs_after_first = graphs_after_warmup = graphs0
    finite = True
    truncated = None
    with torch.no_grad(), autocast:
        benchlib.sync(device)
        t_start = time.perf_counter()
        for cache in caches:  # the pipeline prefills the (shared) sink once per step cache
            call(noise[0], 0.0, audio[0], cache, 0, True, sink=True)
        ttff = None
        for b in range(total_blocks):
            start = b * nfb * fsl
            clip = b // stream.blocks_per_clip
            timer = benchlib.Timer(device)
            marks = [timer.mark()]
            x = noise[b]
            for i, t in enumerate(timesteps):
                v = call(x, t, audio[b], caches[i], start, clip == 0)[0]
                x = (x.float() + (sigmas[i + 1] - sigmas[i]) * v.float()).to(dtype)
                marks.append(timer.mark())
            timer.sync()
            if ttff is None:
                ttff = time.perf_counter() - t_start
                graphs_after_first = benchlib.dynamo_graphs()
            total = timer.elapsed_ms(marks[0], marks[-1])
            if b < warmup:
                warm_ms.append(total)
                if b == warmup - 1:
                    graphs_after_warmup = benchlib.dynamo_graphs()
            else:
                block_ms.append(total)
                step_ms += [timer.elapsed_ms(marks[i], marks[i + 1]) for i in range(len(marks) - 1)]
            if args.time_limit and time.perf_counter() - PROCESS_START > args.time_limit:
                truncated = f"--time-limit {args.time_limit}s reached after {b + 1} blocks"
                break
        finite = bool(torch.isfinite(x.float()).all())
        warmup_s = time.perf_counter() - t_start - sum(block_ms) / 1000.0
    graphs_end = benchlib.dynamo_graphs()

    if not block_ms and not warm_ms:
        raise RuntimeError(truncated or "no block finished")
    blk = benchlib.median(block_ms) if block_ms else warm_ms[-1]
    sink_len = benchlib.sink_tokens((h, w))
    flops = benchlib.dit_block_flops(cfg, (h, w), ring, sink_len, frames=nfb) * args.steps
    tflops = flops / (blk / 1000.0) / 1e12
    result = {
        "impl": "reference",
        "device": benchlib.device_name(device), "torch": torch.__version__, "num_gpus": benchlib.num_gpus(),
        "schedule": "single", "size": f"{width}*{height}", "steps": args.steps, "fp8": args.fp8,
        "compile": args.compile, "attn": ref_attn, "ref_attn": ref_attn, "scope": "dit",
        "fps": stream.frames_per_block / (blk / 1000.0),
        "ttff_s": ttff, "block_ms": blk, "step_ms": benchlib.median(step_ms) if step_ms else blk / args.steps,
        "peak_mem_gb": [benchlib.peak_mem_gib(device)],
        "tflops": tflops, "mfu": (tflops / peak) if peak else None,
        "matmul_peak_tflops": peak,
        "compile_s": max(0.0, warmup_s - warmup * blk / 1000.0),
        "warmup_s": warmup_s,
        "recompiles": graphs_end - graphs_after_first,
        "recompiles_timed": graphs_end - graphs_after_warmup,
        "graphs": graphs_end - graphs0,
        "warmup_blocks": warmup, "timed_blocks": args.blocks, "block_ms_all": warm_ms + block_ms,
        "weights_gib": winfo["bytes"] / 2**30, "weights_init_s": winfo["seconds"],
        "output_finite": finite, "tiny": args.tiny, "seed": args.seed,
    }
    if truncated:
        result.update(truncated=truncated, fps_from_last_warmup_block=not block_ms)
    print(json.dumps(benchlib.rounded(result)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
