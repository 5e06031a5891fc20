"""The block plan of one job: which blocks exist, their frames, noise and sink offsets.

Everything here is a pure function of (seed, audio length, stream constants), so every rank of a
worker group derives the same plan without talking to the others: that is what makes single-GPU
and TPP runs produce the same video.

Timeline (video frames at `stream.fps`):
- The audio gets `lead_in_frames` frames of silence in front. Generated frame g is driven by the
  audio of padded frame g, i.e. by the user's audio frame g - lead_in.
- The first `lead_in_frames` generated frames are dropped (the reference drops the first 3 decoded
  frames too: the decoder's transition out of the reference image). So written frame k shows
  generated frame k + lead_in and carries the user's audio of frame k: no audio lead, and the
  video is exactly as long as the audio (trimmed to whole frames).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from liveavatar.config import StreamConfig


@dataclass(frozen=True)
class BlockSpec:
    """One causal block: `frames_per_block_latent` latent frames (12 video frames by default).

    index: global block index (0-based over the whole video).
    clip, block_in_clip: position in the reference's clip structure (4 blocks per clip).
    start_frame: absolute latent frame index F0 of the block (drives RoPE and the KV ring offset).
    gen_frames: range of generated video frames [start, stop) this block decodes to.
    keep: slice of the block's decoded frames that is written (drops the lead-in, trims the end).
    out_first_frame: index of the first written frame in the output video.
    """

    index: int
    clip: int
    block_in_clip: int
    start_frame: int
    gen_frames: tuple[int, int]
    keep: tuple[int, int]
    out_first_frame: int

    @property
    def num_out_frames(self) -> int:
        return self.keep[1] - self.keep[0]


@dataclass(frozen=True)
class BlockPlan:
    """All blocks of one generation job. `num_frames` = written frames (== audio frames)."""

    num_frames: int
    lead_in_frames: int
    blocks: tuple[BlockSpec, ...]
    stream: StreamConfig

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_clips(self) -> int:
        return self.blocks[-1].clip + 1 if self.blocks else 0


def audio_frames(audio, stream: StreamConfig) -> int:
    """Video frames `audio` (an `Audio16k`) drives at `stream.fps`, refused (ValueError naming
    `audio`) when shorter than the first block's written frames (`frames_per_block - lead_in_frames`,
    9 frames = 0.36 s by default): the model makes a video a block at a time."""
    from liveavatar.media.audio import num_video_frames

    frames = num_video_frames(audio, fps=stream.fps)
    least = stream.frames_per_block - stream.lead_in_frames
    if frames < least:
        raise ValueError(f"audio: {audio.duration_s:.3f} s ({frames} frames at {stream.fps} fps) is shorter than "
                         f"one block ({least} frames, {least / stream.fps:.2f} s); give at least "
                         f"{least / stream.fps:.2f} s of speech")
    return frames


def make_plan(num_audio_frames: int, stream: StreamConfig, num_clip: int | None = None,
              lead_in_frames: int | None = None) -> BlockPlan:
    """Plan the blocks needed to cover `num_audio_frames` written frames.

    lead_in_frames: silent frames in front of the audio (None: `stream.lead_in_frames`).
    num_clip: optional cap on the number of clips (48 frames each); the video is cut at
    `num_clip * frames_per_clip - lead_in_frames` written frames.
    """
    if num_audio_frames <= 0:
        raise ValueError("audio: it is shorter than one video frame (1/25 s); give a longer clip")
    lead_in_frames = stream.lead_in_frames if lead_in_frames is None else lead_in_frames
    fpb = stream.frames_per_block
    total_gen = num_audio_frames + lead_in_frames
    if num_clip is not None:
        if num_clip < 1:
            raise ValueError(f"num_clip: must be >= 1 or None (until the audio ends), got {num_clip}")
        total_gen = min(total_gen, num_clip * stream.frames_per_clip)
    num_blocks = math.ceil(total_gen / fpb)
    blocks = []
    out = 0
    for i in range(num_blocks):
        g0, g1 = i * fpb, (i + 1) * fpb
        k0 = max(0, lead_in_frames - g0)
        k1 = min(fpb, total_gen - g0)
        blocks.append(BlockSpec(
            index=i, clip=i // stream.blocks_per_clip, block_in_clip=i % stream.blocks_per_clip,
            start_frame=i * stream.frames_per_block_latent, gen_frames=(g0, g1),
            keep=(k0, k1), out_first_frame=out,
        ))
        out += max(0, k1 - k0)
    return BlockPlan(num_frames=out, lead_in_frames=lead_in_frames, blocks=tuple(blocks), stream=stream)


def clip_noise(seed: int, clip: int, latent_hw: tuple[int, int], stream: StreamConfig,
               channels: int = 16) -> torch.Tensor:
    """Initial noise of one clip, [C, latent_frames_per_clip, h, w] float32 on the CPU.

    Drawn from a CPU generator seeded with `seed + clip` (the reference's per-clip seeding), so
    it is identical on every device and rank.
    """
    g = torch.Generator(device="cpu").manual_seed(int(seed) + int(clip))
    h, w = latent_hw
    return torch.randn(channels, stream.latent_frames_per_clip, h, w, generator=g, dtype=torch.float32)


def block_noise(seed: int, block: BlockSpec, latent_hw: tuple[int, int], stream: StreamConfig) -> torch.Tensor:
    """The block's slice of its clip's noise, [16, frames_per_block_latent, h, w] float32 (CPU)."""
    n = stream.frames_per_block_latent
    lo = block.block_in_clip * n
    return clip_noise(seed, block.clip, latent_hw, stream)[:, lo:lo + n].clone()


def sink_offsets(seed: int, block_index: int, steps: int, stream: StreamConfig) -> list[int]:
    """The reference's per-call `relative_dist` (ref RoPE position max(30, F0 + d)), seeded.

    The reference draws d from Python's unseeded `random` on every DiT call; we draw it from a
    generator keyed by (seed, block index) so the same seed gives the same video on any rank count.
    Returns one d per denoising step, each in stream.sink_offset_range (inclusive).
    """
    lo, hi = stream.sink_offset_range
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(block_index)])
    return [int(v) for v in rng.integers(lo, hi + 1, size=steps)]
