"""The Live Avatar engine for worker ranks: `liveavatar.pipeline` behind the `tpp.Engine` protocol.

Every DiT rank loads the full model (DiT + umT5 + wav2vec2 + VAE) on its own device, encodes the
job's conditioning itself (as the reference does: no big tensors travel between ranks), and
builds a `liveavatar.pipeline.sampler.StepRunner` that owns only its own steps' KV caches. A
decode-only rank loads just the VAE and runs the same streaming `BlockDecoder` as in-process
generation. Block plan, noise and sink offsets are pure functions of (seed, audio length), so
every rank agrees without talking.

Engine spec for `GroupConfig.engine`: "parallel.engine:LiveAvatarEngine".

Load config (GroupConfig.engine_config), one of:
  {"ckpt_dir": str, "lora": str | None, ...}                  official folder
  {"files": {"dit", "t5", "vae", "wav2vec", "tokenizer_dir", "config"?, "lora"?}, ...}
plus options: "lora_strength" (1.0), "dtype" ("bf16"), "fp8", "attn" ("sdpa"), "compile".

Job (`make_job`): image (PIL image), audio (`Audio16k`), prompt, size, size_mode, seed, steps,
num_clip, sink_refresh, pose_cond (optional [1, 16, F_latent, h, w]) or pose_video (a path: each
DiT rank encodes it with its VAE, the same latents as `LiveAvatar.encode_pose`).
Frames: each decoded block arrives as a `liveavatar.pipeline.DecodedBlock` (uint8 frames
[n, H, W, 3] on the CPU + its audio), exactly what in-process `generate` yields.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Sequence

import torch

from parallel.schedule import MemoryNeed, Role
from parallel.tpp import JobPlan


def make_job(image: Any, audio: Any, prompt: str, *, size: str = "704*384", size_mode: str = "area",
             seed: int = 42, steps: int = 4, num_clip: int | None = None, sink_refresh: bool = True,
             pose_cond: torch.Tensor | None = None, pose_video: str | None = None) -> dict:
    """A job dict for `LiveAvatarEngine` (image: PIL image; audio: `Audio16k`; pose: latents or a
    video path, not both)."""
    if pose_cond is not None and pose_video is not None:
        raise ValueError("pose: give pose_cond (latents) or pose_video (a path), not both")
    return {"image": image, "audio": audio, "prompt": prompt, "size": size, "size_mode": size_mode,
            "seed": int(seed), "steps": int(steps), "num_clip": num_clip,
            "sink_refresh": bool(sink_refresh), "pose_cond": pose_cond, "pose_video": pose_video}


def memory_need(dit_config: Any, width: int, height: int, dtype: torch.dtype = torch.bfloat16,
                fp8: bool = False) -> MemoryNeed:
    """Per-rank GPU bytes for `parallel.schedule.auto_schedule`, from the pipeline's estimate.

    dit_config: the checkpoint's `DiTConfig`; width/height: output pixels.
    """
    from liveavatar.pipeline.memory import dit_param_counts, estimate_memory

    counts = dit_param_counts(dit_config)
    one = estimate_memory(dit_config, width, height, steps_owned=1, dtype=dtype, fp8=fp8,
                          decode_here=False, param_counts=counts)
    dec = estimate_memory(dit_config, width, height, steps_owned=0, dtype=dtype, fp8=fp8,
                          decode_here=True, param_counts=counts)
    return MemoryNeed(dit_bytes=one.total - one.step_caches, cache_bytes_per_step=one.step_caches,
                      decode_bytes=dec.total, margin_bytes=0)


class _Stopped(Exception):
    pass


def _load_vae_only(config: Mapping[str, Any], device: torch.device, dtype: torch.dtype) -> Any:
    if "files" in config:
        from liveavatar.loading.comfy_layout import infer_vae_config, open_single_file
        from liveavatar.models.vae import WanVAE

        src, _ = open_single_file(config["files"]["vae"], "vae")
        sd = {k: src.get(k) for k in src.keys()}
        return WanVAE.from_official_state_dict(sd, infer_vae_config(src), device=device, dtype=dtype)
    from liveavatar.loading.official import find_official_checkpoint, load_vae

    return load_vae(find_official_checkpoint(config["ckpt_dir"], lora=config.get("lora")), device, dtype)


class LiveAvatarEngine:
    """One rank's share of Live Avatar generation (see the module docstring)."""

    def load(self, config: Mapping[str, Any], role: Role) -> None:
        from liveavatar.pipeline.model import LiveAvatar, LoadOptions, resolve_dtype

        self.role = role
        device = torch.device(role.device)
        opts = dict(lora_strength=float(config.get("lora_strength", 1.0)),
                    device=device, dtype=config.get("dtype", "bf16"), fp8=config.get("fp8") or False,
                    attn=config.get("attn", "sdpa"), compile=bool(config.get("compile")))
        if role.is_dit:
            if "files" in config:
                files = dict(config["files"])
                self.model = LiveAvatar.from_files(**files, **opts)
            else:
                self.model = LiveAvatar.from_checkpoint(config["ckpt_dir"], lora=config.get("lora"), **opts)
        else:  # decode-only rank: the VAE is all it needs
            dtype = resolve_dtype(opts["dtype"])
            vae = _load_vae_only(config, device, dtype)
            self.model = LiveAvatar(None, vae, None, None, LoadOptions(device=device, dtype=dtype),
                                    source="vae only")
        self.runner = self.decoder = None

    def prepare(self, job: Mapping[str, Any]) -> JobPlan:
        from liveavatar.media.audio import num_video_frames
        from liveavatar.pipeline.generate import BlockDecoder, make_runner
        from liveavatar.pipeline.plan import make_plan

        m = self.model
        stream = m.stream
        self.job = job
        self.steps = int(job.get("steps", 4))
        self.seed = int(job.get("seed", 42))
        self.sink_refresh = bool(job.get("sink_refresh", True))
        self.pose = job.get("pose_cond")
        role = self.role.for_steps(self.steps)
        self.image = m.prepare_image(job["image"], job.get("size", "704*384"),
                                     size_mode=job.get("size_mode", "area"))
        self.ref = m.encode_reference(self.image)
        if role.is_dit:
            self.audio = m.encode_audio(job["audio"])
            num_frames, lead_in = self.audio.num_frames, self.audio.lead_in_frames
        else:
            self.audio = None
            num_frames, lead_in = num_video_frames(job["audio"], fps=stream.fps), 3
        self.plan = make_plan(num_frames, stream, num_clip=job.get("num_clip"), lead_in_frames=lead_in)
        if role.is_dit and self.pose is None and job.get("pose_video"):
            self.pose = m.encode_pose(job["pose_video"], self.image, num_frames, lead_in_frames=lead_in)
        if role.is_dit:
            context = m.encode_prompt(job.get("prompt", ""))
            self.runner = make_runner(m, context, self.image, seed=self.seed, steps=self.steps,
                                      owned=list(role.steps))
            self.runner.prefill(self.ref.ref, self.ref.motion)
        if role.decodes:
            self.decoder = BlockDecoder(m.vae, self.ref.motion.to(m.device))
        h, w = self.image.latent_hw
        channels = int(self.ref.ref.shape[1])
        return JobPlan(self.plan.num_blocks, stream.blocks_per_clip,
                       (channels, stream.frames_per_block_latent, h, w), torch.float32,
                       refresh_sink=self.sink_refresh, num_steps=self.steps)

    def _spec(self, clip: int, block: int) -> Any:
        return self.plan.blocks[clip * self.model.stream.blocks_per_clip + block]

    def begin_clip(self, clip: int, first_block: torch.Tensor | None) -> None:
        if clip == 1 and self.sink_refresh and first_block is not None:
            # Rolling sink: re-anchor on the first generated latent frame, motion unchanged.
            self.runner.prefill(first_block[:, 0:1].unsqueeze(0), self.ref.motion)

    def initial_latents(self, clip: int, block: int) -> torch.Tensor:
        from liveavatar.pipeline.plan import block_noise

        noise = block_noise(self.seed, self._spec(clip, block), self.image.latent_hw, self.model.stream)
        return noise.to(self.model.device)

    def run_steps(self, clip: int, block: int, x: torch.Tensor, steps: Sequence[int],
                  cancelled: Callable[[], bool]) -> torch.Tensor | None:
        from liveavatar.pipeline.sampler import BlockInputs

        if list(steps) != self.runner.steps:
            raise RuntimeError(f"rank {self.role.rank}: asked for steps {list(steps)}, "
                               f"its runner owns {self.runner.steps}")
        spec = self._spec(clip, block)
        cond = None
        if self.pose is not None:
            n = self.model.stream.frames_per_block_latent
            cond = self.pose[:, :, spec.start_frame:spec.start_frame + n]
        inputs = BlockInputs(audio=self.audio.block_features(spec), cond=cond)

        def on_step(_s: int) -> None:
            if cancelled():
                raise _Stopped

        try:
            return self.runner.run(x, spec, inputs, on_step=on_step)
        except _Stopped:
            return None

    def decode(self, clip: int, block: int, x: torch.Tensor) -> Any:
        from liveavatar.media.audio import slice_for_frames
        from liveavatar.pipeline.conditioning import DecodedBlock

        spec = self._spec(clip, block)
        t0 = time.perf_counter()
        frames = self.decoder.decode(spec, x.to(self.model.device))
        fps = self.model.stream.fps
        samples = slice_for_frames(self.job["audio"], spec.out_first_frame, frames.shape[0], fps=fps)
        return DecodedBlock(index=spec.index, total_blocks=self.plan.num_blocks,
                            first_frame=spec.out_first_frame, frames=frames, audio=samples, fps=fps,
                            timings={"decode": time.perf_counter() - t0})

    def end_job(self) -> None:
        self.runner = self.decoder = None
        if torch.device(self.role.device).type == "cuda":
            torch.cuda.empty_cache()

    def unload(self) -> None:
        self.model = None
        self.end_job()


__all__ = ["LiveAvatarEngine", "make_job", "memory_need"]
