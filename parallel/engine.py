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
plus options, resolved by the parent (`liveavatar.options`): "lora_strength" (1.0), "dtype" ("bf16"),
"fp8" (the scaling, "tensor" / "row", or None), "attn" ("sdpa"), "compile".

Job (`make_job`): image (PIL image), audio (`Audio16k`), prompt, size (an `OutputSize`, resolved
once in the parent), seed, steps, num_clip, sink_refresh, cache (`CachePolicy`), pose_cond
(optional [1, 16, F_latent, h, w]) or pose_video (a path: each DiT rank encodes it with its VAE,
the same latents as `LiveAvatar.encode_pose`).
Each rank drives a `liveavatar.pipeline.job.RankJob`, the per-rank job state in-process
`generate` drives too. Frames: each decoded block arrives as a `DecodedBlock` (uint8 frames
[n, H, W, 3] on the CPU + its audio), exactly what in-process `generate` yields.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Sequence

import torch

from liveavatar.options import CachePolicy
from liveavatar.sizes import DEFAULT_MODE as DEFAULT_SIZE_MODE
from liveavatar.sizes import OutputSize, resolve_size
from parallel.schedule import MemoryNeed, Role
from parallel.tpp import JobPlan


def make_job(image: Any, audio: Any, prompt: str, *, size: "OutputSize | str" = "704*384",
             size_mode: str = DEFAULT_SIZE_MODE, seed: int = 42, steps: int = 4, num_clip: int | None = None,
             sink_refresh: bool = True, pose_cond: torch.Tensor | None = None, pose_video: str | None = None,
             cache: CachePolicy = CachePolicy()) -> dict:
    """A job dict for `LiveAvatarEngine` (image: PIL image; audio: `Audio16k`; pose: latents or a
    video path, not both). size: an `OutputSize`, or a size text resolved here, once, with
    `size_mode` (the ranks never resolve it again)."""
    if pose_cond is not None and pose_video is not None:
        raise ValueError("pose: give pose_cond (latents) or pose_video (a path), not both")
    return {"image": image, "audio": audio, "prompt": prompt, "size": resolve_size(image.size, size, size_mode),
            "seed": int(seed), "steps": int(steps), "num_clip": num_clip, "sink_refresh": bool(sink_refresh),
            "cache": cache, "pose_cond": pose_cond, "pose_video": pose_video}


def memory_need(dit_config: Any, width: int, height: int, dtype: torch.dtype = torch.bfloat16,
                fp8: bool = False) -> MemoryNeed:
    """Per-rank GPU bytes for `parallel.schedule.auto_schedule`, from the pipeline's estimate.

    dit_config: the checkpoint's `DiTConfig`; width/height: output pixels. `layer_bytes` (what
    scales with the layers a slice holds) = all layers' weights + sink + text state, where the
    weights outside the layers come from two slices that together hold every layer once.
    """
    from liveavatar.pipeline.memory import dit_param_counts, dit_weight_bytes, estimate_memory

    counts = dit_param_counts(dit_config)
    one = estimate_memory(dit_config, width, height, steps_owned=1, dtype=dtype, fp8=fp8,
                          decode_here=False, param_counts=counts)
    dec = estimate_memory(dit_config, width, height, steps_owned=0, dtype=dtype, fp8=fp8,
                          decode_here=True, param_counts=counts)
    n = dit_config.num_layers
    base = one.weights
    if n > 1:  # weights(0..1) + weights(1..n) - weights(all) = the weights no layer owns
        base = sum(dit_weight_bytes(dit_config, dtype, fp8, layers=r) for r in (range(0, 1), range(1, n))) - one.weights
    return MemoryNeed(dit_bytes=one.total - one.step_caches, cache_bytes_per_step=one.step_caches,
                      decode_bytes=dec.total, margin_bytes=0,
                      layer_bytes=one.weights - base + one.sink_cache + one.text_state, num_layers=n)


def dit_num_layers(config: Mapping[str, Any]) -> int:
    """The DiT's layer count for an engine config (config.json, or the layers in the DiT file),
    read before loading so that a layer split is checked (and planned) without the weights."""
    from liveavatar.config import DiTConfig

    if "files" in config:
        files = config["files"]
        if files.get("config"):
            return DiTConfig.from_json(files["config"]).num_layers
        from liveavatar.loading.comfy_layout import open_single_file

        src, _ = open_single_file(files["dit"], "dit")
        return len({k.split(".")[1] for k in src.keys() if k.startswith("blocks.")})
    from liveavatar.loading.official import find_official_checkpoint

    return find_official_checkpoint(config["ckpt_dir"], lora=config.get("lora")).config.num_layers


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
                    attn=config.get("attn", "sdpa"), compile=bool(config.get("compile")),
                    weights="resident")  # a rank's layers stay on its GPU (placement planned for one device)
        if role.is_dit:
            layers = role.layers(dit_num_layers(config)) if role.sliced else None  # a slice loads only its layers
            if "files" in config:
                files = dict(config["files"])
                self.model = LiveAvatar.from_files(**files, **opts, layers=layers)
            else:
                self.model = LiveAvatar.from_checkpoint(config["ckpt_dir"], lora=config.get("lora"), **opts,
                                                        layers=layers)
        else:  # decode-only rank: the VAE is all it needs
            dtype = resolve_dtype(opts["dtype"])
            vae = _load_vae_only(config, device, dtype)
            self.model = LiveAvatar(None, vae, None, None, LoadOptions(device=device, dtype=dtype),
                                    source="vae only")
        self.job = None

    def prepare(self, job: Mapping[str, Any]) -> JobPlan:
        from liveavatar.pipeline.job import JobOptions

        m = self.model
        options = JobOptions(seed=int(job.get("seed", 42)), steps=int(job.get("steps", 4)),
                             num_clip=job.get("num_clip"), sink_refresh=bool(job.get("sink_refresh", True)),
                             cache=job.get("cache") or CachePolicy())
        role = self.role.for_steps(options.steps)
        image = m.prepare_image(job["image"], job["size"])  # an OutputSize: not resolved again
        audio = context = None
        pose = job.get("pose_cond")
        if role.is_dit:
            audio = m.encode_audio(job["audio"])
            context = m.encode_prompt(job.get("prompt", ""))
            if pose is None and job.get("pose_video"):
                pose = m.encode_pose(job["pose_video"], image, audio.num_frames, lead_in_frames=audio.lead_in_frames)
        return self.start_job(options, image, job["audio"], audio=audio, context=context, pose_cond=pose)

    def start_job(self, options: Any, image: Any, wave: Any, **conditioning: Any) -> JobPlan:
        """Build and start this rank's `RankJob` (its share of `options.steps`; conditioning: the
        `RankJob` keywords audio, context, pose_cond, reference) and return the group's `JobPlan`."""
        from liveavatar.pipeline.job import RankJob

        m = self.model
        role = self.role.for_steps(options.steps)
        self.job = RankJob(m, options, image, wave, owned=role.steps if role.is_dit else (),
                           decodes=role.decodes, **conditioning).start(prefill=not role.sliced)
        self._block_inputs: dict = {}
        h, w = image.latent_hw
        fsl, dim = (h // 2) * (w // 2), int(m.dit.cfg.dim) if m.dit is not None else 0
        sink = m.dit.sink_tokens((h, w)) if m.dit is not None else 0
        return JobPlan(self.job.plan.num_blocks, m.stream.blocks_per_clip,
                       (int(self.job.ref.ref.shape[1]), m.stream.frames_per_block_latent, h, w), torch.float32,
                       refresh_sink=options.sink_refresh, num_steps=options.steps,
                       hidden_shape=(1, m.stream.frames_per_block_latent * fsl, dim), sink_hidden_shape=(1, sink, dim),
                       hidden_dtype=m.dtype)

    def begin_clip(self, clip: int, first_block: torch.Tensor | None) -> None:
        self.job.begin_clip(clip, first_block)

    def initial_latents(self, clip: int, block: int) -> torch.Tensor:
        return self.job.noise(self.job.block(clip, block)).to(self.model.device)

    def run_steps(self, clip: int, block: int, x: torch.Tensor, steps: Sequence[int],
                  cancelled: Callable[[], bool]) -> torch.Tensor | None:
        if list(steps) != self.job.owned:
            raise RuntimeError(f"rank {self.role.rank}: asked for steps {list(steps)}, "
                               f"its runner owns {self.job.owned}")

        def on_step(_s: int) -> None:
            if cancelled():
                raise _Stopped

        try:
            return self.job.run(self.job.block(clip, block), x, on_step=on_step)
        except _Stopped:
            return None

    # -- layer slices (parallel.slices): one sink prefill or one (block, step) on this rank's layers
    def slice_prefill(self, phase: int, first_block: torch.Tensor | None,
                      hidden: torch.Tensor | None) -> torch.Tensor | None:
        """(Re)fill this slice's sink: phase 0 from the reference, 1 (the refresh at clip 1) from
        block 0's final latents `[16, F, h, w]` (the first slice embeds; others take `hidden`).
        Returns the tokens for the next slice (None on the last)."""
        r, ref = self.job.runner, self.job.ref
        r.sink.reset()
        latents = (None, None)
        if r.dit.first_slice:
            anchor = ref.ref if phase == 0 else first_block[:, 0:1].unsqueeze(0)
            latents = (anchor.to(r.device, r.dtype), ref.motion.to(r.device, r.dtype))
        with torch.no_grad():
            return r.dit.prefill_sink(*latents, r.text, r.sink, hidden=hidden)

    @torch.no_grad()
    def slice_step(self, clip: int, block: int, step: int, x: torch.Tensor,
                   hidden: torch.Tensor | None) -> torch.Tensor:
        """Denoising step `step` of a block on this slice's layers: x `[16, F, h, w]` (float32,
        the block latents before the step), hidden: the previous slice's tokens (None on the
        first). Returns the tokens for the next slice, or on the last slice the new x (float32)
        after the Euler step, as `StepRunner.run` computes it."""
        from liveavatar.pipeline.plan import sink_offsets
        from liveavatar.scheduler import euler_step

        spec, r = self.job.block(clip, block), self.job.runner
        got = self._block_inputs.get(spec.index)
        if got is None:  # the block's audio tokens and pose, once for all its steps
            inputs = self.job.inputs(spec)
            audio = inputs.audio.to(r.device, r.dtype)
            cond = None if inputs.cond is None else inputs.cond.to(r.device, r.dtype)
            got = (audio, cond, r.dit.encode_audio(audio), sink_offsets(r.seed, spec.index, r.num_steps, r.stream))
            self._block_inputs = {b: v for b, v in self._block_inputs.items() if b > spec.index - r.num_steps}
            self._block_inputs[spec.index] = got
        audio, cond, tokens, offsets = got
        x = x.to(r.device, torch.float32)
        cache = r.caches[step]
        cache.page_in()  # offload: this step's rows in
        out = r.dit.forward_block(x.to(r.dtype), float(r.schedule.timesteps[step]), r.text, audio, cond, cache,
                                  r.sink, start_frame=spec.start_frame, sink_offset=offsets[step], audio=tokens,
                                  hidden=None if hidden is None else hidden.to(r.device))
        cache.page_out()
        if not r.dit.last_slice:
            return out
        sig = r.schedule.sigmas
        return euler_step(x, out.float(), float(sig[step]), float(sig[step + 1]))

    def decode(self, clip: int, block: int, x: torch.Tensor) -> Any:
        spec = self.job.block(clip, block)
        t0 = time.perf_counter()
        frames = self.job.decode(spec, x)
        return self.job.emit(spec, frames, {"decode": time.perf_counter() - t0})

    def end_job(self) -> None:
        if getattr(self, "job", None) is not None:
            self.job.close()
        self.job = None
        if torch.device(self.role.device).type == "cuda":
            torch.cuda.empty_cache()

    def unload(self) -> None:
        self.model = None
        self.end_job()


__all__ = ["LiveAvatarEngine", "make_job", "memory_need", "dit_num_layers"]
