"""CUDA graphs of the streaming VAE decoder's steady-state step (`WanVAE.use_cuda_graphs()`).

The streaming decoder (`vae.StreamingDecoder`) runs `vae_stream.next_frame(decoder, x, caches)`
once per latent frame after the first: one latent frame `[1, z_dim, 1, h, w]` in, four video
frames out, and a tuple of cache tensors of fixed shapes (the last two frames each causal conv
saw). Such a call is about 500 small kernels; at small sizes the CPU that launches them, not the
GPU, sets the pace. `FrameGraph` captures that call once per video and replays it: the latent
frame is copied into a static input, the caches live in static buffers that the graph itself
overwrites at its end (the step computes fresh caches first, every read sees the old values, as
in the eager call), and the output is cloned out of the graph pool.

The replay runs the kernels the eager step runs, in the same order, on the same values: the
frames are the same bits. First sight of a steady shape runs eagerly (lazy initialisation,
library plans), the second captures. A capture that fails leaves this video eager (logged once).
On a CPU the captured body runs eagerly with the same static buffers, so its logic is tested
without a GPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

log = logging.getLogger("liveavatar")

Caches = tuple[torch.Tensor, ...]
FrameStep = Callable[[nn.Module, torch.Tensor, Caches], tuple[torch.Tensor, Caches]]  # vae_stream.next_frame


@dataclass
class GraphCounts:
    """Captures and replays of the frame graphs that share it (e.g. all decoders of one VAE);
    disabled: the last capture failure, if any."""

    captures: int = 0
    replays: int = 0
    disabled: str | None = None


class FrameGraph:
    """The graphed steady step of ONE video of a batch.

    `next_frame(decoder, x, caches)` returns what `step(decoder, x, caches)` returns: frames
    `[1, 3, 4, 8h, 8w]` and the new caches (after the first replay these are this graph's static
    buffers, overwritten by the next call: pass them back as they are). `counts`: where captures
    and replays are counted.
    """

    def __init__(self, step: FrameStep, counts: GraphCounts | None = None, pool=None):
        self.step = step
        self.pool = pool
        self.key: tuple | None = None  # the call shape last seen (eager) or captured
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_x: torch.Tensor | None = None
        self.static_caches: Caches = ()
        self.out: torch.Tensor | None = None
        self.counts = counts if counts is not None else GraphCounts()
        self.disabled_reason: str | None = None

    def next_frame(self, decoder: nn.Module, x: torch.Tensor, caches: Caches) -> tuple[torch.Tensor, Caches]:
        key = _call_key(x, caches)
        if key != self.key or self.disabled_reason is not None:
            self.key = key  # first sight of this shape: eager; the next call captures
            self.graph = self.static_x = None
            return self.step(decoder, x, caches)
        if x.device.type != "cuda":  # CPU: the captured body, eagerly
            self._bind(x, caches)
            return self._body(decoder).clone(), self.static_caches
        if self.graph is None and not self._capture(decoder, x, caches):
            return self.step(decoder, x, caches)
        self._bind(x, caches)
        self.graph.replay()
        self.counts.replays += 1
        return self.out.clone(), self.static_caches

    def _bind(self, x: torch.Tensor, caches: Caches) -> None:
        """Copy x, and every cache that is not already in its static buffer, into the static
        buffers (allocated at the first call after a new shape)."""
        if self.static_x is None:
            self.static_x = torch.empty_like(x)
            self.static_caches = tuple(torch.empty_like(c) for c in caches)
        self.static_x.copy_(x)
        for s, c in zip(self.static_caches, caches):
            if c.data_ptr() != s.data_ptr():
                s.copy_(c)

    def _body(self, decoder: nn.Module) -> torch.Tensor:
        """The captured call: decode the static frame, then write the new caches into the static
        ones (the step made them as fresh tensors, after every read of the old ones)."""
        out, new = self.step(decoder, self.static_x, self.static_caches)
        for s, n in zip(self.static_caches, new):
            s.copy_(n)
        return out

    def _capture(self, decoder: nn.Module, x: torch.Tensor, caches: Caches) -> bool:
        self._bind(x, caches)  # fresh static buffers, allocated before the capture
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(x.device)
        try:
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                out = self._body(decoder)
        except Exception as exc:  # a kernel that cannot be captured: stay eager
            self.disabled_reason = self.counts.disabled = f"{type(exc).__name__}: {exc}"[:300]
            log.warning("VAE cuda graphs: capture failed (%s); decoding eagerly", self.disabled_reason)
            torch.cuda.synchronize(x.device)
            return False
        # The capture recorded the kernels without running them: the static caches still hold
        # the state before this frame, which the first replay (by the caller) advances.
        self.graph, self.out = graph, out
        self.pool = graph.pool() if self.pool is None else self.pool
        self.counts.captures += 1
        return True


def _call_key(x: torch.Tensor, caches: Caches) -> tuple:
    """The shape of a step call: x's shape, dtype, device and every cache's shape."""
    return tuple(x.shape), x.dtype, x.device, tuple(tuple(c.shape) for c in caches)


__all__ = ["FrameGraph", "GraphCounts"]
