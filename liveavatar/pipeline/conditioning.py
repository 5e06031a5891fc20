"""Conditioning containers handed from the encoders to the sampler (shapes in the docstrings)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from liveavatar.config import DEFAULT_STREAM
from liveavatar.pipeline.plan import BlockSpec

if TYPE_CHECKING:
    from liveavatar.pipeline.audio_features import WindowedAudioFeatures


@dataclass
class AudioConditioning:
    """wav2vec2 features of the (lead-in padded) audio, one column per generated video frame.

    features: [1, n_states, audio_dim, N] on the CPU, either a tensor (short clips, features computed
        elsewhere) or a `pipeline.audio_features.WindowedAudioFeatures` that computes the columns a
        block asks for, window by window (`encode_audio`: memory does not grow with the length). N
        covers every generated frame (the lead-in silence included), zero-padded to whole clips.
    num_frames: written video frames (== floor(audio seconds * fps)).
    audio: the user's audio (`Audio16k` or `SpooledAudio16k`, 16 kHz), muxed into the output.
    lead_in_frames: silent frames prepended before feature extraction.
    """

    features: "torch.Tensor | WindowedAudioFeatures"
    num_frames: int
    audio: object
    lead_in_frames: int = DEFAULT_STREAM.lead_in_frames

    def block_features(self, block: BlockSpec) -> torch.Tensor:
        """[1, n_states, audio_dim, frames_per_block] for the block's generated frames."""
        g0, g1 = block.gen_frames
        if not isinstance(self.features, torch.Tensor):
            return self.features.columns(g0, g1)
        feats = self.features[..., g0:g1]
        missing = (g1 - g0) - feats.shape[-1]
        if missing > 0:
            pad = feats.new_zeros(*feats.shape[:-1], missing)
            feats = torch.cat([feats, pad], dim=-1)
        return feats


@dataclass
class ImageConditioning:
    """The reference image prepared at the output size.

    pixels: [1, 3, 1, H, W] float32 in [-1, 1].
    width, height: output size in pixels (both multiples of 64).
    requested: the size string the user gave; mode: "exact" or "area".
    """

    pixels: torch.Tensor
    width: int
    height: int
    requested: str = ""
    mode: str = "area"

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.height // 8, self.width // 8


@dataclass
class ReferenceLatents:
    """VAE latents of the reference: the sink reference and the motion history.

    ref: [1, 16, 1, h, w] (the single reference frame encoded, as the TPP path does).
    motion: [1, 16, motion_frames_latent, h, w] (the reference repeated 73 frames, encoded).
    """

    ref: torch.Tensor
    motion: torch.Tensor


@dataclass
class DecodedBlock:
    """One decoded block, streamed as soon as it exists.

    index: block index (0-based); total_blocks: blocks in this job.
    first_frame: index of frames[0] in the output video.
    frames: uint8 [n, H, W, 3] on the CPU (n <= 12; the first and last blocks may be shorter).
    audio: float32 [samples] at 16 kHz: the user's audio for exactly these frames.
    timings: seconds spent in this block: {"dit": .., "decode": ..}.
    """

    index: int
    total_blocks: int
    first_frame: int
    frames: torch.Tensor
    audio: torch.Tensor
    fps: int = DEFAULT_STREAM.fps
    timings: dict = field(default_factory=dict)


class GenerationCancelled(RuntimeError):
    """Raised inside `generate` when the caller's cancel callback returns True."""
