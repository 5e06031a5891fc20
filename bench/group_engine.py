"""Random-weight engine for benchmarking worker groups (`python -m bench --gpus N`).

Same per-rank job as `parallel.engine.LiveAvatarEngine` (it subclasses it: the `RankJob` start,
begin_clip, initial_latents, run_steps and decode are inherited), but instead of loading a checkpoint and
encoding a prompt, audio and image, every rank builds the full-size (or `--tiny`) DiT / VAE with
the bench's seeded random weights and random conditioning (`bench.random_model`), so every rank
holds identical values without any file. Each rank parses the same bench argv as the controller.

Load config: {"bench_argv": [...]} (the `python -m bench` command line).
Job: {} (the block count, size, steps and seed come from the argv).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from bench.cli import build_parser
from bench.random_model import BenchRun, apply_options, bench_config, build_random_dit, build_random_vae
from parallel.engine import LiveAvatarEngine
from parallel.schedule import Role
from parallel.tpp import JobPlan


class RandomWeightsEngine(LiveAvatarEngine):
    """One rank of a benchmark group: random 14B (or tiny) weights, random conditioning."""

    def load(self, config: Mapping[str, Any], role: Role) -> None:
        from liveavatar.options import precision_from_flags
        from liveavatar.pipeline.model import LiveAvatar, LoadOptions, resolve_dtype

        self.role = role
        args = self.args = build_parser().parse_args(list(config["bench_argv"]))
        device = torch.device(role.device)
        dtype = resolve_dtype(args.dtype or ("bf16" if device.type == "cuda" else "fp32"))
        self.cfg = bench_config(args)
        dit = vae = None
        if role.is_dit:
            layers = role.layers(self.cfg.num_layers) if role.sliced else None  # a layer slice builds its layers only
            # fp8 per block while building, as loading converts (a late conversion of packed blocks
            # would hold each block twice until `repack_on_device`)
            scaling = precision_from_flags("bf16", args.fp8, args.fp8_scaling).fp8
            dit, _ = build_random_dit(self.cfg, device, dtype, args.seed, layers=layers, fp8=scaling,
                                      allow_cpu_fp8=args.allow_cpu_fp8)
            apply_options(dit, args, device)
        if role.decodes:
            vae = build_random_vae(device, dtype, args.seed, args.tiny)
            if args.compile and device.type == "cuda" and not args.no_compile_vae:
                vae.compile_decoder()
        self.model = LiveAvatar(dit, vae, None, None,
                                LoadOptions(device=device, dtype=dtype, attn=args.attn, compile=args.compile),
                                source="random weights (bench)")
        self.runner = self.decoder = None

    def prepare(self, job: Mapping[str, Any]) -> JobPlan:
        from liveavatar.media.audio import Audio16k
        from liveavatar.pipeline.conditioning import AudioConditioning, ImageConditioning, ReferenceLatents
        from liveavatar.pipeline.job import JobOptions

        m, args = self.model, self.args
        stream = m.stream
        run = BenchRun(args, self.cfg, m.device, m.opts.dtype)
        lead = stream.lead_in_frames
        num_frames = run.total_blocks * stream.frames_per_block - lead
        wave = Audio16k(torch.zeros(num_frames * stream.sample_rate // stream.fps))
        image = ImageConditioning(pixels=torch.zeros(1, 3, 1, run.height, run.width),
                                  width=run.width, height=run.height)
        audio = AudioConditioning(features=run.features, num_frames=num_frames, audio=wave, lead_in_frames=lead)
        from liveavatar.options import CachePolicy

        cache = CachePolicy.from_choices(args.kv_offload, args.kv_prefetch, args.kv_dtype)
        options = JobOptions(seed=args.seed, steps=args.steps, sink_refresh=True, cache=cache)
        return self.start_job(options, image, wave, audio=audio, context=run.context,
                              reference=ReferenceLatents(ref=run.ref, motion=run.motion))


__all__ = ["RandomWeightsEngine"]
