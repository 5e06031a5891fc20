"""One job's state on one rank: `RankJob`, shared by in-process `generate` and the worker ranks.

In-process generation (`pipeline.generate`) is one rank that owns every denoising step and
decodes; a worker rank (`parallel.engine`) owns some steps, or only decodes. Both build a
`RankJob` and drive it: the plan, the reference latents, the memory preflight, the runner of the
owned steps, the clip boundaries (the Rolling Sink refresh at clip 1), block noise, the block's
conditioning (audio features, pose slice), the decoder and the decoded blocks all live here.
Everything is a pure function of the job inputs and the seed, so every rank agrees without talking.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from liveavatar.options import CachePolicy
from liveavatar.pipeline.conditioning import AudioConditioning, DecodedBlock, ImageConditioning, ReferenceLatents
from liveavatar.pipeline.memory import CachePlan
from liveavatar.pipeline.plan import BlockPlan, BlockSpec, block_noise, make_plan
from liveavatar.pipeline.sampler import BlockInputs, StepRunner, make_schedule

log = logging.getLogger("liveavatar")


@dataclass(frozen=True)
class JobOptions:
    """The resolved per-job options, identical on every rank.

    seed: noise and sink offsets (same seed, same video). steps: 3, 4 (trained) or 5.
    num_clip: cap on 48-frame clips (None = until the audio ends). sink_refresh: the Rolling Sink
    Frame refresh at clip 1 (reference behaviour). cache: where the step KV caches live.
    """

    seed: int = 42
    steps: int = 4
    num_clip: int | None = None
    sink_refresh: bool = True
    cache: CachePolicy = field(default_factory=CachePolicy)


def plan_rank_caches(model, image: ImageConditioning, steps_owned: int, policy: CachePolicy,
                     decode_here: bool = True) -> CachePlan:
    """The memory preflight of one rank, before any cache exists (`memory.plan_caches` with the
    device's free memory, `memory.device_free`, and the host's free RAM). On a CPU device nothing
    is measured: caches are offloaded only when asked for (no prefetch, no sink slot). A DiT that
    streams its layers (`dit.layer_stream`) pages its step caches per layer: `plan_paged_caches`
    (which may move resident blocks to host streaming first)."""
    stream = getattr(model.dit, "layer_stream", None)
    if model.device.type != "cuda":
        if stream is not None:
            return CachePlan(resident_kv_layers=stream.residency.kv, fp8=policy.fp8)
        return CachePlan(offload=bool(policy.offload), fp8=policy.fp8)
    from liveavatar.pipeline.memory import GIB, available_host_bytes, device_free, host_cache_bytes, plan_caches

    free, total = device_free(model.device)
    w, h = image.width, image.height
    if stream is not None:
        return plan_paged_caches(model, w, h, steps_owned, free, total, decode_here,
                                 measure=lambda: device_free(model.device))
    layers = getattr(model.dit, "layers", None)  # a layer slice holds the caches of its layers only
    plan = plan_caches(model.dit.cfg, w, h, steps_owned, policy=policy, free=free, total=total,
                       host_available=available_host_bytes(), dtype=model.dtype, stream=model.stream,
                       decode_here=decode_here, device=model.device,
                       what=f"generating at {w}x{h} with {steps_owned} step caches", layers=layers)
    if plan.offload:
        host = host_cache_bytes(model.dit.cfg, w, h, steps_owned, model.dtype, model.stream, layers, kv_fp8=plan.fp8)
        if policy.prefetch and not plan.prefetch:
            log.info("KV prefetch off: its second %.1f GiB buffer does not fit", host / steps_owned / GIB)
        log.info("KV caches offloaded to host memory (%.1f GiB; %d step cache(s) of %.1f GiB on the GPU): "
                 "slower, but fits", host / GIB, 2 if plan.prefetch else 1, host / steps_owned / GIB)
    return plan


def plan_paged_caches(model, w: int, h: int, steps_owned: int, free: int, total: int, decode_here: bool,
                      measure: Callable[[], tuple[int, int]] | None = None) -> CachePlan:
    """The cache plan of a DiT that streams its layers, from `free` / `total` device bytes
    measured after loading (the weights, and the VAE when loaded, are in use already): as many
    KV layers resident as fit (`memory.fit_residency`, at most the residency's `kv`).

    The re-fit: when the caches, sink, text state and working set do not fit next to the resident
    blocks (loading took more than the placement counted), the fewest resident blocks are moved
    to pinned host streaming first (`memory.refit_residency`, `CausalS2VDiT.demote_layers`) and
    one line is logged with the numbers; `measure()` (CUDA: `memory.device_free`) then measures
    again and the re-fit repeats if the release was short (None: the arithmetic is trusted).
    Raises MemoryError (numbers and remedies) when even streaming every block does not fit.
    """
    from liveavatar.models.layer_stream import LayerResidency
    from liveavatar.pipeline.memory import GIB, VAE_BYTES, estimate_memory, memory_error, refit_residency

    dit = model.dit
    cfg, stream = dit.cfg, dit.layer_stream
    kw = dict(dtype=model.dtype, stream=model.stream, decode_here=decode_here)
    credit = VAE_BYTES if decode_here and getattr(model, "vae", None) is not None else 0
    fp8 = bool(getattr(getattr(model, "opts", None), "fp8", False))
    what = f"generating at {w}x{h} with {steps_owned} step caches paged per layer"
    while True:
        res = stream.residency
        fit, room = refit_residency(cfg, w, h, steps_owned, free + credit, res, fp8=fp8, **kw)
        if fit is None:
            est = estimate_memory(cfg, w, h, steps_owned=steps_owned, param_counts=(0, 0),
                                  residency=LayerResidency(0, 0, res.buffers), **kw)
            raise memory_error(est, room, total, model.device, what + " (every DiT block streamed)")
        if fit.weights == res.weights:
            break
        need = estimate_memory(cfg, w, h, steps_owned=steps_owned, param_counts=(0, 0),
                               residency=LayerResidency(res.weights, 0, res.buffers), **kw).total
        moved = dit.demote_layers(res.weights - fit.weights)
        host = sum(dit.blocks[i]._stream_flat.numel() for i in moved)
        log.info("re-fit after loading: the caches and working set need %.2f GiB next to %d resident DiT blocks, "
                 "%.2f GiB are free; moved %d block(s) (layers %d-%d, %.2f GiB) to pinned host memory: %s",
                 need / GIB, res.weights, (free + credit) / GIB, len(moved), moved[0], moved[-1], host / GIB,
                 stream.residency.describe(cfg.num_layers))
        if measure is None:
            break
        free, total = measure()
    kv = min(fit.kv, stream.residency.kv)
    log.info("layer streaming: %s; KV of %d/%d layers resident", stream.residency.describe(cfg.num_layers), kv,
             cfg.num_layers)
    return CachePlan(resident_kv_layers=kv)


def make_runner(model, context: torch.Tensor, image: ImageConditioning, *, seed: int, steps: int,
                owned: Sequence[int] | None = None, kv_offload: bool | None = None,
                kv_prefetch: bool | None = None, decode_here: bool = True, kv_fp8: bool = False) -> StepRunner:
    """A StepRunner on the model's device owning `owned` steps (all by default), its caches placed
    by `plan_rank_caches` (kv_offload / kv_prefetch / kv_fp8: the `CachePolicy`; None = when it fits)."""
    owned = list(range(steps)) if owned is None else list(owned)
    caches = plan_rank_caches(model, image, len(owned), CachePolicy(kv_offload, kv_prefetch, kv_fp8), decode_here)
    return _new_runner(model, context, image, seed, steps, owned, caches)


def _new_runner(model, context: torch.Tensor, image: ImageConditioning, seed: int, steps: int,
                owned: list[int], caches: CachePlan) -> StepRunner:
    with torch.no_grad():
        text = model.dit.encode_text(context.to(model.device, model.dtype))
    return StepRunner(model.dit, text, image.latent_hw, make_schedule(steps, model.stream), owned, model.stream,
                      seed, device=model.device, dtype=model.dtype, caches=caches)


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


class RankJob:
    """One job on one rank (see the module docstring).

    model: a loaded `LiveAvatar` (a decode-only rank: VAE only). options: `JobOptions`.
    image: the reference at the resolved output size. wave: the user's audio (`Audio16k`), muxed
    into the decoded blocks. audio: wav2vec2 conditioning (ranks that run steps; None on a
    decode-only rank, which plans from the wave's length). context: umT5 context [L, text_dim]
    (ranks that run steps). owned: the steps this rank runs (None: all; () none). decodes: this
    rank decodes. pose_cond: pose latents [1, 16, F_latent, h, w] or None. reference: the VAE
    latents of `image` when already encoded.

    Construction plans the blocks only; `start()` does the preflight and allocates.
    """

    def __init__(self, model, options: JobOptions, image: ImageConditioning, wave, *,
                 audio: AudioConditioning | None = None, context: torch.Tensor | None = None,
                 owned: Sequence[int] | None = None, decodes: bool = True,
                 pose_cond: torch.Tensor | None = None, reference: ReferenceLatents | None = None):
        from liveavatar.media.audio import num_video_frames

        self.model = model
        self.stream = model.stream
        self.options = options
        self.image = image
        self.wave = wave
        self.audio = audio
        self.context = context
        self.owned = list(range(options.steps)) if owned is None else list(owned)
        if self.owned and (audio is None or context is None):
            raise ValueError("a rank that runs denoising steps needs the audio conditioning and the text context")
        self.decodes = decodes
        self.pose_cond = pose_cond
        self.ref = reference
        if audio is not None:
            num_frames, lead_in = audio.num_frames, audio.lead_in_frames
        else:
            num_frames, lead_in = num_video_frames(wave, fps=self.stream.fps), self.stream.lead_in_frames
        self.plan: BlockPlan = make_plan(num_frames, self.stream, num_clip=options.num_clip, lead_in_frames=lead_in)
        self.runner: StepRunner | None = None
        self.decoder: BlockDecoder | None = None

    def start(self, decoder: bool = True, prefill: bool = True) -> "RankJob":
        """Memory preflight (CUDA), reference latents, the runner of the owned steps with its sink
        prefilled, and the decoder when this rank decodes (decoder=False: the caller makes its
        own with `new_decoder`, e.g. on the overlapped decode's thread; prefill=False: a layer
        slice, whose sink prefill passes through the other slices, fills it itself)."""
        m, opt = self.model, self.options
        caches = plan_rank_caches(m, self.image, len(self.owned), opt.cache, self.decodes) if self.owned else None
        if self.ref is None:
            self.ref = m.encode_reference(self.image)
        if self.owned:
            self.runner = _new_runner(m, self.context, self.image, opt.seed, opt.steps, self.owned, caches)
            if prefill:
                self.runner.prefill(self.ref.ref, self.ref.motion)
        if self.decodes and decoder:
            self.decoder = self.new_decoder()
        return self

    def new_decoder(self) -> BlockDecoder:
        """A streaming decoder warmed with this job's motion history (the overlapped decode makes
        its own on its thread)."""
        return BlockDecoder(self.model.vae, self.ref.motion.to(self.model.device))

    # ------------------------------------------------------------------ per block
    def block(self, clip: int, block_in_clip: int) -> BlockSpec:
        return self.plan.blocks[clip * self.stream.blocks_per_clip + block_in_clip]

    def begin_clip(self, clip: int, first_block: torch.Tensor | None) -> None:
        """Start clip `clip`. first_block: final latents [16, n, h, w] of block 0 (None when not
        known): at clip 1 the Rolling Sink re-anchors on its first latent frame, motion unchanged."""
        if clip == 1 and self.options.sink_refresh and first_block is not None and self.runner is not None:
            self.runner.prefill(first_block[:, 0:1].unsqueeze(0), self.ref.motion)

    def noise(self, block: BlockSpec) -> torch.Tensor:
        """The block's initial noise [16, n, h, w] float32 on the CPU (same on every rank)."""
        return block_noise(self.options.seed, block, self.image.latent_hw, self.stream)

    def inputs(self, block: BlockSpec) -> BlockInputs:
        """The block's audio features and pose latents (None without a pose video)."""
        cond = None
        if self.pose_cond is not None:
            f0 = block.start_frame
            cond = self.pose_cond[:, :, f0:f0 + self.stream.frames_per_block_latent]
        return BlockInputs(audio=self.audio.block_features(block), cond=cond)

    def run(self, block: BlockSpec, x: torch.Tensor, on_step: Callable[[int], None] | None = None) -> torch.Tensor:
        """The owned steps on block latents x [16, n, h, w]; returns the new x (float32, device)."""
        return self.runner.run(x, block, self.inputs(block), on_step=on_step)

    def decode(self, block: BlockSpec, x: torch.Tensor) -> torch.Tensor:
        """Final latents [16, n, h, w] -> the block's written frames, uint8 [k, H, W, 3] (CPU)."""
        return self.decoder.decode(block, x.to(self.model.device))

    def emit(self, block: BlockSpec, frames: torch.Tensor, timings: dict) -> DecodedBlock:
        """The `DecodedBlock` of decoded frames, with the user's audio of exactly those frames."""
        from liveavatar.media.audio import slice_for_frames

        if block.index == 1:  # every compiled region (the VAE's first and next frame steps) has run by now
            from liveavatar.compile_cache import save_compiled

            save_compiled()
        fps = self.stream.fps
        samples = slice_for_frames(self.wave, block.out_first_frame, frames.shape[0], fps=fps)
        return DecodedBlock(index=block.index, total_blocks=self.plan.num_blocks, first_frame=block.out_first_frame,
                            frames=frames, audio=samples, fps=fps, timings=timings)

    def close(self) -> None:
        """Drop the caches and the decoder state."""
        self.runner = self.decoder = None


__all__ = ["JobOptions", "RankJob", "BlockDecoder", "frames_to_uint8", "make_runner", "plan_paged_caches",
           "plan_rank_caches"]
