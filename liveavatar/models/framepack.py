"""FramePack motion tokens of the sink (spec §3.7) and their RoPE positions (spec §3.4).

The newest `sum(buckets)` (= 19) motion latent frames (zero-padded at the oldest end if fewer) are
split, newest first, into buckets of 1, 2 and 16 frames, compressed 1x, 2x and 4x in time and
space by `proj` (1,2,2), `proj_2x` (2,4,4) and `proj_4x` (4,8,8) convolutions (stride = kernel).
Token order: [1x bucket, 2x bucket, 4x bucket], each t-major then h, w.

Positions (negative time = the past; the spatial grid of a compressed bucket is spread over the
full patch grid with truncating linspace, as the reference does):
  1x:  t = -b0                                    h = linspace(0, hp-1, hp)
  2x:  t = -(b0+b1)                               h = linspace(0, hp-1, h_lat//4)
  4x:  t = -linspace(b0+b1+b2, b0+b1+1, b2//4)    h = linspace(0, hp-1, h_lat//8)
which is (-1), (-3), (-19, -14, -9, -4) for the default buckets (1, 2, 16).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .rope import grid_positions, linspace_int
from .tokens import FRAMEPACK_STRIDES as _BUCKET_STRIDES
from .tokens import framepack_tokens


def _out_size(n: int, stride: int) -> int:
    return n // stride


class FramePackMotioner(nn.Module):
    """`frame_packer`: three Conv3d projections of the motion latents to model tokens."""

    def __init__(self, in_dim: int, dim: int, buckets: tuple[int, int, int] = (1, 2, 16)):
        super().__init__()
        if len(buckets) != 3:
            raise ValueError(f"framepack needs 3 buckets (newest first), got {buckets}")
        for b, (st, _) in zip(buckets, _BUCKET_STRIDES):
            if b % st:
                raise ValueError(f"framepack bucket {b} is not a multiple of its time stride {st}")
        self.in_dim = in_dim
        self.buckets = tuple(buckets)
        (t1, s1), (t2, s2), (t4, s4) = _BUCKET_STRIDES
        self.proj = nn.Conv3d(in_dim, dim, kernel_size=(t1, s1, s1), stride=(t1, s1, s1))
        self.proj_2x = nn.Conv3d(in_dim, dim, kernel_size=(t2, s2, s2), stride=(t2, s2, s2))
        self.proj_4x = nn.Conv3d(in_dim, dim, kernel_size=(t4, s4, s4), stride=(t4, s4, s4))

    @property
    def num_frames(self) -> int:
        """Motion latent frames used (19 by default); older frames are ignored."""
        return sum(self.buckets)

    def num_tokens(self, latent_hw: tuple[int, int]) -> int:
        """Tokens produced for a latent size (h, w) (`tokens.framepack_tokens`)."""
        return framepack_tokens(latent_hw, self.buckets)

    def positions(self, latent_hw: tuple[int, int]) -> torch.Tensor:
        """RoPE positions (t, h, w) of the tokens, int64 `[num_tokens, 3]`, in token order."""
        h, w = latent_hw
        hp, wp = h // 2, w // 2
        groups = []
        start = 0  # frames back from the newest, cumulative over buckets
        for b, (st, ss) in zip(self.buckets, _BUCKET_STRIDES):
            far = start + b
            t = [-p for p in linspace_int(far, far - b + 1, b // st)]
            hh = linspace_int(0, hp - 1, _out_size(h, ss))
            ww = linspace_int(0, wp - 1, _out_size(w, ss))
            groups.append(grid_positions(t, hh, ww))
            start = far
        return torch.cat(groups, dim=0)

    def forward(self, motion_latents: torch.Tensor) -> torch.Tensor:
        """motion_latents `[1, C, T_m, h, w]` (any T_m >= 0) -> tokens `[1, num_tokens, dim]` (weight dtype)."""
        if motion_latents.dim() != 5 or motion_latents.shape[0] != 1 or motion_latents.shape[1] != self.in_dim:
            raise ValueError(f"motion_latents must be [1, {self.in_dim}, T, h, w], got {tuple(motion_latents.shape)}")
        n = self.num_frames
        m = motion_latents[:, :, -n:] if motion_latents.shape[2] > 0 else motion_latents
        if m.shape[2] < n:  # zero history at the oldest end
            m = F.pad(m, (0, 0, 0, 0, n - m.shape[2], 0))
        dtype = self.proj.weight.dtype
        m = m.to(dtype)
        b0, b1, b2 = self.buckets
        old, mid, new = m[:, :, :b2], m[:, :, b2:b2 + b1], m[:, :, b2 + b1:]
        tokens = [conv(x).flatten(2).transpose(1, 2)
                  for conv, x in ((self.proj, new), (self.proj_2x, mid), (self.proj_4x, old))]
        return torch.cat(tokens, dim=1)


__all__ = ["FramePackMotioner"]
