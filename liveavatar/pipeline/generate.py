"""In-process generation: one rank that owns every step, streaming decoded blocks.

A thin driver over `pipeline.job.RankJob`, the per-rank job state the TPP worker ranks
(`parallel/engine.py`) drive too; they only split the step indices over ranks and move block
latents between them.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterator

import torch

from liveavatar.options import CachePolicy
from liveavatar.pipeline.conditioning import (
    AudioConditioning, DecodedBlock, GenerationCancelled, ImageConditioning, ReferenceLatents,
)
from liveavatar.pipeline.job import JobOptions, RankJob
from liveavatar.pipeline.plan import BlockSpec

log = logging.getLogger("liveavatar")

# overlap_decode=None on CUDA. Measured on H100 (fp8 + compile, 704*384, end to end): 953.6 ms/block
# serial vs 931.7 overlapped (12.58 -> 12.88 FPS): both halves are compute-bound, so the decode
# mostly stretches the DiT (GPU span 738 -> 933 ms). Off until the gain is worth a second thread.
OVERLAP_DEFAULT_CUDA = False


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
             kv_prefetch: bool | None = None, kv_fp8: bool = False) -> Iterator[DecodedBlock]:
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
    kv_fp8: step and sink KV caches stored as fp8 with a per-(token, head) scale (about half the
    cache bytes; `liveavatar.options.resolve_kv_dtype`).
    """
    cuda = model.device.type == "cuda"
    if overlap_decode and not cuda:
        raise ValueError(f"overlap_decode=True needs a CUDA model (this one is on {model.device}); "
                         "pass overlap_decode=False or None")
    overlap = (cuda and OVERLAP_DEFAULT_CUDA) if overlap_decode is None else bool(overlap_decode)
    options = JobOptions(seed=seed, steps=steps, num_clip=num_clip, sink_refresh=sink_refresh,
                         cache=CachePolicy(kv_offload, kv_prefetch, bool(kv_fp8)))
    job = RankJob(model, options, image, audio.audio, audio=audio, context=context, pose_cond=pose_cond,
                  reference=reference)
    plan, fps = job.plan, model.stream.fps
    log.info("effective size %dx%d, %d frames (%.2f s) in %d blocks, %d steps, seed %d",
             image.width, image.height, plan.num_frames, plan.num_frames / fps, plan.num_blocks, steps, seed)
    _check(cancel)
    job.start(decoder=not overlap)

    def dit_blocks(stopped: Callable[[], bool] | None = None) -> Iterator[tuple[BlockSpec, torch.Tensor]]:
        poll = cancel if stopped is None else (lambda: stopped() or (cancel is not None and cancel()))
        return _dit_blocks(job, progress=progress, cancel=poll)

    def emit(block: BlockSpec, frames: torch.Tensor, timings: dict) -> DecodedBlock:
        out = job.emit(block, frames, timings)
        if progress is not None:
            progress({"event": "block", "block": block.index, "total_blocks": plan.num_blocks,
                      "frames": out.frames.shape[0], "timings": out.timings})
        return out

    if overlap:
        from liveavatar.pipeline.overlap import overlapped_decode

        decoded = overlapped_decode(dit_blocks, lambda: job.new_decoder().decode, model.device)
        try:
            for block, frames, timings in decoded:
                _check(cancel)  # the DiT thread may be a block ahead: hand out nothing after a cancel
                yield emit(block, frames, timings)
        finally:  # closing this generator early must stop and join the DiT thread now, not at GC
            decoded.close()
        return
    t0 = time.perf_counter()
    for block, x in dit_blocks():
        if cuda:
            torch.cuda.synchronize(model.device)
        t1 = time.perf_counter()
        frames = job.decode(block, x)
        t2 = time.perf_counter()
        yield emit(block, frames, {"dit": t1 - t0, "decode": t2 - t1})
        t0 = time.perf_counter()


def _dit_blocks(job: RankJob, *, progress: Callable[[dict], None] | None,
                cancel: Callable[[], bool] | None) -> Iterator[tuple[BlockSpec, torch.Tensor]]:
    """The DiT block loop of a rank owning every step: yields (block, final latents x
    [16, n, h, w] float32 on the device)."""
    first_block = None
    steps, total = job.options.steps, job.plan.num_blocks
    for block in job.plan.blocks:
        _check(cancel)
        if block.block_in_clip == 0:
            job.begin_clip(block.clip, first_block)

        def on_step(s: int, _b: BlockSpec = block) -> None:
            if progress is not None:
                progress({"event": "step", "block": _b.index, "step": s, "steps": steps, "total_blocks": total})
            _check(cancel)

        x = job.run(block, job.noise(block), on_step=on_step)
        if block.index == 0:
            first_block = x.clone()
        yield block, x
