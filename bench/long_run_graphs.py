"""CUDA graphs for the long run (bench/long_run.py `--cuda-graphs`), and the proof that they
change no frame.

At 64*64 the tiny checkpoint's block is ~3900 small kernels (DiT ~2400, streaming VAE decode
~1500): the CPU that launches them sets the pace (~114 ms per block eager on an H200). The
library replays the steady-state DiT call (`CausalS2VDiT.use_cuda_graphs`, one graph per step
cache) and the steady-state VAE decoder call (`WanVAE.use_cuda_graphs`, one graph per latent
frame) from CUDA graphs: the same kernels on the same values, launched at once. Before the run,
`parity` generates the first blocks with and without graphs and compares the uint8 frames and
the audio bit for bit, so the hour is the eager product path's video.
"""

from __future__ import annotations

import time

import torch


def set_graphs(model, enable: bool) -> None:
    """DiT and VAE CUDA graphs on or off (a new job captures its own)."""
    model.dit.use_cuda_graphs(enable)
    model.vae.use_cuda_graphs(enable)


def _first_blocks(model, ctx, aud, img, blocks: int) -> list:
    gen = model.generate(ctx, aud, img, seed=0)
    out = []
    for blk in gen:
        out.append(blk)
        if len(out) == blocks:
            break
    gen.close()
    return out


def parity(model, ctx, aud, img, blocks: int = 12) -> dict:
    """Generate the first `blocks` blocks eagerly and with graphs; equal: every block's frames and
    audio are the same bits. Leaves the graphs on. Returns the counts and the time it took."""
    t = time.perf_counter()
    set_graphs(model, False)
    eager = _first_blocks(model, ctx, aud, img, blocks)
    set_graphs(model, True)
    graphed = _first_blocks(model, ctx, aud, img, blocks)
    diff = [int((a.frames.int() - b.frames.int()).abs().max()) for a, b in zip(eager, graphed)]
    equal = len(eager) == len(graphed) and all(
        torch.equal(a.frames, b.frames) and torch.equal(torch.as_tensor(a.audio), torch.as_tensor(b.audio))
        for a, b in zip(eager, graphed))
    return {"blocks": len(eager), "equal": equal, "max_abs_diff_per_block": diff, "stats": stats(model),
            "seconds": round(time.perf_counter() - t, 2)}


def stats(model) -> dict:
    """Captures / replays so far (the DiT's since its last use_cuda_graphs; the VAE's per decoder)."""
    g = model.dit.cuda_graphs
    return {"dit": None if g is None else {"captures": g.captures, "replays": g.replays, "graphs": len(g),
                                           "disabled": g.disabled_reason},
            "vae": None if model.vae.graph_counts is None else vars(model.vae.graph_counts).copy()}


__all__ = ["parity", "set_graphs", "stats"]
