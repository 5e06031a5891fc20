"""Token counts of the DiT's sequences: the one definition the model, its caches and the memory
estimate share.

latent_hw: (h, w) of the latent grid (pixels / 8). patch_size: the DiT's (t, h, w) patch (1, 2, 2).
"""

from __future__ import annotations

from liveavatar.config import StreamConfig

# Compression of each FramePack bucket, newest first: (time, space) stride relative to the latent grid.
FRAMEPACK_STRIDES = ((1, 2), (2, 4), (4, 8))


def frame_tokens(latent_hw: tuple[int, int], patch_size: tuple[int, int, int] = (1, 2, 2)) -> int:
    """Tokens of one latent frame (fsl): (h / ph) * (w / pw)."""
    h, w = (int(v) for v in latent_hw)
    return (h // patch_size[1]) * (w // patch_size[2])


def framepack_tokens(latent_hw: tuple[int, int], buckets: tuple[int, ...]) -> int:
    """FramePack motion tokens for a latent size: per bucket, frames / time stride times the grid
    over the space stride (1.5 fsl for the buckets (1, 2, 16) when h, w % 8 == 0)."""
    h, w = (int(v) for v in latent_hw)
    return sum((b // st) * (h // ss) * (w // ss) for b, (st, ss) in zip(buckets, FRAMEPACK_STRIDES))


def sink_tokens(latent_hw: tuple[int, int], patch_size: tuple[int, int, int], stream: StreamConfig) -> int:
    """Sink tokens: the reference frame (fsl) + the FramePack motion tokens (2.5 fsl in all by default)."""
    return frame_tokens(latent_hw, patch_size) + framepack_tokens(latent_hw, stream.framepack_buckets)


def clip_tokens(latent_hw: tuple[int, int], patch_size: tuple[int, int, int], stream: StreamConfig) -> int:
    """Tokens of one clip of latent frames: the ring of one step KV cache."""
    return stream.latent_frames_per_clip * frame_tokens(latent_hw, patch_size)


__all__ = ["FRAMEPACK_STRIDES", "frame_tokens", "framepack_tokens", "sink_tokens", "clip_tokens"]
