"""Random-weight engine for benchmarking worker groups (`python -m bench --gpus N`).

Same per-step code as `parallel.engine.LiveAvatarEngine` (it subclasses it: begin_clip,
initial_latents, run_steps and decode are inherited), but instead of loading a checkpoint and
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
        from liveavatar.pipeline.model import LiveAvatar, LoadOptions, resolve_dtype

        self.role = role
        args = self.args = build_parser().parse_args(list(config["bench_argv"]))
        device = torch.device(role.device)
        dtype = resolve_dtype(args.dtype or ("bf16" if device.type == "cuda" else "fp32"))
        self.cfg = bench_config(args)
        dit = vae = None
        if role.is_dit:
            dit, _ = build_random_dit(self.cfg, device, dtype, args.seed)
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
        from liveavatar.pipeline.generate import BlockDecoder, make_runner
        from liveavatar.pipeline.plan import make_plan

        m, args = self.model, self.args
        stream = m.stream
        run = BenchRun(args, self.cfg, m.device, m.opts.dtype)
        lead = 3
        self.steps, self.seed, self.sink_refresh, self.pose = args.steps, args.seed, True, None
        self.plan = make_plan(run.total_blocks * stream.frames_per_block - lead, stream, lead_in_frames=lead)
        wave = Audio16k(torch.zeros(self.plan.num_frames * stream.sample_rate // stream.fps))
        self.job = {"audio": wave}
        self.image = ImageConditioning(pixels=torch.zeros(1, 3, 1, run.height, run.width),
                                       width=run.width, height=run.height)
        self.ref = ReferenceLatents(ref=run.ref, motion=run.motion)
        self.audio = AudioConditioning(features=run.features, num_frames=self.plan.num_frames, audio=wave,
                                       lead_in_frames=lead)
        role = self.role.for_steps(self.steps)
        if role.is_dit:
            self.runner = make_runner(m, run.context, self.image, seed=self.seed, steps=self.steps,
                                      owned=list(role.steps))
            self.runner.prefill(run.ref, run.motion)
        if role.decodes:
            self.decoder = BlockDecoder(m.vae, run.motion.to(m.device))
        return JobPlan(self.plan.num_blocks, stream.blocks_per_clip,
                       (int(run.ref.shape[1]), stream.frames_per_block_latent, *run.hw), torch.float32,
                       refresh_sink=self.sink_refresh, num_steps=self.steps)


__all__ = ["RandomWeightsEngine"]
