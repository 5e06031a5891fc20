"""Audio injection after selected DiT layers (spec §3.6, `adain_mode="attn_norm"`).

State-dict prefix `audio_injector.`: `injector.{j}` (cross-attention q/k/v/o + RMS q/k norms) and
`injector_adain_layers.{j}.linear` (`dim -> 2*dim`), j = 0..len(audio_inject_layers)-1.

Layer -> injector index: injector j belongs to layer `audio_inject_layers[j]` (position in the
configured list). The reference finds the layers by substring-matching module names
("transformer_blocks.1" also matches blocks 10..19); with the official 40-layer list that gives
the same mapping, with other lists it would build extra injectors. We do not reproduce that.

Per injected layer, for the block's F latent frames of `fsl` tokens each:
  shift, scale = chunk(Linear(SiLU(g_f)), 2)        # g_f: the frame's global audio token
  h = LayerNorm(x_f; no affine, eps 1e-5) * (1 + scale) + shift
  x_f += CrossAttn_j(h, audio_tokens_f)            # the frame's num_audio_token + 1 tokens
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dit_blocks import CrossAttention, ada_norm

ADALN_EPS = 1e-5


class AdaLayerNorm(nn.Module):
    """LayerNorm (no affine) modulated by a conditioning vector: shift first, then scale."""

    def __init__(self, dim: int, cond_dim: int):
        super().__init__()
        self.linear = nn.Linear(cond_dim, 2 * dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x `[N, L, dim]`, cond `[N, cond_dim]` -> float32-or-x-dtype `[N, L, dim]` (x*(1+scale)+shift)."""
        return ada_norm(x, self.linear(F.silu(cond)), ADALN_EPS)


class AudioInjector(nn.Module):
    """`audio_injector`: one cross-attention (+ AdaLN) per entry of `inject_layers`."""

    def __init__(self, dim: int, num_heads: int, inject_layers: tuple[int, ...], eps: float = 1e-6):
        """`eps`: the injector attention's RMS q/k norm eps (1e-6 in the reference, not taken from the config)."""
        super().__init__()
        self.layer_to_index = {layer: j for j, layer in enumerate(inject_layers)}
        if len(self.layer_to_index) != len(inject_layers):
            raise ValueError(f"audio_inject_layers has duplicates: {list(inject_layers)}")
        self.injector = nn.ModuleList(CrossAttention(dim, num_heads, True, eps) for _ in inject_layers)
        self.injector_adain_layers = nn.ModuleList(AdaLayerNorm(dim, dim) for _ in inject_layers)

    def inject(self, layer: int, x: torch.Tensor, num_frames: int, audio_global: torch.Tensor,
               audio_tokens: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
        """Add layer `layer`'s audio cross-attention to the block tokens (no-op for other layers).

        x: `[1, F*fsl, dim]` block tokens (activation dtype). audio_global: `[F, dim]`,
        audio_tokens: `[F, n_tok, dim]` (activation dtype). Returns `[1, F*fsl, dim]`.
        """
        j = self.layer_to_index.get(layer)
        if j is None:
            return x
        act = x.dtype
        frames = x.reshape(num_frames, -1, x.shape[-1])  # [F, fsl, dim]
        h = self.injector_adain_layers[j](frames, audio_global)
        out = self.injector[j](h.to(act), context=audio_tokens, backend=backend)
        return x + out.reshape(x.shape)


__all__ = ["ADALN_EPS", "AdaLayerNorm", "AudioInjector"]
