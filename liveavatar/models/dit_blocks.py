"""Layers of the causal S2V DiT: norms, attention modules, the transformer block and the head.

Module and parameter names follow the official state dict (`blocks.{i}.self_attn.q`, `.norm3`,
`.ffn.0`, `head.head`, ...), so `load_state_dict` takes the checkpoint as is.

Dtype policy (spec §3.5). Weights are in the "activation dtype" (bfloat16 for the real model,
float32 in the parity tests). Matmul inputs are cast to it. Inside a block the residual stream is
float32; it leaves the block in the activation dtype. Modulation tensors are float32. Two
rounding points of the reference are kept on purpose:
- the residual stream is cast to bfloat16 before `norm3` (the text cross-attention input), even
  in float32 runs, and the norm's output is bfloat16 too;
- the parameter-free norms (`norm1`, `norm2`, head norm) return their input's dtype.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention

# q, k, v `[B, L, H, D]` (un-rotated, activation dtype) -> attention output `[B, L, H, D]`.
SelfAttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------- the layer math
# Pure functions of tensors: the eager modules below and the compiled regions of
# models/compiled.py both call them, so the two paths run the same ops in the same order.

ATTN, FFN = 0, 3  # rows of a layer's modulation table: part + 0 shift, + 1 scale, + 2 gate


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMS norm over the last dim in float32, result in x's dtype times `weight` (None: identity,
    a layer without q/k norms)."""
    if weight is None:
        return x
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return normed.type_as(x) * weight


def bf16_layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                    upcast: bool | None = None) -> torch.Tensor:
    """LayerNorm (last dim) of a bfloat16 `x`, bfloat16 out, whatever the weight dtype (the
    reference's norm3 rounding). weight None: identity (no norm3).

    upcast: normalise the float32 upcast of x and round back. None = only where the kernels need
    it: CUDA's take no bf16 input with fp32 weights, CPU's do (computing in fp32 with slightly
    different roundings). The compiled regions always upcast.
    """
    if weight is None:
        return x
    if upcast is None:
        upcast = weight.dtype != x.dtype and x.device.type != "cpu"
    if not upcast:
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return F.layer_norm(x.float(), (x.shape[-1],), weight.float(), None if bias is None else bias.float(),
                        eps).to(x.dtype)


def layer_modulation(table: torch.Tensor, e0: torch.Tensor) -> torch.Tensor:
    """A layer's modulation `[1, 6, dim]` plus the time modulation e0 `[1, G, 6, dim]` ->
    `[1, G, 6, 1, dim]` float32 (rows: `ATTN` / `FFN` + shift, scale, gate)."""
    return (table.float().unsqueeze(1) + e0).unsqueeze(3)


def modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """x `[B, L, C]` (float32) with per-group scale/shift `[B, G, 1, C]`: `x*(1+scale)+shift` per group."""
    b, n, c = x.shape
    groups = scale.shape[1]
    xg = x.view(b, groups, n // groups, c)
    return (xg * (1 + scale) + shift).view(b, n, c)


def gate(y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """y `[B, L, C]` times per-group gate `[B, G, 1, C]`, result float32."""
    b, n, c = y.shape
    groups = g.shape[1]
    return (y.view(b, groups, n // groups, c) * g).view(b, n, c)


def modulated_norm(x: torch.Tensor, mod: torch.Tensor, part: int, eps: float) -> torch.Tensor:
    """The input of a layer's self-attention (`part` ATTN) or FFN (FFN): parameter-free LayerNorm
    of x `[1, L, dim]`, modulated by `mod` (`layer_modulation`); float32 `[1, L, dim]`."""
    return modulate(F.layer_norm(x, (x.shape[-1],), eps=eps).float(), mod[:, :, part + 1], mod[:, :, part])


def gated_residual(r: torch.Tensor, y: torch.Tensor, mod: torch.Tensor, part: int) -> torch.Tensor:
    """`r + gate * y` with the gate of `part` (ATTN or FFN): the float32 residual stream `[1, L, dim]`."""
    return r + gate(y, mod[:, :, part + 2])


def ada_norm(x: torch.Tensor, shift_scale: torch.Tensor, eps: float) -> torch.Tensor:
    """Audio AdaLN: LayerNorm (no affine, float32) of x `[N, L, dim]` times `1 + scale` plus
    `shift`, where `shift_scale` `[N, 2*dim]` is the conditioning projection (shift first)."""
    shift, scale = shift_scale.chunk(2, dim=1)
    normed = F.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    return normed * (1 + scale[:, None, :]) + shift[:, None, :]


class RMSNorm(nn.Module):
    """RMS norm over the last dim, computed in float32, result in the input dtype times `weight`."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def plain_layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim without affine parameters; returns x's dtype."""
    return F.layer_norm(x, (x.shape[-1],), eps=eps).type_as(x)


def fp32_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` in float32 whatever the weight dtype (the reference's float32 autocast regions)."""
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.weight.float(), bias)


class _QKVOut(nn.Module):
    """q, k, v, o projections with optional RMS q/k norms (names as in the checkpoint)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.num_heads, self.head_dim))

    def project_q(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, L, dim]` -> normed queries `[B, L, H, D]`."""
        return self._heads(self.norm_q(self.q(x)))

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`[B, L, dim]` -> (normed keys, values), each `[B, L, H, D]`."""
        return self._heads(self.norm_k(self.k(x))), self._heads(self.v(x))

    def output(self, attn: torch.Tensor) -> torch.Tensor:
        """`[B, L, H, D]` -> `[B, L, dim]`."""
        return self.o(attn.flatten(2))


class SelfAttention(_QKVOut):
    """Self-attention projections; the attention itself (RoPE, KV cache, sink) is `attend`."""

    def forward(self, x: torch.Tensor, attend: SelfAttendFn) -> torch.Tensor:
        q = self.project_q(x)
        k, v = self.project_kv(x)
        return self.output(attend(q, k, v))


class CrossAttention(_QKVOut):
    """Cross-attention to a context (text tokens, or the audio tokens of a latent frame)."""

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        backend: str = "sdpa",
    ) -> torch.Tensor:
        """x `[B, L, dim]`; context `[B, Lc, dim]` or precomputed `kv` from `project_kv(context)`."""
        q = self.project_q(x)
        k, v = kv if kv is not None else self.project_kv(context)
        return self.output(attention(q, k, v, backend))


class DiTBlock(nn.Module):
    """One transformer layer: modulated self-attention, text cross-attention, modulated FFN."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, qk_norm: bool = True,
                 cross_attn_norm: bool = True, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.self_attn = SelfAttention(dim, num_heads, qk_norm, eps)
        self.norm3 = nn.LayerNorm(dim, eps=eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(dim, num_heads, qk_norm, eps)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self,
        x: torch.Tensor,
        e0: torch.Tensor,
        attend: SelfAttendFn,
        text_kv: tuple[torch.Tensor, torch.Tensor],
        backend: str = "sdpa",
    ) -> torch.Tensor:
        """Run the layer.

        x: `[1, L, dim]`, activation dtype. e0: `[1, G, 6, dim]` float32 time modulation, one row
        per group of L/G consecutive tokens (G = latent frames of a block, or 1 for the sink).
        attend: the self-attention kernel with its cache policy. text_kv: this layer's text
        keys/values `[1, Lt, H, D]`. Returns `[1, L, dim]` in x's dtype.
        """
        act = x.dtype
        mod = layer_modulation(self.modulation, e0)  # [1, G, 6, 1, dim]
        y = self.self_attn(modulated_norm(x, mod, ATTN, self.eps).to(act), attend)
        r = gated_residual(x, y, mod, ATTN)  # float32 residual from here on

        # The reference rounds the residual to bfloat16 before norm3, whatever the model dtype.
        n3 = self.norm3
        c = bf16_layer_norm(r.to(torch.bfloat16), getattr(n3, "weight", None), getattr(n3, "bias", None),
                            getattr(n3, "eps", self.eps)).to(act)
        r = r + self.cross_attn(c, kv=text_kv, backend=backend)

        y = self.ffn(modulated_norm(r, mod, FFN, self.eps).to(act))
        return gated_residual(r, y, mod, FFN).to(act)


class Head(nn.Module):
    """Output head: per-frame modulated LayerNorm then Linear to `prod(patch) * out_dim` channels."""

    def __init__(self, dim: int, out_dim: int, patch_size: tuple[int, int, int], eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)
        self.head = nn.Linear(dim, out_dim * patch_size[0] * patch_size[1] * patch_size[2])

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x `[1, F*fsl, dim]`, e `[F, dim]` float32 time embedding per frame -> `[1, F*fsl, P]` (x's dtype)."""
        mod = self.modulation.float() + e.unsqueeze(1)  # [F, 2, dim]
        shift, scale = mod[None, :, 0:1], mod[None, :, 1:2]  # [1, F, 1, dim]
        h = modulate(plain_layer_norm(x, self.eps), scale, shift)
        return fp32_linear(self.head, h).to(x.dtype)


__all__ = ["ATTN", "FFN", "rms_norm", "bf16_layer_norm", "layer_modulation", "modulate", "gate", "modulated_norm",
           "gated_residual", "ada_norm", "RMSNorm", "plain_layer_norm", "fp32_linear", "SelfAttention",
           "CrossAttention", "DiTBlock", "Head"]
