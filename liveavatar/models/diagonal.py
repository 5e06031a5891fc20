"""The TPP diagonal as one batched pass per layer (issue 15's lever for streamed weights).

Under timestep forcing, the calls (block b, step 3), (b+1, 2), (b+2, 1), (b+3, 0) are independent:
each reads and writes only its own step's KV cache. `forward_diagonal` runs such a set of calls
as one pass over the layers: the calls' tokens are concatenated along the sequence (`[1, B*L,
dim]`, the per-frame time modulation, RoPE factors and audio tokens likewise), so every weight is
used once for B calls (a streamed layer is copied once per diagonal instead of once per step)
and the GEMMs get B times the rows; only the self-attention is per call (its cache, window and
sink). The same function as B `forward_block` calls (tests/test_diagonal.py, CPU fp32).

Limits: every call has the same latent size; step caches paged per layer and CUDA graphs are not
supported here (ValueError).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kv_cache import SinkCache, StepKVCache
from .rope import RopeFactors


@dataclass
class DiagonalCall:
    """One (block, step) call of a diagonal: the `forward_block` arguments.

    x `[16, F, h, w]`, timestep (float32-rounded), audio: `dit.encode_audio(...)` of the call's
    block (global `[1, F, 1, dim]`, tokens `[1, F, n, dim]`), cond `[1, 16, F, h, w]` or None."""

    x: torch.Tensor
    timestep: float
    audio: tuple[torch.Tensor, torch.Tensor]
    cache: StepKVCache
    sink: SinkCache
    start_frame: int
    sink_offset: int
    cond: torch.Tensor | None = None


def _split_attend(attends: list, tokens: int):
    """One self-attention policy over concatenated calls: call k's q/k/v rows [k*tokens, (k+1)*tokens)."""

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.cat([a(q[:, j * tokens:(j + 1) * tokens], k[:, j * tokens:(j + 1) * tokens],
                            v[:, j * tokens:(j + 1) * tokens]) for j, a in enumerate(attends)], dim=1)

    return attend


@torch.no_grad()
def forward_diagonal(dit, text, calls: list[DiagonalCall]) -> list[torch.Tensor]:
    """Flow velocities `[16, F, h, w]` (each in its x's dtype) of independent calls in one pass.

    dit: a `CausalS2VDiT`; text: its `TextState`; calls: distinct step caches, one latent size.
    Each cache gets its block's keys and values, as `forward_block` writes them."""
    if not calls:
        return []
    if len({id(c.cache) for c in calls}) != len(calls):
        raise ValueError("forward_diagonal: every call needs its own step cache")
    if dit.cuda_graphs is not None:
        raise ValueError("forward_diagonal: not with CUDA graphs")
    if any(c.cache.paged_layers for c in calls):
        raise ValueError("forward_diagonal: step caches paged per layer are not supported (keep them resident)")
    nf = dit.stream.frames_per_block_latent
    setups = [dit._call_setup(c.x, c.timestep, c.cache, c.sink, c.start_frame, c.sink_offset) for c in calls]
    hw = setups[0][0]
    if any(s[0] != hw for s in setups):
        raise ValueError("forward_diagonal: the calls must share one latent size")
    hp, wp = dit._grid(hw)
    tokens_per_call = nf * hp * wp
    tokens = torch.cat([dit._embed_block(c.x.to(dit.device, dit.dtype),
                                         None if c.cond is None else c.cond.to(dit.device, dit.dtype))
                        for c in calls], dim=1)
    e = torch.cat([s[5] for s in setups])  # [B*F, dim]
    e0 = torch.cat([s[6][0] for s in setups]).unsqueeze(0)  # [1, B*F, 6, dim]
    rope = RopeFactors(torch.cat([s[1].cos for s in setups]), torch.cat([s[1].sin for s in setups]))
    audio_global = torch.cat([c.audio[0][0, :, 0] for c in calls])  # [B*F, dim]
    audio_tokens = torch.cat([c.audio[1][0] for c in calls])  # [B*F, n, dim]
    backend = dit.attn_backend

    def attend_of(i: int, fused):
        attends = []
        for c, (_, rope_c, _, plan, sink_rope, _, _) in zip(calls, setups):
            if fused is not None:
                attends.append(c.cache.stream_attend(i, plan, None, c.sink, sink_rope, backend,
                                                     rotate=fused.rotate_factors))
            else:
                attends.append(c.cache.stream_attend(i, plan, rope_c, c.sink, sink_rope, backend))
        return _split_attend(attends, tokens_per_call)

    out = dit._run_layers(tokens, e0, rope, attend_of, text, len(calls) * nf, audio_global, audio_tokens,
                          dit._layers())
    out = dit.head(out, e)[0]  # [B*F*fsl, prod(patch)*out_dim]
    results = []
    for j, (c, (_, _, ref_t, plan, _, _, _)) in enumerate(zip(calls, setups)):
        results.append(dit._unpatchify(out[j * tokens_per_call:(j + 1) * tokens_per_call], nf, hp, wp).to(c.x.dtype))
        c.cache.commit(plan, c.sink, ref_t)
    return results


__all__ = ["DiagonalCall", "forward_diagonal"]
