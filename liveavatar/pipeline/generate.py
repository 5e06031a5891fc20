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

# overlap_decode=None on CUDA. Measured on H100 (fp8 + compile, 704*384, end to end): 953.6 ms/block
# serial vs 931.7 overlapped (12.58 -> 12.88 FPS): both halves are compute-bound, so the decode
# mostly stretches the DiT (GPU span 738 -> 933 ms). Off until the gain is worth a second thread.
OVERLAP_DEFAULT_CUDA = False


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
                owned: list[int] | None = None, kv_offload: bool | None = None,
                kv_prefetch: bool | None = None) -> StepRunner:
    """A StepRunner on the model's device owning `owned` steps (all by default); `kv_offload`,
    `kv_prefetch` as `StepRunner` (offload None: only when the caches do not fit)."""
    stream = model.stream
    schedule = make_schedule(steps, stream)
    owned = list(range(steps)) if owned is None else owned
    with torch.no_grad():
        text = model.dit.encode_text(context.to(model.device, model.dtype))
    return StepRunner(model.dit, text, image.latent_hw, schedule, owned, stream, seed,
                      device=model.device, dtype=model.dtype, kv_offload=kv_offload, kv_prefetch=kv_prefetch)


def _check(cancel: Callable[[], bool] | None) -> None:
    if cancel is not None and cancel():
        raise GenerationCancelled("generation cancelled")


def generate(model, context: torch.Tensor, audio: AudioConditioning, image: ImageConditioning, *,
             seed: int = 0, steps: int = 4, num_clip: int | None = None,
             pose_cond: torch.Tensor | None = None, sink_refresh: bool = True,
             progress: Callable[[dict], None] | None = None,
             cancel: Callable[[], bool] | None = None,
             reference: ReferenceLatents | None = None,
             overlap_decode: bool | None = None, kv_offload: bool | None = None,
             kv_prefetch: bool | None = None) -> Iterator[DecodedBlock]:
    """Yield every decoded block of the avatar video, in order, as soon as it is decoded.

    context: umT5 context [L, text_dim]. audio / image: from `model.encode_audio` /
    `model.prepare_image`. seed: noise and sink offsets (same seed, same video). steps: 3, 4
    (trained) or 5. num_clip: cap on 48-frame clips (None = until the audio ends).
    pose_cond: optional pose latents [1, 16, F_latent, h, w] covering the generated frames.
    sink_refresh: the Rolling Sink Frame refresh at clip 1 (reference behaviour, on by default).
    progress: called with {"event": "step"|"block", ...}; with overlap_decode the step events
    come from the DiT thread. cancel: polled between steps (also from that thread).
    overlap_decode: decode block b on a side CUDA stream while the DiT runs block b+1 in a
    producer thread (`overlap.py`); None = `OVERLAP_DEFAULT_CUDA` on CUDA (off for now: +2.3 % on
    H100), off elsewhere; True on a CPU model is an error. Timings per block: {"dit", "decode"} seconds (GPU event spans when overlapped).
    kv_offload: keep the step KV caches in host memory, one on the GPU at a time (True), never
    (False), or None: only when all of them do not fit the GPU (then logged; slower: each step
    pages one clip of keys/values in, e.g. 9.7 GiB at 704x384). kv_prefetch: with offload, a
    second device buffer so that the next step's page-in overlaps this step's compute; None (the
    default): whenever that buffer fits (704x384 fp8 on an H100: 9.1 instead of 6.9 FPS for
    +7.2 GiB), True: asked for (a log line when it does not fit), False: never.
    """
    stream = model.stream
    plan: JobPlan = make_plan(audio.num_frames, stream, num_clip=num_clip, lead_in_frames=audio.lead_in_frames)
    cuda = model.device.type == "cuda"
    if overlap_decode and not cuda:
        raise ValueError(f"overlap_decode=True needs a CUDA model (this one is on {model.device}); "
                         "pass overlap_decode=False or None")
    overlap = (cuda and OVERLAP_DEFAULT_CUDA) if overlap_decode is None else bool(overlap_decode)
    log.info("effective size %dx%d, %d frames (%.2f s) in %d blocks, %d steps, seed %d",
             image.width, image.height, plan.num_frames, plan.num_frames / stream.fps,
             plan.num_blocks, steps, seed)
    _check(cancel)
    if cuda:
        kv_offload, kv_prefetch = _check_memory(model, image, steps, kv_offload, kv_prefetch)
    ref = reference or model.encode_reference(image)
    runner = make_runner(model, context, image, seed=seed, steps=steps, kv_offload=kv_offload,
                         kv_prefetch=kv_prefetch)
    runner.prefill(ref.ref, ref.motion)

    def dit_blocks(stopped: Callable[[], bool] | None = None) -> Iterator[tuple[BlockSpec, torch.Tensor]]:
        poll = cancel if stopped is None else (lambda: stopped() or (cancel is not None and cancel()))
        return _dit_blocks(runner, plan, ref, audio, image, seed=seed, steps=steps, pose_cond=pose_cond,
                           sink_refresh=sink_refresh, progress=progress, cancel=poll)

    def emit(block: BlockSpec, frames: torch.Tensor, timings: dict) -> DecodedBlock:
        out = _emit(block, frames, audio, plan, stream.fps, timings)
        if progress is not None:
            progress({"event": "block", "block": block.index, "total_blocks": plan.num_blocks,
                      "frames": out.frames.shape[0], "timings": out.timings})
        return out

    if overlap:
        from liveavatar.pipeline.overlap import overlapped_decode

        def make_decoder():
            return BlockDecoder(model.vae, ref.motion.to(model.device)).decode

        decoded = overlapped_decode(dit_blocks, make_decoder, model.device)
        try:
            for block, frames, timings in decoded:
                _check(cancel)  # the DiT thread may be a block ahead: hand out nothing after a cancel
                yield emit(block, frames, timings)
        finally:  # closing this generator early must stop and join the DiT thread now, not at GC
            decoded.close()
        return
    decoder = BlockDecoder(model.vae, ref.motion.to(model.device))
    t0 = time.perf_counter()
    for block, x in dit_blocks():
        if cuda:
            torch.cuda.synchronize(model.device)
        t1 = time.perf_counter()
        frames = decoder.decode(block, x.to(model.device))
        t2 = time.perf_counter()
        yield emit(block, frames, {"dit": t1 - t0, "decode": t2 - t1})
        t0 = time.perf_counter()


def _check_memory(model, image: ImageConditioning, steps: int, kv_offload: bool | None,
                  kv_prefetch: bool | None = None) -> tuple[bool, bool]:
    """Preflight on CUDA before any cache exists (`memory.plan_kv_offload`): raise MemoryError
    with the numbers and remedies, or decide the KV offload and its prefetch."""
    from liveavatar.pipeline.memory import (GIB, available_host_bytes, estimate_memory, host_cache_bytes,
                                            plan_kv_offload)

    cfg, stream, w, h = model.dit.cfg, model.stream, image.width, image.height
    ests = [estimate_memory(cfg, w, h, steps_owned=steps, dtype=model.dtype, stream=stream,
                            param_counts=(0, 0), kv_offload=off) for off in (False, True)]  # weights resident
    host = host_cache_bytes(cfg, w, h, steps, model.dtype, stream)
    free, total = torch.cuda.mem_get_info(model.device)
    offload, prefetch = plan_kv_offload(ests[0], ests[1], host, free=free, total=total,
                                        host_available=available_host_bytes(), steps=steps,
                                        kv_offload=kv_offload, kv_prefetch=kv_prefetch, device=model.device,
                                        what=f"generating at {w}x{h} with {steps} step caches")
    if offload:
        if kv_prefetch and not prefetch:
            log.info("KV prefetch off: its second %.1f GiB buffer does not fit", ests[1].step_caches / GIB)
        log.info("KV caches offloaded to host memory (%.1f GiB; %d step cache(s) of %.1f GiB on the GPU): "
                 "slower, but fits", host / GIB, 2 if prefetch else 1, host / steps / GIB)
    return offload, prefetch


def _dit_blocks(runner: StepRunner, plan: JobPlan, ref: ReferenceLatents, audio: AudioConditioning,
                image: ImageConditioning, *, seed: int, steps: int, pose_cond: torch.Tensor | None,
                sink_refresh: bool, progress: Callable[[dict], None] | None,
                cancel: Callable[[], bool] | None) -> Iterator[tuple[BlockSpec, torch.Tensor]]:
    """The DiT block loop: yields (block, final latents x [16, n, h, w] float32 on the device)."""
    stream = runner.stream
    first_latent = None
    n_lat = stream.frames_per_block_latent
    for block in plan.blocks:
        _check(cancel)
        if sink_refresh and block.clip == 1 and block.block_in_clip == 0 and first_latent is not None:
            runner.prefill(first_latent, ref.motion)  # Rolling Sink: re-anchor on the first generated frame
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
        yield block, x


def _emit(block: BlockSpec, frames: torch.Tensor, audio: AudioConditioning, plan: JobPlan, fps: int,
          timings: dict) -> DecodedBlock:
    from liveavatar.media.audio import slice_for_frames

    n = frames.shape[0]
    samples = slice_for_frames(audio.audio, block.out_first_frame, n, fps=fps)
    return DecodedBlock(index=block.index, total_blocks=plan.num_blocks, first_frame=block.out_first_frame,
                        frames=frames, audio=samples, fps=fps, timings=timings)
