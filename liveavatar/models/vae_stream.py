"""One latent frame through the Wan2.1 VAE decoder with its causal caches as explicit tensors.

diffusers' `WanDecoder3d.forward` keeps the streaming state in a Python list that it edits in
place (`feat_cache`, with a `"Rep"` marker for the temporal upsamplers and caches of 1 or 2
frames), which torch.compile can only follow with graph breaks, and PyTorch 2.11's precompile
cache cannot reload graph breaks. Here the same decoder (its own diffusers modules and weights)
runs as two pure functions of tensors, each one full graph:

    first_frame(decoder, x)          -> (frames [B, 3, 1, H, W], caches)
    next_frame(decoder, x, caches)   -> (frames [B, 3, 4, H, W], caches)   (4 = 2 ** temporal upsamplers)

x is one latent frame after `post_quant_conv`, `[B, z_dim, 1, h, w]`. `caches` is a tuple with
one tensor per causal 3x3x3 conv (and per temporal upsampler), each holding the last two frames
that conv saw, `[B, C, 2, h', w']`: every call after the first has the same shapes, so it
compiles once (static shapes). A zero frame stands where the reference keeps no frame yet (its
1-frame caches and "Rep"): a causal conv zero-pads its two past frames, so it reads the same
numbers either way, and the frames equal diffusers' to the bit (tests/test_vae.py).
"""

from __future__ import annotations

import torch
from torch import nn

CACHE_T = 2  # past frames a causal conv of temporal kernel 3 reads


def _keep(past: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """The last CACHE_T frames of `past` then `x` (zeros before a first frame) `[B, C, 2, h, w]`,
    a fresh contiguous tensor (strides included: dynamo guards on them even for B = 1), so every
    call after the first sees caches of one layout and the compiled step never recompiles."""
    t = x.shape[2]
    if t >= CACHE_T:  # static shapes: a Python branch, no graph break
        return x[:, :, -CACHE_T:].clone(memory_format=torch.contiguous_format)
    if past is None:
        past = x.new_zeros(*x.shape[:2], CACHE_T - t, *x.shape[3:])
    return torch.cat([past[:, :, t - CACHE_T:], x], dim=2).contiguous()


def same_layout(ts: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """`ts` made contiguous, as views with the textbook strides also on their size-1 dims (free for
    an already contiguous tensor). Dynamo guards on every stride, and inductor picks the stride of a
    size-1 dim of an output as it likes: without this, caches made by `first_frame` and by
    `next_frame` differ there and the compiled `next_frame` would be traced twice."""
    out = []
    for t in ts:
        t = t.contiguous()
        stride = [1] * t.dim()
        for d in range(t.dim() - 2, -1, -1):
            stride[d] = stride[d + 1] * t.shape[d + 1]
        out.append(t.as_strided(t.shape, stride, t.storage_offset()))
    return tuple(out)


class _Walk:
    """Runs the decoder's layers in the reference's order, reading `caches` (None: first frame)
    in that order and collecting the new ones."""

    def __init__(self, caches: tuple[torch.Tensor, ...] | None):
        self.caches = caches
        self.new: list[torch.Tensor] = []

    def _past(self) -> torch.Tensor | None:
        return None if self.caches is None else self.caches[len(self.new)]

    def conv(self, conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A `WanCausalConv3d` (temporal kernel 3) with its cache; the first frame zero-pads."""
        past = self._past()
        self.new.append(_keep(past, x))
        return conv(x, past)

    def resnet(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """`WanResidualBlock.forward` with explicit caches."""
        h = blk.conv_shortcut(x)
        x = self.conv(blk.conv1, blk.nonlinearity(blk.norm1(x)))
        x = self.conv(blk.conv2, blk.dropout(blk.nonlinearity(blk.norm2(x))))
        return x + h

    def upsample(self, up: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """`WanResample` (upsample2d / upsample3d) with explicit caches. The first frame skips the
        temporal conv (1 frame out, its cache stays zeros: the reference's "Rep"); later frames
        double the frames through `time_conv` and interleave them."""
        if up.mode == "upsample3d":
            past = self._past()
            if self.caches is None:
                self.new.append(x.new_zeros(*x.shape[:2], CACHE_T, *x.shape[3:]))
            else:
                b, c, t, h, w = x.shape
                self.new.append(_keep(past, x))
                x = up.time_conv(x, past).reshape(b, 2, c, t, h, w)
                x = torch.stack((x[:, 0], x[:, 1]), 3).reshape(b, c, t * 2, h, w)
        return up(x)  # the spatial part (WanResample without feat_cache)

    def decoder(self, dec: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """`WanDecoder3d.forward` for one latent frame `[B, z, 1, h, w]` -> frames `[B, 3, T, 8h, 8w]`."""
        x = self.conv(dec.conv_in, x)
        mid = dec.mid_block
        x = self.resnet(mid.resnets[0], x)
        for attn, blk in zip(mid.attentions, mid.resnets[1:]):
            x = self.resnet(blk, attn(x))
        for up_block in dec.up_blocks:
            for blk in up_block.resnets:
                x = self.resnet(blk, x)
            if up_block.upsamplers is not None:
                x = self.upsample(up_block.upsamplers[0], x)
        return self.conv(dec.conv_out, dec.nonlinearity(dec.norm_out(x)))


def first_frame(decoder: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The first latent frame of a video `[B, z, 1, h, w]` -> (1 frame `[B, 3, 1, 8h, 8w]`, caches)."""
    walk = _Walk(None)
    out = walk.decoder(decoder, x)
    return out, tuple(walk.new)


def next_frame(decoder: nn.Module, x: torch.Tensor,
               caches: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """A later latent frame `[B, z, 1, h, w]` and the caches of the frame before -> (4 frames
    `[B, 3, 4, 8h, 8w]`, the new caches)."""
    walk = _Walk(caches)
    out = walk.decoder(decoder, x)
    return out, tuple(walk.new)


__all__ = ["CACHE_T", "first_frame", "next_frame", "same_layout"]
