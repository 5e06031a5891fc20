"""What a benchmark run times: our DiT / VAE with seeded random weights, the speed options, and
random conditioning of the right shapes (`BenchRun`). Shared by the single-process scopes
(`bench.cli`, `bench.scopes`) and the worker-group engine (`bench.group_engine`).
"""

from __future__ import annotations

import time

import torch

from bench import benchlib

TEXT_TOKENS = 128  # prompt length before padding to text_len (same in bench/ref_harness.py)


class BenchUsageError(ValueError):
    """Bad bench arguments (exit status 2, one `error:` line)."""


def bench_config(args):
    """The DiT config of the run: the full 14B one, or `benchlib.TINY_CONFIG` with --tiny."""
    from liveavatar.config import DiTConfig

    if args.tiny:
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in benchlib.TINY_CONFIG.items()}
        return DiTConfig(**kw).validate("tiny bench config")
    return DiTConfig()


def build_random_dit(cfg, device: torch.device, dtype: torch.dtype, seed: int, *, fp8: str | None = None,
                     allow_cpu_fp8: bool = False, residency=None, layers: range | None = None):
    """Our DiT with random weights, built the way the product loads a checkpoint: on the meta
    device, then part by part on `device` (each DiT block alone: random values, fp8 linears when
    `fp8` is a scaling, then packed into pinned host memory when the placement `residency`
    streams it, else into one device buffer as loading does), so the device never holds more
    than the placed weights plus one bf16 block.
    Values as `benchlib.materialize_random_` gives the whole model (full parameter names); `layers`:
    only that layer slice (the values of a name do not depend on the slice).
    Returns (dit, {"params", "bytes" (placed on the device + host), "seconds"})."""
    import time

    from liveavatar.models.dit import CausalS2VDiT
    from liveavatar.models.fp8 import convert_to_fp8
    from liveavatar.models.block_packing import pack_on_device, pack_to_host
    from liveavatar.models.pinned import HostArena

    t0 = time.perf_counter()
    with benchlib.params_on_meta():
        dit = CausalS2VDiT(cfg, layers=layers)
    dit.eval().requires_grad_(False)
    streamed = set(range(residency.weights, cfg.num_layers)) if residency is not None else set()
    parts = [(f"blocks.{i}", b) for i, b in enumerate(dit.blocks)]
    parts += [(name, m) for name, m in dit.named_children() if name != "blocks"]
    info = {"params": 0, "bytes": 0}
    arena = HostArena(pin=device.type == "cuda")  # the streamed blocks' pinned bytes
    for name, part in parts:
        got = benchlib.materialize_random_(part, device, dtype, seed=seed, dim_hint=cfg.dim, prefix=name)
        info["params"] += got["params"]
        if fp8:
            convert_to_fp8(part, allow_cpu=allow_cpu_fp8, scaling=fp8, prefix=name)
        info["bytes"] += sum(t.numel() * t.element_size() for t in (*part.parameters(), *part.buffers()))
        if name.startswith("blocks.") and int(name[7:]) in streamed:
            pack_to_host(part, arena, cfg.num_layers - int(name[7:]))
        elif name.startswith("blocks.") and any(True for _ in part.parameters()):  # held: one device buffer
            pack_on_device(part)
    left = [n for n, p in dit.named_parameters() if p.is_meta]
    if left:
        raise RuntimeError(f"random DiT: parameters left on the meta device: {left[:3]}")
    if residency is not None:
        dit.stream_layers(residency)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    info["seconds"] = time.perf_counter() - t0
    return dit, info


def apply_options(dit, args, device: torch.device) -> dict:
    """fp8 / attention backend / compile through the pipeline's own `apply_speed_options`."""
    from liveavatar.pipeline.speed import apply_speed_options

    from liveavatar.models.fp8 import FP8Linear, convert_to_fp8
    from liveavatar.options import precision_from_flags

    info: dict = {"compile_impl": None}
    t0 = time.perf_counter()
    scaling = info["fp8_scaling"] = precision_from_flags("bf16", args.fp8, args.fp8_scaling).fp8
    if scaling and any(isinstance(m, FP8Linear) for m in dit.modules()):  # converted while "loading"
        apply_speed_options(dit, attn=args.attn, fp8=False, compile=False, device=device)
    elif scaling and device.type == "cpu" and args.allow_cpu_fp8:
        convert_to_fp8(dit, allow_cpu=True, scaling=scaling)
        apply_speed_options(dit, attn=args.attn, fp8=False, compile=False, device=device)
    else:
        apply_speed_options(dit, attn=args.attn, fp8=scaling or False, compile=False, device=device)
    if getattr(dit, "attn_backend", args.attn) != args.attn:
        dit.attn_backend = args.attn  # the DiT exposes a property, not set_attention_backend()
    info["fp8_convert_s"] = time.perf_counter() - t0 if args.fp8 else 0.0
    if args.rope_dtype:
        if not hasattr(dit, "rope_compute_dtype"):
            raise BenchUsageError("--rope-dtype: this DiT has no rope_compute_dtype switch")
        dit.rope_compute_dtype = getattr(torch, args.rope_dtype)
    info["rope_dtype"] = str(getattr(dit, "rope_compute_dtype", "")).replace("torch.", "") or None
    if args.compile:
        from liveavatar.pipeline.speed import CUDA_GRAPHS_WITH_COMPILE

        dit.compile_blocks()
        info["compile_impl"] = "dit.compile_blocks"
        graphs = CUDA_GRAPHS_WITH_COMPILE if args.cuda_graphs is None else args.cuda_graphs
        if graphs and device.type == "cuda":
            dit.use_cuda_graphs()
    elif args.cuda_graphs:
        raise BenchUsageError("--cuda-graphs needs --compile")
    return info


def build_random_vae(device: torch.device, dtype: torch.dtype, seed: int, tiny: bool):
    """The streaming VAE (full size, or 8 base channels with --tiny) with seeded random weights."""
    from liveavatar.config import VAEConfig
    from liveavatar.models.vae import WanVAE, build_autoencoder

    cfg = VAEConfig(base_dim=8) if tiny else VAEConfig()
    model = build_autoencoder(cfg)
    benchlib.materialize_random_(model, device, dtype, seed=seed + 7)
    return WanVAE(model, cfg, device=device, dtype=dtype)


class BenchRun:
    """Everything one timed run needs (model, conditioning, plan); shapes in the comments."""

    def __init__(self, args, cfg, device, dtype):
        from liveavatar.config import DEFAULT_STREAM
        from liveavatar.sizes import parse_size

        self.stream = DEFAULT_STREAM
        size = benchlib.TINY_SIZE if args.tiny and args.size == "704*384" else args.size
        self.width, self.height = parse_size(size)
        s = self.stream
        self.hw = (self.height // s.vae_stride_hw, self.width // s.vae_stride_hw)
        self.warmup = s.blocks_per_clip if args.warmup is None else args.warmup
        self.total_blocks = self.warmup + args.blocks
        self.profile = bool(getattr(args, "profile", None)) and args.scope == "dit"
        g = torch.Generator(device="cpu").manual_seed(args.seed + 1)
        h, w = self.hw
        self.context = torch.randn(TEXT_TOKENS, cfg.text_dim, generator=g)  # [L, text_dim]
        self.ref = torch.randn(1, 16, 1, h, w, generator=g)  # [1, 16, 1, h, w]
        self.motion = torch.randn(1, 16, s.motion_frames_latent, h, w, generator=g)
        n_frames = (self.total_blocks + self.profile) * s.frames_per_block  # generated frames incl. lead-in
        # [1, layers, audio_dim, frames], drawn frame-major so frame k is the same for any length
        feats = torch.randn(n_frames, cfg.audio_num_layers, cfg.audio_dim, generator=g) * 0.5
        self.features = feats.permute(1, 2, 0).unsqueeze(0).contiguous()


__all__ = ["BenchRun", "BenchUsageError", "apply_options", "bench_config", "build_random_dit", "build_random_vae"]
