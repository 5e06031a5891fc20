"""In-process generation: the block loop on one device, streaming decoded blocks.

The same `StepRunner` is used by the TPP worker group (`parallel/`), which only splits the step
indices over ranks and moves block latents between them.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterator

import torch

from liveavatar.pipeline.conditioning import (
    AudioConditioning, DecodedBlock, GenerationCancelled, ImageConditioning, ReferenceLatents,
)
from liveavatar.pipeline.plan import BlockSpec, JobPlan, block_noise, make_plan
from liveavatar.pipeline.sampler import BlockInputs, StepRunner, make_schedule

log = logging.getLogger("liveavatar")


def frames_to_uint8(video: torch.Tensor) -> torch.Tensor:
    """[1, 3, n, H, W] in [-1, 1] -> uint8 [n, H, W, 3] on the CPU."""
    x = ((video[0].float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).contiguous().cpu()


class BlockDecoder:
    """Online decode: a streaming VAE decoder warmed with the motion history, as the reference.

    decode(block, x) turns the block's final latents [16, n, h, w] into the written frames.
    """

    def __init__(self, vae, motion_latents: torch.Tensor, warm_latents: int = 7):
        self.vae = vae
        self.decoder = vae.streaming_decoder()
        # The reference decodes the first 7 motion latents (25 frames) and discards them, so the
        # causal caches hold the reference before the first generated block.
        self.decoder.decode(motion_latents[:, :, :warm_latents])

    @torch.no_grad()
    def decode(self, block: BlockSpec, x: torch.Tensor) -> torch.Tensor:
        video = self.decoder.decode(x.unsqueeze(0))  # [1, 3, 4n, H, W]
        k0, k1 = block.keep
        return frames_to_uint8(video[:, :, k0:k1])


def make_runner(model, context: torch.Tensor, image: ImageConditioning, *, seed: int, steps: int,
                owned: list[int] | None = None) -> StepRunner:
    """A StepRunner on the model's device owning `owned` steps (all by default)."""
    stream = model.stream
    schedule = make_schedule(steps, stream)
    owned = list(range(steps)) if owned is None else owned
    with torch.no_grad():
        text = model.dit.encode_text(context.to(model.device, model.dtype))
    return StepRunner(model.dit, text, image.latent_hw, schedule, owned, stream, seed,
                      device=model.device, dtype=model.dtype)


def _check(cancel: Callable[[], bool] | None) -> None:
    if cancel is not None and cancel():
        raise GenerationCancelled("generation cancelled")


def generate(model, context: torch.Tensor, audio: AudioConditioning, image: ImageConditioning, *,
             seed: int = 0, steps: int = 4, num_clip: int | None = None,
             pose_cond: torch.Tensor | None = None, sink_refresh: bool = True,
             progress: Callable[[dict], None] | None = None,
             cancel: Callable[[], bool] | None = None,
             reference: ReferenceLatents | None = None) -> Iterator[DecodedBlock]:
    """Yield every decoded block of the avatar video, in order, as soon as it is decoded.

    context: umT5 context [L, text_dim]. audio / image: from `model.encode_audio` /
    `model.prepare_image`. seed: noise and sink offsets (same seed, same video). steps: 3, 4
    (trained) or 5. num_clip: cap on 48-frame clips (None = until the audio ends).
    pose_cond: optional pose latents [1, 16, F_latent, h, w] covering the generated frames.
    sink_refresh: the Rolling Sink Frame refresh at clip 1 (reference behaviour, on by default).
    progress: called with {"event": "step"|"block", ...}. cancel: polled between steps.
    """
    stream = model.stream
    plan: JobPlan = make_plan(audio.num_frames, stream, num_clip=num_clip, lead_in_frames=audio.lead_in_frames)
    log.info("effective size %dx%d, %d frames (%.2f s) in %d blocks, %d steps, seed %d",
             image.width, image.height, plan.num_frames, plan.num_frames / stream.fps,
             plan.num_blocks, steps, seed)
    _check(cancel)
    if model.device.type == "cuda":
        from liveavatar.pipeline.memory import check_fits, estimate_memory

        est = estimate_memory(model.dit.cfg, image.width, image.height, steps_owned=steps, dtype=model.dtype,
                              stream=stream, param_counts=(0, 0))  # weights are already resident
        check_fits(model.device, est, f"generating at {image.width}x{image.height} with {steps} step caches")
    ref = reference or model.encode_reference(image)
    runner = make_runner(model, context, image, seed=seed, steps=steps)
    runner.prefill(ref.ref, ref.motion)
    decoder = BlockDecoder(model.vae, ref.motion.to(model.device))
    first_latent = None
    n_lat = stream.frames_per_block_latent
    for block in plan.blocks:
        _check(cancel)
        if sink_refresh and block.clip == 1 and block.block_in_clip == 0 and first_latent is not None:
            runner.prefill(first_latent, ref.motion)  # Rolling Sink: re-anchor on the first generated frame
        t0 = time.perf_counter()
        x = block_noise(seed, block, image.latent_hw, stream)
        cond = None
        if pose_cond is not None:
            cond = pose_cond[:, :, block.start_frame:block.start_frame + n_lat]
        inputs = BlockInputs(audio=audio.block_features(block), cond=cond)

        def on_step(s: int, _b: BlockSpec = block) -> None:
            if progress is not None:
                progress({"event": "step", "block": _b.index, "step": s, "steps": steps,
                          "total_blocks": plan.num_blocks})
            _check(cancel)

        x = runner.run(x, block, inputs, on_step=on_step)
        if block.index == 0:
            first_latent = x[:, 0:1].unsqueeze(0).clone()
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        t1 = time.perf_counter()
        frames = decoder.decode(block, x.to(model.device))
        t2 = time.perf_counter()
        out = _emit(block, frames, audio, plan, stream.fps, {"dit": t1 - t0, "decode": t2 - t1})
        if progress is not None:
            progress({"event": "block", "block": block.index, "total_blocks": plan.num_blocks,
                      "frames": out.frames.shape[0], "timings": out.timings})
        yield out


def _emit(block: BlockSpec, frames: torch.Tensor, audio: AudioConditioning, plan: JobPlan, fps: int,
          timings: dict) -> DecodedBlock:
    from liveavatar.media.audio import slice_for_frames

    n = frames.shape[0]
    samples = slice_for_frames(audio.audio, block.out_first_frame, n, fps=fps)
    return DecodedBlock(index=block.index, total_blocks=plan.num_blocks, first_frame=block.out_first_frame,
                        frames=frames, audio=samples, fps=fps, timings=timings)
