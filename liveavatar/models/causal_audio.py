"""Causal audio encoder of the S2V DiT (spec §3.6): wav2vec2 layer stack -> audio tokens per frame.

State-dict prefix inside the DiT: `casual_audio_encoder.` (the official spelling). Keys:
`weights` `[1, n_layers, 1, 1]` and `encoder.{conv1_local,conv1_global,conv2,conv3}.conv`,
`encoder.final_linear`, `encoder.padding_tokens`.

Computation (all float32, whatever the weight dtype, as the reference's float32 autocast):
1. Layer mix: `w = SiLU(weights)`, `f = sum_l (A_l * w_l / sum(w))` over the n_layers hidden states.
2. Causal 1-D convs (kernel 3, left padding by repeating the first frame):
   - local: `conv1_local` (audio_dim -> num_tokens * dim/4), split into `num_tokens` channel groups
     (group index outer), each group: LN -> SiLU -> conv2 (stride 2) -> LN -> SiLU -> conv3
     (stride 2) -> LN -> SiLU; then the learned `padding_tokens` is appended as one more token;
   - global: `conv1_global` (audio_dim -> dim/4) -> the same LN/SiLU/conv2/conv3 chain ->
     `final_linear`.
   LNs have no affine parameters, eps 1e-6. Two stride-2 convs: T frames -> ceil(ceil(T/2)/2).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class CausalConv1d(nn.Module):
    """Conv1d with `kernel_size - 1` frames of left padding by replication (key prefix `.conv`)."""

    def __init__(self, chan_in: int, chan_out: int, kernel_size: int = 3, stride: int = 1):
        super().__init__()
        self.left_pad = kernel_size - 1
        self.conv = nn.Conv1d(chan_in, chan_out, kernel_size, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, C, T]` float32 -> `[B, C_out, T_out]` float32."""
        x = F.pad(x, (self.left_pad, 0), mode="replicate")
        conv = self.conv
        bias = None if conv.bias is None else conv.bias.float()
        return F.conv1d(x, conv.weight.float(), bias, stride=conv.stride)


def _ln_silu(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the last dim (no affine, eps 1e-6), then SiLU."""
    return F.silu(F.layer_norm(x, (x.shape[-1],), eps=1e-6))


class AudioMotionEncoder(nn.Module):
    """The `encoder.` sub-module: local audio tokens and the global (AdaLN) token per frame."""

    def __init__(self, in_dim: int, dim: int, num_tokens: int, need_global: bool = True):
        super().__init__()
        if dim % 4:
            raise ValueError(f"audio encoder width {dim} must be divisible by 4")
        self.num_tokens = num_tokens
        self.need_global = need_global
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.conv1_local = CausalConv1d(in_dim, dim // 4 * num_tokens, 3, stride=1)
        if need_global:
            self.conv1_global = CausalConv1d(in_dim, dim // 4, 3, stride=1)
        self.conv2 = CausalConv1d(dim // 4, dim // 2, 3, stride=2)
        self.conv3 = CausalConv1d(dim // 2, dim, 3, stride=2)
        if need_global:
            self.final_linear = nn.Linear(dim, dim)

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        """`[N, T, dim/4]` -> LN/SiLU -> conv2 -> LN/SiLU -> conv3 -> LN/SiLU -> `[N, T'', dim]`."""
        x = _ln_silu(x)
        x = _ln_silu(self.conv2(x.transpose(1, 2)).transpose(1, 2))
        return _ln_silu(self.conv3(x.transpose(1, 2)).transpose(1, 2))

    def forward(self, feat: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """feat `[B, T, in_dim]` -> (global `[B, T'', 1, dim]` or None, local `[B, T'', tokens+1, dim]`)."""
        b = feat.shape[0]
        x_in = feat.transpose(1, 2)  # [B, C, T]
        local = self.conv1_local(x_in)  # [B, tokens * dim/4, T]
        local = local.unflatten(1, (self.num_tokens, -1)).flatten(0, 1).transpose(1, 2)  # [B*n, T, dim/4]
        local = self._tail(local)
        local = local.unflatten(0, (b, self.num_tokens)).transpose(1, 2)  # [B, T'', n, dim]
        pad = self.padding_tokens.float().expand(b, local.shape[1], 1, -1)
        local = torch.cat([local, pad], dim=2)
        if not self.need_global:
            return None, local
        g = self._tail(self.conv1_global(x_in).transpose(1, 2))  # [B, T'', dim]
        g = F.linear(g, self.final_linear.weight.float(), self.final_linear.bias.float())
        return g.unsqueeze(2), local


class CausalAudioEncoder(nn.Module):
    """`casual_audio_encoder`: weighted wav2vec2 layer mix + `AudioMotionEncoder`."""

    def __init__(self, audio_dim: int, dim: int, num_layers: int = 25, num_tokens: int = 4,
                 need_global: bool = True):
        super().__init__()
        self.num_layers = num_layers
        self.weights = nn.Parameter(torch.full((1, num_layers, 1, 1), 0.01))
        self.encoder = AudioMotionEncoder(audio_dim, dim, num_tokens, need_global)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """features `[B, n_layers, audio_dim, T]` -> (global `[B, T'', 1, dim]`, local `[B, T'', tokens+1, dim]`), float32."""
        if features.dim() != 4 or features.shape[1] != self.num_layers:
            raise ValueError(
                f"audio features must be [B, {self.num_layers}, C, T] (one row per wav2vec2 hidden "
                f"state), got {tuple(features.shape)}")
        w = F.silu(self.weights.float())
        mixed = ((features.float() * w) / w.sum(dim=1, keepdim=True)).sum(dim=1)  # [B, C, T]
        return self.encoder(mixed.transpose(1, 2))


__all__ = ["CausalConv1d", "AudioMotionEncoder", "CausalAudioEncoder"]
